// Generations, feedback and the learning-job queue in PostgreSQL. A
// generation and its job (or feedback and its job) are committed together;
// `learnNext` claims one user per round with FOR NO KEY UPDATE SKIP LOCKED
// and commits the round's versions, learner part and job states in the same
// transaction, so a crash applies a round wholly or not at all and no two
// workers on any replica run one user's jobs at once.
import Foundation
import Logging
import PostgresNIO

extension Database {
    // MARK: Generations, feedback and learning jobs

    /// Records generation `id` and, when `job` is given, its learning job, in
    /// one transaction. Returns the job id.
    public func recordGeneration(id: UUID, userID: Int64, memoryVersion: Int64, prompt: [Int], completion: [Int],
                                 job: LearningRequest?, actor: String) async throws -> Int64? {
        try await transaction { tx in
            try await tx.query("""
                INSERT INTO generations (id, user_id, memory_version, prompt_tokens, completion_tokens)
                VALUES (\(id), \(userID), \(memoryVersion), \(prompt.map(Int32.init)), \(completion.map(Int32.init)))
                """, logger: logger)
            guard let job else { return nil }
            return try await Self.enqueue(job, kind: .generation, source: id, userID: userID, actor: actor, tx: tx, logger: logger)
        }
    }

    static func enqueue(_ job: LearningRequest, kind: JobKind, source: UUID, userID: Int64, actor: String,
                        tx: PostgresConnection, logger: Logger) async throws -> Int64 {
        for try await jobID in try await tx.query("""
            INSERT INTO learning_jobs (user_id, kind, source_id, tokens, learnable, actor)
            VALUES (\(userID), \(kind.rawValue), \(source), \(job.tokens.map(Int32.init)), \(job.learnable), \(actor)) RETURNING id
            """, logger: logger).decode(Int64.self) {
            return jobID
        }
        throw Failure(description: "the learning job was not recorded")
    }

    /// A generation of one of the tenant's users (nil: none, or another tenant's).
    public func generation(id: UUID, tenantID: Int64) async throws -> StoredGeneration? {
        let rows = try await client.query("""
            SELECT g.id, g.user_id, g.memory_version, g.prompt_tokens, g.completion_tokens
            FROM generations g JOIN users u ON u.id = g.user_id WHERE g.id = \(id) AND u.tenant_id = \(tenantID)
            """, logger: logger)
        for try await r in rows.decode((UUID, Int64, Int64, [Int32], [Int32]).self) {
            return StoredGeneration(id: r.0, userID: r.1, memoryVersion: r.2, promptTokens: r.3.map(Int.init),
                                    completionTokens: r.4.map(Int.init))
        }
        return nil
    }

    /// Records feedback on a generation and, when `job` is given, its learning
    /// job, in one transaction. Returns the feedback id and the job id.
    public func recordFeedback(generation: StoredGeneration, rating: String, correction: String?,
                               job: LearningRequest?, actor: String) async throws -> (UUID, Int64?) {
        let id = UUID()
        return try await transaction { tx in
            try await tx.query("""
                INSERT INTO feedback (id, user_id, generation_id, rating, correction, actor)
                VALUES (\(id), \(generation.userID), \(generation.id), \(rating), \(correction), \(actor))
                """, logger: logger)
            guard let job else { return (id, nil) }
            return (id, try await Self.enqueue(job, kind: .feedback, source: id, userID: generation.userID, actor: actor,
                                               tx: tx, logger: logger))
        }
    }

    /// Queued jobs of one user.
    public func queuedJobs(userID: Int64) async throws -> Int {
        for try await n in try await client.query("""
            SELECT count(*) FROM learning_jobs WHERE user_id = \(userID) AND state = 'queued'
            """, logger: logger).decode(Int.self) {
            return n
        }
        return 0
    }

    /// A job's state, the version it was applied in, and whether its user
    /// is frozen (a frozen user's jobs wait until cleared).
    public func jobState(id: Int64) async throws -> (state: JobState, version: Int64?, frozen: Bool)? {
        for try await r in try await client.query("""
            SELECT j.state, j.applied_version, u.frozen FROM learning_jobs j JOIN users u ON u.id = j.user_id WHERE j.id = \(id)
            """, logger: logger).decode((String, Int64?, Bool).self) {
            guard let state = JobState(rawValue: r.0) else { throw Failure(description: "job \(id) has an unknown state '\(r.0)'") }
            return (state, r.1, r.2)
        }
        return nil
    }

