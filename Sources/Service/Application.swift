// The Continuum HTTP service: Hummingbird 2 serving the generated OpenAPI
// operations and the hand-routed generation endpoints.
import Foundation
import Hummingbird
import Logging
import Memory
import Model
import OpenAPIHummingbird
import OpenAPIRuntime
import ServiceLifecycle
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

/// Counts every request by route and status, with its latency to the response head.
struct MetricsMiddleware<Context: RequestContext>: RouterMiddleware {
    let metrics: Metrics

    /// The path with the user id replaced, so a label names a route, not a user.
    static func route(_ path: String) -> String {
        var parts = path.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        if parts.count > 3, parts[1] == "v1", parts[2] == "users" { parts[3] = "{user}" }
        return parts.joined(separator: "/")
    }

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let start = ContinuousClock.now
        let route = Self.route(request.uri.path)
        do {
            let response = try await next(request, context)
            metrics.record(route: route, status: Int(response.status.code), seconds: (ContinuousClock.now - start).seconds)
            return response
        } catch {
            metrics.record(route: route, status: Int(APIError.from(error).status.code), seconds: (ContinuousClock.now - start).seconds)
            throw error
        }
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) * 1e-18 }
}

/// Everything the handlers share.
final class ServiceState: Sendable {
    let configuration: ServiceConfiguration
    let model: LlamaModel
    let database: Database
    let engine: BatchEngine
    let memory: UserMemory
    let auditor: Auditor
    let metrics = Metrics()
    let started = Date()

    init(configuration: ServiceConfiguration, model: LlamaModel, levels: LevelConfiguration, database: Database,
         logger: Logger) throws {
        self.configuration = configuration
        self.model = model
        self.database = database
        engine = BatchEngine(model: model, maxBatch: configuration.maxBatch, maxQueued: configuration.maxQueued)
        memory = UserMemory(model: model, levels: levels, database: database, cacheBytes: configuration.cacheBytes)
        auditor = try Auditor(memory: memory, configuration: configuration, logger: logger)
    }
}

/// A learning worker as a service of the application: it starts with the
/// server and, on graceful shutdown, finishes the round in progress and stops.
struct LearningService: ServiceLifecycle.Service {
    let worker: LearningWorker

    func run() async throws {
        let stop = StopFlag()
        await withGracefulShutdownHandler {
            await worker.run(until: { stop.isSet })
        } onGracefulShutdown: {
            stop.set()
        }
    }
}

final class StopFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.lock(); value = true; lock.unlock() }
    var isSet: Bool { lock.lock(); defer { lock.unlock() }; return value }
}

/// Builds the service: routes, middleware, the batch engine and the
/// learning workers. The database must be migrated. `levels` is the level
/// configuration every user's memory follows (default: the documented
/// defaults for this backbone); stored states made under another are refused.
public func buildApplication(configuration: ServiceConfiguration, model: LlamaModel, levels: LevelConfiguration? = nil,
                             database: Database, logger: Logger = Logger(label: "continuum"),
                             onServerRunning: @escaping @Sendable (Int) async -> Void = { _ in })
    throws -> some ApplicationProtocol {
    try configuration.validate()
    let levels = levels ?? LevelConfiguration.defaults(layers: model.configuration.numHiddenLayers)
    try levels.validate(layers: model.configuration.numHiddenLayers)
    let state = try ServiceState(configuration: configuration, model: model, levels: levels, database: database, logger: logger)
    let router = Router(context: AppContext.self)
    router.add(middleware: MetricsMiddleware(metrics: state.metrics))
    router.add(middleware: ErrorMiddleware())
    router.add(middleware: AuthMiddleware(database: database))
    try OperationsAPI(state: state).registerHandlers(on: router)
    GenerationRoutes(state: state).register(on: router)
    DocumentationRoutes.register(on: router)
    MetricsRoutes(state: state).register(on: router)
    AuditRoutes(state: state).register(on: router)
    ImportRoute(state: state).register(on: router)
    let workers: [any ServiceLifecycle.Service] = (0..<configuration.learningWorkers).map { _ in
        LearningService(worker: LearningWorker(memory: state.memory, configuration: configuration, metrics: state.metrics,
                                               auditor: configuration.audit ? state.auditor : nil, logger: logger))
    }
    return Application(
        router: router,
        configuration: .init(address: .hostname(configuration.host, port: configuration.port), serverName: "continuum"),
        services: workers,
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
