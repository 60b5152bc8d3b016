// LearningWorker: applies users' learning jobs after their responses. Each
// round claims one user (their row locked in PostgreSQL for the round, so no
// other worker on any replica runs that user's jobs meanwhile), applies up to
// `learning_batch` of their queued jobs in order with the CMS rule, and
// commits the new versions, the learner part and the jobs' done marks in one
// transaction: a crash at any point applies all of a round or none of it.
//
// Automatic consolidation ("sleep", `consolidation` in the configuration) is
// a job of the same queue: a round whose learning passes `every_tokens` or
// `fast_norm` enqueues one in its own transaction, and the idle sweep
// (`ConsolidationSweepService`) enqueues one for users idle `idle_seconds`.
// At most one waits per user; it runs in a later round under the user's
// lock like any job, so it is applied exactly once, in order with the
// user's learning, and makes a version with cause `consolidate`.
import Foundation
import Logging
import Memory
import Store
import Synchronization

final class LearningWorker: Sendable {
    let memory: UserMemory
    let queue: any LearningQueue
    let configuration: ServiceConfiguration
    let metrics: Metrics
    let auditor: Auditor?
    let logger: Logger

    init(memory: UserMemory, queue: any LearningQueue, configuration: ServiceConfiguration, metrics: Metrics, auditor: Auditor?,
         logger: Logger) {
        self.memory = memory
        self.queue = queue
        self.configuration = configuration
        self.metrics = metrics
        self.auditor = auditor
        self.logger = logger
    }

    /// Runs rounds until `stop` says so or the task is cancelled; idles
    /// `idle` between empty polls. A round in progress finishes first.
    func run(idle: Duration = .milliseconds(50), until stop: @escaping @Sendable () -> Bool) async {
        while !Task.isCancelled && !stop() {
            do {
                let applied = try await round()
                // Audits of new versions, between rounds; deferred while jobs wait
                // (the queue is asked only when an audit is due and this round found work).
                await auditor?.runDue(learningWaits: { [queue] in
                    guard applied != nil else { return false }
                    return ((try? await queue.queuedJobs().count) ?? 0) > 0
                })
                if applied == nil { try? await Task.sleep(for: idle) }
            } catch {
                logger.error("learning round failed: \(error)")
                metrics.learningFailures.increment()
                try? await Task.sleep(for: .seconds(1))
            }
        }
    }

    /// One round: nil when no job waited, else the jobs applied.
    @discardableResult
    func round() async throws -> [AppliedJob]? {
        let memory = self.memory, metrics = self.metrics, automatic = configuration.consolidation
        let final = FinalState()
        let start = ContinuousClock.now
        let applied = try await queue.learnNext(limit: configuration.learningBatch, keep: configuration.versionsKept,
                                                          failed: { jobs, _ in metrics.jobsFailed.increment(by: jobs.count) }) {
            user, stored, jobs in
            try await memory.compute(.heavy) {
                let computeStart = ContinuousClock.now
                defer { metrics.learningCompute.observe((ContinuousClock.now - computeStart).seconds) }
                let learner: LevelLearner
                do {
                    learner = try memory.learner(stored)
                } catch {
                    // The stored bytes will not change: retrying cannot help.
                    throw JobsUnlearnable(reason: "the stored memory cannot be read by this server: \(error)")
                }
                var changes: [MemoryChange?] = [], details: [[String: Double]] = []
                for job in jobs {
                    if job.kind == .consolidate {
                        // Queued under a configuration with two levels, read under one
                        // without: nothing to consolidate into (the job is done, no version).
                        guard memory.levels.consolidation != nil else {
                            changes.append(nil)
                            details.append([:])
                            continue
                        }
                        let start = ContinuousClock.now
                        let r = try memory.consolidate(learner, method: automatic.method, budget: automatic.budget,
                                                       sleep: automatic.sleep, actor: job.actor, current: false)
                        changes.append(r.change)
                        details.append(r.details)
                        final.consolidated(trigger: job.trigger, seconds: (ContinuousClock.now - start).seconds, changed: r.change != nil)
                        continue
                    }
                    let before = learner.updatesApplied
                    try learner.learn(tokens: job.tokens, learnable: job.learnable)
                    let changed = learner.updatesApplied.indices.filter { learner.updatesApplied[$0] != before[$0] }
                    changes.append(changed.isEmpty ? nil : try memory.change(
                        learner, changed: changed, cause: job.kind.cause,
                        causeID: job.sourceID?.uuidString.lowercased(), actor: job.actor, current: false))
                    details.append([:])
                }
                final.set(user: user.id, tenant: user.tenantID, state: learner.state, changed: changes.contains { $0 != nil })
                let taught = jobs.map { LearnableTokens.count($0.learnable) }
                let unconsolidated = LearningJob.unconsolidated(from: user.unconsolidatedTokens, after: jobs, taught: taught)
                let end = try memory.roundState(learner, after: changes)
                return LearningOutcome(changes: changes, taughtTokens: taught, learner: end.learner, moments: end.moments,
                                       details: details,
                                       consolidate: memory.levels.consolidation == nil ? nil
                                           : Self.trigger(automatic, unconsolidated: unconsolidated,
                                                          fastNorm: { memory.fastNorm(learner) }))
            }
        }
        if applied?.isEmpty == false { metrics.learningRound.observe((ContinuousClock.now - start).seconds) }
        // Committed: the new current version's weights are the learner's.
        if let applied, let last = applied.last, let f = final.get(), f.changed {
            memory.cache.put(.init(user: f.user, version: last.version), f.state)
            auditor?.versionChanged(userID: f.user, tenantID: f.tenant)
        }
        if applied != nil {
            for c in final.consolidations { metrics.consolidated(trigger: c.trigger, seconds: c.seconds, changed: c.changed) }
        }
        for a in applied ?? [] where a.job.kind != .consolidate {
            metrics.learningLag.observe(a.lagSeconds)
            metrics.jobsApplied.increment()
            metrics.tokensLearned.increment(by: LearnableTokens.count(a.job.learnable))
        }
        return applied
    }

    /// What an automatic consolidation to enqueue after a round, if any: the
    /// token count first (it needs no compute), then the fast level's norm.
    static func trigger(_ c: ConsolidationConfiguration, unconsolidated: Int64, fastNorm: () -> Double) -> ConsolidationTrigger? {
        guard unconsolidated > 0 else { return nil }
        if c.everyTokens > 0 && unconsolidated >= Int64(c.everyTokens) { return .tokens }
        if c.fastNorm > 0 && fastNorm() >= c.fastNorm { return .fastNorm }
        return nil
    }

    /// The learner state a round ended with and the consolidations it ran,
    /// handed out of the compute closure.
    final class FinalState: Sendable {
        typealias Final = (user: Int64, tenant: Int64, state: LevelState, changed: Bool)
        typealias Ran = (trigger: ConsolidationTrigger?, seconds: Double, changed: Bool)
        private let value = Mutex<Final?>(nil)
        private let ran = Mutex<[Ran]>([])
        func set(user: Int64, tenant: Int64, state: LevelState, changed: Bool) {
            value.withLock { $0 = (user, tenant, state, changed) }
        }
        func get() -> Final? { value.withLock { $0 } }
        func consolidated(trigger: ConsolidationTrigger?, seconds: Double, changed: Bool) {
            ran.withLock { $0.append((trigger, seconds, changed)) }
        }
        var consolidations: [Ran] { ran.withLock { $0 } }
    }
}
