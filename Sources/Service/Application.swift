// The Continuum HTTP service: Hummingbird 2 serving the generated OpenAPI
// operations and the hand-routed generation endpoints.
import Foundation
import Hummingbird
import Logging
import Model
import OpenAPIHummingbird
import OpenAPIRuntime
import Store

/// The request context: Hummingbird's core storage.
public struct AppContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
    }
}

/// The API key a request authenticated with, for the handlers it reaches.
enum RequestPrincipal {
    @TaskLocal static var current: Principal?

    /// The caller, or 401.
    static func required() throws -> Principal {
        guard let p = current else { throw APIError.unauthorized }
        return p
    }
}

/// Looks up `Authorization: Bearer <key>`; a request with a key that is not
/// valid gets 401 at once, one without a key reaches only public routes.
struct AuthMiddleware<Context: RequestContext>: RouterMiddleware {
    let database: Database

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        guard let header = request.headers[.authorization] else { return try await next(request, context) }
        guard header.lowercased().hasPrefix("bearer "),
              let principal = try await database.authenticate(key: String(header.dropFirst(7)).trimmingCharacters(in: .whitespaces))
        else { throw APIError.unauthorized }
        return try await RequestPrincipal.$current.withValue(principal) { try await next(request, context) }
    }
}

/// Everything the handlers share.
final class ServiceState: Sendable {
    let configuration: ServiceConfiguration
    let model: LlamaModel
    let database: Database
    let engine: BatchEngine
    let started = Date()

    init(configuration: ServiceConfiguration, model: LlamaModel, database: Database) {
        self.configuration = configuration
        self.model = model
        self.database = database
        engine = BatchEngine(model: model, maxBatch: configuration.maxBatch, maxQueued: configuration.maxQueued)
    }
}

/// Builds the service: routes, middleware and the batch engine. The database
/// must be migrated. Run it with `runService()` (or in tests, `test`-style
/// clients against the bound port).
public func buildApplication(configuration: ServiceConfiguration, model: LlamaModel, database: Database,
                             logger: Logger = Logger(label: "continuum"),
                             onServerRunning: @escaping @Sendable (Int) async -> Void = { _ in })
    throws -> some ApplicationProtocol {
    try configuration.validate()
    let state = ServiceState(configuration: configuration, model: model, database: database)
    let router = Router(context: AppContext.self)
    router.add(middleware: ErrorMiddleware())
    router.add(middleware: AuthMiddleware(database: database))
    try OperationsAPI(state: state).registerHandlers(on: router)
    GenerationRoutes(state: state).register(on: router)
    DocumentationRoutes.register(on: router)
    return Application(
        router: router,
        configuration: .init(address: .hostname(configuration.host, port: configuration.port), serverName: "continuum"),
        onServerRunning: { channel in await onServerRunning(channel.localAddress?.port ?? configuration.port) },
        logger: logger)
}

/// The generated operations: health, readiness, models.
struct OperationsAPI: APIProtocol {
    let state: ServiceState

    func health(_ input: Operations.Health.Input) async throws -> Operations.Health.Output {
        .ok(.init(body: .json(.init(status: .ok))))
    }

    func ready(_ input: Operations.Ready.Input) async throws -> Operations.Ready.Output {
        let database = (try? await state.database.ping()) != nil
        let migrations = database ? ((try? await state.database.isMigrated()) ?? false) : false
        let readiness = Components.Schemas.Readiness(ready: database && migrations,
                                                     checks: .init(model: true, database: database, migrations: migrations))
        return readiness.ready ? .ok(.init(body: .json(readiness))) : .serviceUnavailable(.init(body: .json(readiness)))
    }

    func listModels(_ input: Operations.ListModels.Input) async throws -> Operations.ListModels.Output {
        _ = try RequestPrincipal.required()
        return .ok(.init(body: .json(.init(object: .list, data: [
            .init(id: state.configuration.modelName, object: .model, created: Int64(state.started.timeIntervalSince1970),
                  ownedBy: "continuum"),
        ]))))
    }
}
