// The application's long-lived parts as ServiceLifecycle services, started
// with the server and stopped on graceful shutdown in reverse order: the
// HTTP server first (requests in flight finish), then the retention pruner,
// the learning workers (the round in progress finishes), the compute lanes
// and the batch engine (their threads end) and last the database pool.
import Foundation
import Logging
import ServiceLifecycle
import Store
import Synchronization

/// Runs the connection pool of a database made with `running: .byCaller`.
public struct DatabaseService: ServiceLifecycle.Service {
    let database: Database

    public init(_ database: Database) { self.database = database }

    public func run() async throws {
        try await cancelWhenGracefulShutdown { await database.run() }
    }
}

/// The batch engine's thread, from start-up to shutdown.
struct BatchEngineService: ServiceLifecycle.Service {
    let engine: BatchEngine

    func run() async throws {
        await withGracefulShutdownHandler {
            await engine.run()
        } onGracefulShutdown: {
            engine.shutdown()
        }
    }
}

/// The heavy compute lanes' threads (ComputeLanes), from start-up to shutdown.
struct ComputeLanesService: ServiceLifecycle.Service {
    let lanes: ComputeLanes

    func run() async throws {
        await withGracefulShutdownHandler {
            await lanes.run()
        } onGracefulShutdown: {
            lanes.shutdown()
        }
    }
}

/// A learning worker: on graceful shutdown it finishes the round in progress and stops.
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

/// Threads the application's services run (the batch engine's, the compute
/// lanes'), counted for whoever set the task-local `counter` around the
/// application (tests check none outlives its application; task-local, so
/// other applications running in the same process do not enter it).
enum ServiceThreads {
    final class Count: Sendable {
        let running = Atomic<Int>(0)
    }
    @TaskLocal static var counter: Count?

    /// Runs `body` on a thread of its own (named `name`, 8 MiB of stack),
    /// counted in `counter`; returns when the thread has ended.
    static func run(named name: String, _ body: @escaping @Sendable () -> Void) async {
        let count = counter
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            let t = Thread {
                count?.running.add(1, ordering: .relaxed)
                body()
                count?.running.subtract(1, ordering: .relaxed)
                done.resume()
            }
            t.name = name
            t.stackSize = 8 << 20
            t.start()
        }
    }
}

/// A flag set once, read from any thread.
final class StopFlag: Sendable {
    private let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .relaxed) }
    var isSet: Bool { value.load(ordering: .relaxed) }
}

/// Prunes what the retention settings no longer keep, every
/// `retention.interval_seconds` (every replica runs one; deletes are idempotent).
struct RetentionService: ServiceLifecycle.Service {
    let store: any StoreMaintenance
    let retention: RetentionConfiguration
    let logger: Logger

    func run() async throws {
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            do {
                let counts = try await store.prune(retention.store)
                if counts.total > 0 {
                    logger.info("retention pruned \(counts.finishedJobs) finished jobs, \(counts.generations) generations, \(counts.driftReports) drift reports, \(counts.auditEvents) audit events")
                }
            } catch {
                logger.error("retention pruning failed: \(error)")
            }
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: .seconds(retention.intervalSeconds)) }
        }
    }
}

/// Every `consolidation.sweep_seconds`, queues a consolidation for each user
/// idle `consolidation.idle_seconds` with something to consolidate (every
/// replica runs one; a user never has two waiting).
struct ConsolidationSweepService: ServiceLifecycle.Service {
    let queue: any LearningQueue
    let configuration: ConsolidationConfiguration
    let metrics: Metrics
    let logger: Logger

    func run() async throws {
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            do {
                let users = try await queue.enqueueIdleConsolidations(idleSeconds: configuration.idleSeconds, limit: 100)
                metrics.consolidationsEnqueued.increment(by: users.count)
                if !users.isEmpty { logger.info("queued consolidations of \(users.count) idle user(s)") }
            } catch {
                logger.error("looking for idle users to consolidate failed: \(error)")
            }
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: .seconds(configuration.sweepSeconds)) }
        }
    }
}
