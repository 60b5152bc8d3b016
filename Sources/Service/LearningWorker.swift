// LearningWorker: applies users' learning jobs after their responses. Each
// round claims one user (their row locked in PostgreSQL for the round, so no
// other worker on any replica runs that user's jobs meanwhile), applies up to
// `learning_batch` of their queued jobs in order with the CMS rule, and
// commits the new versions, the learner part and the jobs' done marks in one
// transaction: a crash at any point applies all of a round or none of it.
import Foundation
import Logging
import Memory
import Store

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
                await auditor?.runDue()   // audits of new versions, between rounds
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
        let memory = self.memory, metrics = self.metrics
        let final = FinalState()
        let start = ContinuousClock.now
        let applied = try await queue.learnNext(limit: configuration.learningBatch, keep: configuration.versionsKept,
                                                          failed: { jobs, _ in metrics.jobsFailed.increment(by: jobs.count) }) {
            user, stored, jobs in
            try await memory.compute {
                let computeStart = ContinuousClock.now
                defer { metrics.learningCompute.observe((ContinuousClock.now - computeStart).seconds) }
                let learner: LevelLearner
                do {
                    learner = try memory.learner(stored)
                } catch {
                    // The stored bytes will not change: retrying cannot help.
                    throw JobsUnlearnable(reason: "the stored memory cannot be read by this server: \(error)")
                }
                var changes: [MemoryChange?] = []
                for job in jobs {
                    let before = learner.updatesApplied
                    try learner.learn(tokens: job.tokens, learnable: job.learnable)
                    let changed = learner.updatesApplied.indices.filter { learner.updatesApplied[$0] != before[$0] }
                    changes.append(changed.isEmpty ? nil : try memory.change(
                        learner, changed: changed, cause: job.kind.cause,
                        causeID: job.sourceID?.uuidString.lowercased(), actor: job.actor))
                }
                final.set(user: user.id, tenant: user.tenantID, state: learner.state, changed: changes.contains { $0 != nil })
                return LearningOutcome(changes: changes, taughtTokens: jobs.map { LearnableTokens.count($0.learnable) },
                                       learner: try LevelStateFile.encodeLearner(learner, backbone: memory.model.fingerprint))
            }
        }
        if applied?.isEmpty == false { metrics.learningRound.observe((ContinuousClock.now - start).seconds) }
        // Committed: the new current version's weights are the learner's.
        if let applied, let last = applied.last, let f = final.get(), f.changed {
            memory.cache.put(.init(user: f.user, version: last.version), f.state)
            auditor?.versionChanged(userID: f.user, tenantID: f.tenant)
        }
        for a in applied ?? [] {
            metrics.learningLag.observe(a.lagSeconds)
            metrics.jobsApplied.increment()
            metrics.tokensLearned.increment(by: LearnableTokens.count(a.job.learnable))
        }
        return applied
    }

    /// The learner state a round ended with, handed out of the compute closure.
    final class FinalState: @unchecked Sendable {
        private let lock = NSLock()
        private var value: (user: Int64, tenant: Int64, state: LevelState, changed: Bool)?
        func set(user: Int64, tenant: Int64, state: LevelState, changed: Bool) {
            lock.lock(); defer { lock.unlock() }
            value = (user, tenant, state, changed)
        }
        func get() -> (user: Int64, tenant: Int64, state: LevelState, changed: Bool)? {
            lock.lock(); defer { lock.unlock() }
            return value
        }
    }
}