    /// Jobs waiting, and the age in seconds of the oldest.
    public func queuedJobs() async throws -> (count: Int, oldestSeconds: Double) {
        for try await r in try await client.query("""
            SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8
            FROM learning_jobs WHERE state = 'queued'
            """, logger: logger).decode((Int, Double).self) {
            return (r.0, r.1)
        }
        return (0, 0)
    }

    /// Queues a consolidation of the user, unless one is already waiting
    /// (the unique index on waiting consolidations decides, across replicas).
    /// True when this call queued it.
    @discardableResult
    static func enqueueConsolidation(userID: Int64, trigger: ConsolidationTrigger, tx: PostgresConnection, logger: Logger)
        async throws -> Bool {
        for try await _ in try await tx.query("""
            INSERT INTO learning_jobs (user_id, kind, tokens, learnable, actor, trigger)
            VALUES (\(userID), 'consolidate', '{}'::int[], '{}'::boolean[], 'system', \(trigger.rawValue))
            ON CONFLICT DO NOTHING RETURNING id
            """, logger: logger).decode(Int64.self) {
            return true
        }
        return false
    }

    /// Queues a consolidation (trigger `idle`) for up to `limit` users with
    /// unconsolidated tokens whose last learning job was applied at least
    /// `idleSeconds` ago, who have no job waiting, are not frozen, and whose
    /// tenant learns; longest idle first. Any replica may call it: a user
    /// never has two consolidations waiting. Returns the users queued.
    public func enqueueIdleConsolidations(idleSeconds: Double, limit: Int) async throws -> [Int64] {
        try Self.checkSeconds(idleSeconds)
        var out: [Int64] = []
        for try await id in try await client.query("""
            INSERT INTO learning_jobs (user_id, kind, tokens, learnable, actor, trigger)
            SELECT u.id, 'consolidate', '{}'::int[], '{}'::boolean[], 'system', 'idle'
            FROM users u JOIN tenants t ON t.id = u.tenant_id
            WHERE u.unconsolidated_tokens > 0 AND NOT u.frozen AND t.learning
              AND u.last_learned_at <= clock_timestamp() - make_interval(secs => \(idleSeconds))
              AND NOT EXISTS (SELECT 1 FROM learning_jobs j WHERE j.user_id = u.id AND j.state = 'queued')
            ORDER BY u.last_learned_at LIMIT \(limit)
            ON CONFLICT DO NOTHING RETURNING user_id
            """, logger: logger).decode(Int64.self) {
            out.append(id)
        }
        return out
    }

    static func checkSeconds(_ s: Double) throws {
        guard s.isFinite, s >= 0, s <= 1e9 else { throw Failure(description: "a duration of \(s) seconds cannot be stored") }
    }

