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
    /// The most bytes one token of the vocabulary decodes to (bounds a text's token count from below by its bytes).
    let maxTokenBytes: Int
    /// On-demand audits per user in the last minute.
    let auditLimiter: RateLimiter

    init(configuration: ServiceConfiguration, model: LlamaModel, levels: LevelConfiguration, database: Database,
         logger: Logger) throws {
        self.configuration = configuration
        self.model = model
        self.database = database
        engine = BatchEngine(model: model, maxBatch: configuration.maxBatch, maxQueued: configuration.maxQueued)
        memory = UserMemory(model: model, levels: levels, database: database, cacheBytes: configuration.cacheBytes)
        auditor = try Auditor(memory: memory, configuration: configuration, logger: logger)
        let tokenizer = model.tokenizer
        maxTokenBytes = max(1, (0..<tokenizer.count).lazy.map { tokenizer.bytes(of: $0).count }.max() ?? 1)
        auditLimiter = RateLimiter(limit: configuration.auditsPerUserPerMinute, window: 60)
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

/// Prunes what the retention settings no longer keep, every
/// `retention.interval_seconds` (every replica runs one; deletes are idempotent).
struct RetentionService: ServiceLifecycle.Service {
    let database: Database
    let retention: RetentionConfiguration
    let logger: Logger

    func run() async throws {
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            do {
                let counts = try await database.prune(retention.store)
                if counts.total > 0 {
                    logger.info("retention pruned \(counts.finishedJobs) finished jobs, \(counts.generations) generations, \(counts.driftReports) drift reports, \(counts.auditEvents) audit events")
                }
            } catch {
                logger.error("retention pruning failed: \(error)")
            }
            try? await sleepUnlessShuttingDown(seconds: retention.intervalSeconds)
        }
    }
}

/// Sleeps `seconds`, or less when the application shuts down.
func sleepUnlessShuttingDown(seconds: Double) async throws {
    try await cancelWhenGracefulShutdown { try await Task.sleep(for: .seconds(seconds)) }
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
    try levels.validate(layers: model.configuration.numHiddenLayers, hiddenSize: model.configuration.hiddenSize)
    let state = try ServiceState(configuration: configuration, model: model, levels: levels, database: database, logger: logger)
    let router = Router(context: AppContext.self)
    router.add(middleware: MetricsMiddleware(metrics: state.metrics))
    router.add(middleware: ErrorMiddleware())
    router.add(middleware: AccessMiddleware(database: database, configuration: configuration))
    try OperationsAPI(state: state).registerHandlers(on: router)
    GenerationRoutes(state: state).register(on: router)
    DocumentationRoutes.register(on: router)
    MetricsRoutes(state: state).register(on: router)
    AuditRoutes(state: state).register(on: router)
    ImportRoute(state: state).register(on: router)
    var services: [any ServiceLifecycle.Service] = (0..<configuration.learningWorkers).map { _ in
        LearningService(worker: LearningWorker(memory: state.memory, configuration: configuration, metrics: state.metrics,
                                               auditor: configuration.audit ? state.auditor : nil, logger: logger))
    }
    services.append(RetentionService(database: database, retention: configuration.retention, logger: logger))
    return Application(
        router: router,
        server: .http1(configuration: .init(idleTimeout: .nanoseconds(Int64(configuration.idleTimeoutSeconds * 1e9)))),
        configuration: .init(address: .hostname(configuration.host, port: configuration.port), serverName: "continuum"),
        services: services,
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
        _ = try RequestScope.principal()
        return .ok(.init(body: .json(.init(object: .list, data: [
            .init(id: state.configuration.modelName, object: .model, created: Int64(state.started.timeIntervalSince1970),
                  ownedBy: "continuum"),
        ]))))
    }
}
