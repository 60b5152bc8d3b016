// Builds the service (as Hummingbird's template does): `buildApplication`
// makes the shared engines (the users' memories and their cache, the batch
// engine, the auditor, metrics), the controllers, each with only what it
// uses, the router with the request pipeline (Middleware.swift), and the
// application with its services (Services.swift).
import Foundation
import Hummingbird
import Logging
import Memory
import Model
import OpenAPIHummingbird
import OpenAPIRuntime
import ServiceLifecycle
import Store

/// Builds the service on `store` (migrated). `levels` is the level
/// configuration every user's memory follows (default: the documented
/// defaults for this backbone); stored states made under another are
/// refused. `services` run before the application's own (e.g. a
/// `DatabaseService` for a store whose pool the application runs) and stop
/// after them; `beforeServing` runs once they have started, before the
/// server accepts requests (migrations, first-start set-up).
public func buildApplication(configuration: ServiceConfiguration, model: LlamaModel, levels: LevelConfiguration? = nil,
                             store: any ContinuumStore, services first: [any ServiceLifecycle.Service] = [],
                             beforeServing: [@Sendable () async throws -> Void] = [],
                             logger: Logger = Logger(label: "continuum"),
                             onServerRunning: @escaping @Sendable (Int) async -> Void = { _ in })
    throws -> some ApplicationProtocol {
    try configuration.validate()
    let levels = levels ?? LevelConfiguration.defaults(layers: model.configuration.numHiddenLayers)
    try levels.validate(layers: model.configuration.numHiddenLayers, hiddenSize: model.configuration.hiddenSize)

    let metrics = Metrics()
    let engine = BatchEngine(model: model, maxBatch: configuration.maxBatch, maxQueued: configuration.maxQueued,
                             prefillChunk: configuration.prefillChunkTokens)
    let lanes = ComputeLanes(lanes: configuration.learningWorkers, nice: Int32(configuration.learningNice))
    let memory = UserMemory(model: model, levels: levels, store: store, cacheBytes: configuration.cacheBytes, lanes: lanes)
    let auditor = try Auditor(memory: memory, store: store, configuration: configuration, metrics: metrics, logger: logger)
    let learning = LearningStatus(queue: store, waitSeconds: configuration.learningWaitSeconds)
    let tokenizer = model.tokenizer
    let maxTokenBytes = max(1, (0..<tokenizer.count).lazy.map { tokenizer.bytes(of: $0).count }.max() ?? 1)

    let router = try buildRouter(
        configuration: configuration, store: store, metrics: metrics,
        operations: OperationsController(configuration: configuration, store: store, queue: store, engine: engine, cache: memory.cache,
                                         metrics: metrics, started: Date()),
        generation: GenerationController(configuration: configuration, model: model, users: store, queue: store, engine: engine,
                                         memory: memory, metrics: metrics, learning: learning),
        feedback: FeedbackController(configuration: configuration, tokenizer: tokenizer, maxTokenBytes: maxTokenBytes, users: store,
                                     queue: store, metrics: metrics, learning: learning),
        memory: MemoryController(configuration: configuration, users: store, queue: store, memory: memory, metrics: metrics),
        audit: AuditController(configuration: configuration, store: store, auditor: auditor,
                               limiter: RateLimiter(limit: configuration.auditsPerUserPerMinute, window: 60), tokenizer: tokenizer,
                               maxTokenBytes: maxTokenBytes))

    var services = first
    services.append(BatchEngineService(engine: engine))
    services.append(ComputeLanesService(lanes: lanes))   // stops after the learning workers and the server
    for _ in 0..<configuration.learningWorkers {
        services.append(LearningService(worker: LearningWorker(memory: memory, queue: store, configuration: configuration, metrics: metrics,
                                                               auditor: configuration.audit ? auditor : nil, logger: logger)))
    }
    services.append(RetentionService(store: store, retention: configuration.retention, logger: logger))
    if configuration.consolidation.idleSeconds > 0 && levels.consolidation != nil {
        services.append(ConsolidationSweepService(queue: store, configuration: configuration.consolidation, metrics: metrics, logger: logger))
    }
    var app = Application(
        router: router,
        server: .http1(configuration: .init(idleTimeout: .nanoseconds(Int64(configuration.idleTimeoutSeconds * 1e9)))),
        configuration: .init(address: .hostname(configuration.host, port: configuration.port), serverName: "continuum"),
        services: services,
        onServerRunning: { channel in await onServerRunning(channel.localAddress?.port ?? configuration.port) },
        logger: logger)
    for step in beforeServing { app.beforeServerStarts(perform: step) }
    return app
}

/// The routes: the request pipeline (metrics, errors, access), the generated
/// operations and the hand-routed ones, every one listed in `Endpoints`.
func buildRouter(configuration: ServiceConfiguration, store: any TenantStore, metrics: Metrics, operations: OperationsController,
                 generation: GenerationController, feedback: FeedbackController, memory: MemoryController, audit: AuditController)
    throws -> Router<AppContext> {
    let router = Router(context: AppContext.self)
    router.add(middleware: MetricsMiddleware(metrics: metrics))
    router.add(middleware: ErrorMiddleware())
    router.add(middleware: AccessMiddleware(keys: store, configuration: configuration))
    try OpenAPIHandler(operations: operations, feedback: feedback, memory: memory).registerHandlers(on: router)
    generation.register(on: router)
    operations.register(on: router)
    audit.register(on: router)
    memory.register(on: router)
    SessionController(configuration: configuration, keys: store).register(on: router)
    return router
}