    /// Takes the user whose oldest queued job is oldest among the users no
    /// other worker holds, locks that user's row for the transaction, and runs
    /// `body` on the user's current memory and up to `limit` of their queued
    /// jobs in order. What it returns is written (new versions for the jobs
    /// that changed levels, the learner part, the jobs marked done) in the
    /// same transaction, so a crash anywhere applies all of it or none. When
    /// `body` throws `JobsUnlearnable`, the jobs are marked `failed` instead
    /// (an audit event `learning_failed`; `failed` is called once that is
    /// committed) and the round returns no applied jobs; any other error
    /// rolls the round back, to be retried.
    /// Returns the jobs applied with their lag in seconds (enqueue to commit),
    /// or nil when no job was waiting.
    public func learnNext(limit: Int, keep: Int,
                          failed: (@Sendable ([LearningJob], String) -> Void)? = nil,
                          _ body: @Sendable (User, StoredMemory, [LearningJob]) async throws -> LearningOutcome)
        async throws -> [AppliedJob]? {
        let round = try await transaction { tx -> (applied: [AppliedJob]?, failed: (jobs: [LearningJob], reason: String)?) in
            var claimed: User?
            for try await r in try await tx.query("""
                SELECT \(unescaped: Self.userColumns) FROM users u JOIN tenants t ON t.id = u.tenant_id
                WHERE NOT u.frozen AND EXISTS (SELECT 1 FROM learning_jobs j WHERE j.user_id = u.id AND j.state = 'queued')
                ORDER BY (SELECT min(j.id) FROM learning_jobs j WHERE j.user_id = u.id AND j.state = 'queued')
                LIMIT 1
                FOR NO KEY UPDATE OF u SKIP LOCKED
                """, logger: self.logger).decode(UserRow.self) {
                claimed = Self.user(r)
            }
            guard let user = claimed else { return (nil, nil) }
            // Read after the lock: this statement sees every job an earlier holder marked done.
            var jobs: [LearningJob] = []
            for try await r in try await tx.query("""
                SELECT id, kind, source_id, tokens, learnable, actor, trigger FROM learning_jobs
                WHERE user_id = \(user.id) AND state = 'queued' ORDER BY id LIMIT \(limit)
                """, logger: self.logger).decode((Int64, String, UUID?, [Int32], [Bool], String, String?).self) {
                guard let kind = JobKind(rawValue: r.1) else { throw Failure(description: "learning job \(r.0) has an unknown kind '\(r.1)'") }
                let trigger = try r.6.map { t in
                    guard let v = ConsolidationTrigger(rawValue: t) else {
                        throw Failure(description: "learning job \(r.0) has an unknown trigger '\(t)'")
                    }
                    return v
                }
                jobs.append(LearningJob(id: r.0, kind: kind, sourceID: r.2, tokens: r.3.map(Int.init), learnable: r.4, actor: r.5,
                                        trigger: trigger))
            }
            guard !jobs.isEmpty,
                  let memory = try await Self.memory(tx, userID: user.id, version: nil, withLearner: true, logger: self.logger)
            else { return ([], nil) }
            var current = (version: memory.version, levels: memory.levelIDs)
            let outcome: LearningOutcome
            do {
                outcome = try await body(user, memory, jobs)
            } catch let failure as JobsUnlearnable {
                // Retrying cannot help (this server cannot read the stored
                // memory): the jobs are marked failed and the round commits,
                // so this user does not hold up everyone else's learning.
                let ids = jobs.map(\.id)
                try await tx.query("""
                    UPDATE learning_jobs SET state = 'failed', finished_at = clock_timestamp() WHERE id = ANY(\(ids))
                    """, logger: self.logger)
                let detail = String(decoding: try JSONSerialization.data(
                    withJSONObject: ["job_ids": ids, "reason": failure.reason] as [String: Any], options: [.sortedKeys]),
                                    as: UTF8.self)
                try await Self.audit(tx, userID: user.id, event: .learningFailed, from: current.version, to: current.version,
                                     actor: "system", causeID: nil, detail: detail, logger: self.logger)
                self.logger.error("learning jobs \(ids) of user \(user.id) failed: \(failure.reason)")
                return ([], (jobs, failure.reason))
            }
            precondition(outcome.changes.count == jobs.count, "one outcome per job")
            var applied: [AppliedJob] = []
            for (i, (job, (change, taught))) in zip(jobs, zip(outcome.changes, outcome.taughtTokens)).enumerated() {
                let from = current.version
                if let change {
                    // The round's final learner part is written once, below.
                    current = try await Self.apply(change, after: current, userID: user.id, setsLearner: false, tx: tx,
                                                   logger: self.logger)
                }
                try await Self.audit(tx, userID: user.id, event: AuditEventKind(job.kind.cause) ?? .learning, from: from,
                                     to: current.version, actor: job.actor, causeID: job.sourceID?.uuidString.lowercased(),
                                     detail: LearningOutcome.auditDetail(job: job, taught: taught, details: outcome.details[i]),
                                     logger: self.logger)
                for try await lag in try await tx.query("""
                    UPDATE learning_jobs SET state = 'done', applied_version = \(current.version), finished_at = clock_timestamp()
                    WHERE id = \(job.id) RETURNING EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8
                    """, logger: self.logger).decode(Double.self) {
                    applied.append((job, current.version, lag))
                }
            }
            let unconsolidated = LearningJob.unconsolidated(from: user.unconsolidatedTokens, after: jobs, taught: outcome.taughtTokens)
            let learned = jobs.contains { $0.kind != .consolidate }
            try await tx.query("""
                UPDATE users SET learner = \(outcome.learner), jobs_applied = jobs_applied + \(Int64(jobs.count)),
                    unconsolidated_tokens = \(unconsolidated),
                    last_learned_at = CASE WHEN \(learned) THEN clock_timestamp() ELSE last_learned_at END
                WHERE id = \(user.id)
                """, logger: self.logger)
            try await Self.writeMoments(outcome.moments, userID: user.id, tx: tx, logger: self.logger)
            if let trigger = outcome.consolidate {
                try await Self.enqueueConsolidation(userID: user.id, trigger: trigger, tx: tx, logger: self.logger)
            }
            try await Self.prune(userID: user.id, keep: keep, tx: tx, logger: self.logger)
            return (applied, nil)
        }
        if let f = round.failed { failed?(f.jobs, f.reason) }   // committed
        return round.applied
    }
}
