// Users and their memories: versions of level weights with provenance,
// generations, feedback and the learning-job queue. Every query names the
// tenant or a user id resolved within it.
//
// A user's memory version n is a row of memory_versions naming one
// level_snapshots row per level that has changed since the user started
// (a level without a row is a fresh level) and holding the learner part at
// that version. users.version is the current version and users.learner the
// current learner part, which every learning job rewrites, while a level's
// snapshot is written only when that level changes. Version 0 is the backbone.
import Foundation
import Logging
import Model
import PostgresNIO

/// A user of a tenant.
public struct User: Sendable, Equatable {
    public let id: Int64
    public let tenantID: Int64
    public let name: String
    /// The current memory version.
    public let version: Int64
    /// Learning jobs applied.
    public let jobsApplied: Int64
    /// Whether the tenant lets its users' memories learn.
    public let learning: Bool
    /// Frozen by a drift policy or an operator: no learning until cleared.
    public let frozen: Bool
    public let createdAt: Date

    /// Whether this user's requests are learned.
    public var learns: Bool { learning && !frozen }
}

/// One version of a user's memory.
public struct MemoryVersion: Sendable, Equatable {
    public let version: Int64
    public let parent: Int64?
    /// Snapshot id per level that differs from a fresh level.
    public let levels: [String: Int64]
    /// What made it: created, learning, feedback, reset, fork, rollback, consolidate.
    public let cause: String
    /// The generation or feedback id, or the source of a fork or rollback.
    public let causeID: String?
    /// Who: "key:<id>" of the API key whose request caused it, or "operator".
    public let actor: String
    public let createdAt: Date
}

/// A user's memory at one version: level parts by level name and the learner part.
public struct StoredMemory: Sendable {
    public let userID: Int64
    public let version: Int64
    /// Level parts by level name (empty when read without them).
    public let levels: [String: Data]
    /// Snapshot id per stored level (a level without one is fresh).
    public let levelIDs: [String: Int64]
    public let learner: Data?
    /// Learning jobs applied to the user so far (read with the rest, so consistent with the learner's counters).
    public let jobsApplied: Int64
}

/// A change to a user's memory that makes a new version.
public struct MemoryChange: Sendable {
    /// Levels whose weights changed: the new part, or nil for a fresh level.
    public var levels: [String: Data?]
    /// The learner part after the change (nil: fresh).
    public var learner: Data?
    public var cause: String
    public var causeID: String?
    public var actor: String

    public init(levels: [String: Data?], learner: Data?, cause: String, causeID: String? = nil, actor: String) {
        self.levels = levels
        self.learner = learner
        self.cause = cause
        self.causeID = causeID
        self.actor = actor
    }
}

/// Where a learning job is: waiting, applied, refused (the stored memory
/// cannot be read by this server) or cancelled (a reset, rollback or import
/// came after it).
public enum JobState: String, Sendable, CaseIterable {
    case queued, done, failed, cancelled
}

/// What a memory operation (reset, rollback, import, consolidation) did:
/// the version current afterwards and the queued jobs it cancelled.
public struct MemoryMutation: Sendable, Equatable {
    public let version: Int64
    public let cancelledJobs: [Int64]
}

/// A queued learning job.
public struct LearningJob: Sendable, Equatable {
    public let id: Int64
    /// generation or feedback
    public let kind: String
    public let sourceID: UUID?
    public let tokens: [Int]
    public let learnable: [Bool]
    public let actor: String
}

/// What a learning job is made of, when a request enqueues one.
public struct LearningRequest: Sendable {
    public let tokens: [Int]
    public let learnable: [Bool]
    public init(tokens: [Int], learnable: [Bool]) {
        precondition(tokens.count == learnable.count)
        self.tokens = tokens
        self.learnable = learnable
    }
}

/// What the worker made of a claimed batch of jobs.
public struct LearningOutcome: Sendable {
    /// Per job in claim order: the change it made to the levels (nil: it only
    /// accumulated), which becomes a version.
    public var changes: [MemoryChange?]
    /// The learner part after the last job.
    public var learner: Data?

    public init(changes: [MemoryChange?], learner: Data?) {
        self.changes = changes
        self.learner = learner
    }
}

/// A stored generation, for feedback.
public struct StoredGeneration: Sendable {
    public let id: UUID
    public let userID: Int64
    public let memoryVersion: Int64
    public let promptTokens: [Int]
    public let completionTokens: [Int]
}

extension Database {
    // MARK: Users

    static let userColumns = "u.id, u.tenant_id, u.name, u.version, u.jobs_applied, t.learning, u.frozen, u.created_at"
    typealias UserRow = (Int64, Int64, String, Int64, Int64, Bool, Bool, Date)

    static func user(_ r: UserRow) -> User {
        User(id: r.0, tenantID: r.1, name: r.2, version: r.3, jobsApplied: r.4, learning: r.5, frozen: r.6, createdAt: r.7)
    }

    /// The tenant's user named `name`; created (at version 0) when `create` and missing.
    public func user(tenantID: Int64, name userName: UserName, create: Bool = false) async throws -> User? {
        let name = userName.value
        if create {
            try await transaction { tx in
                let rows = try await tx.query("""
                    INSERT INTO users (tenant_id, name) VALUES (\(tenantID), \(name)) ON CONFLICT (tenant_id, name) DO NOTHING
                    RETURNING id
                    """, logger: logger)
                for try await id in rows.decode(Int64.self) {
                    try await Self.insertCreatedVersion(userID: id, actor: "server", tx: tx, logger: logger)
                }
            }
        }
        let rows = try await client.query("""
            SELECT \(unescaped: Self.userColumns) FROM users u JOIN tenants t ON t.id = u.tenant_id
            WHERE u.tenant_id = \(tenantID) AND u.name = \(name)
            """, logger: logger)
        for try await r in rows.decode(UserRow.self) { return Self.user(r) }
        return nil
    }

    /// The tenant's user with this id.
    public func user(id: Int64, tenantID: Int64) async throws -> User? {
        for try await r in try await client.query("""
            SELECT \(unescaped: Self.userColumns) FROM users u JOIN tenants t ON t.id = u.tenant_id
            WHERE u.tenant_id = \(tenantID) AND u.id = \(id)
            """, logger: logger).decode(UserRow.self) {
            return Self.user(r)
        }
        return nil
    }

    /// The tenant's users, by name.
    public func users(tenantID: Int64) async throws -> [User] {
        let rows = try await client.query("""
            SELECT \(unescaped: Self.userColumns) FROM users u JOIN tenants t ON t.id = u.tenant_id
            WHERE u.tenant_id = \(tenantID) ORDER BY u.name
            """, logger: logger)
        var out: [User] = []
        for try await r in rows.decode(UserRow.self) { out.append(Self.user(r)) }
        return out
    }

    /// Erases the user: every row that holds their data (generations,
    /// feedback, jobs, versions, snapshots, audit events and drift reports)
    /// goes with the user row; a content-free tombstone (event, time, actor,
    /// the internal id) stays in the audit log. False when the tenant has no such user.
    public func eraseUser(tenantID: Int64, name userName: UserName, actor: String) async throws -> Bool {
        let name = userName.value
        return try await transaction { tx in
            var erased: (Int64, Int64)?
            for try await r in try await tx.query("""
                DELETE FROM users WHERE tenant_id = \(tenantID) AND name = \(name) RETURNING id, version
                """, logger: self.logger).decode((Int64, Int64).self) { erased = r }
            guard let (id, version) = erased else { return false }
            try await tx.query("""
                INSERT INTO audit_events (tenant_id, user_id, event, from_version, actor, detail)
                VALUES (\(tenantID), NULL, 'erase', \(version), \(actor), jsonb_build_object('user_id', \(id)))
                """, logger: self.logger)
            return true
        }
    }

    // MARK: Versions

    /// The user's versions kept, newest first.
    public func versions(userID: Int64) async throws -> [MemoryVersion] {
        let rows = try await client.query("""
            SELECT version, parent, levels::text, cause, cause_id, actor, created_at FROM memory_versions
            WHERE user_id = \(userID) ORDER BY version DESC
            """, logger: logger)
        var out: [MemoryVersion] = []
        for try await r in rows.decode((Int64, Int64?, String, String, String?, String, Date).self) {
            out.append(MemoryVersion(version: r.0, parent: r.1, levels: try Self.levelMap(r.2), cause: r.3, causeID: r.4,
                                     actor: r.5, createdAt: r.6))
        }
        return out
    }

    static func levelMap(_ json: String) throws -> [String: Int64] {
        try JSONDecoder().decode([String: Int64].self, from: Data(json.utf8))
    }

    static func levelJSON(_ map: [String: Int64]) -> String {
        let e = JSONEncoder()
        e.outputFormatting = .sortedKeys
        return String(decoding: (try? e.encode(map)) ?? Data("{}".utf8), as: UTF8.self)
    }

    /// The user's memory at `version` (the current one when nil), or nil when
    /// that version is not kept. `withLearner: false` skips the learner part
    /// (generation needs only the weights), `withLevels: false` the level
    /// parts (counters need only the learner part).
    public func memory(userID: Int64, version: Int64? = nil, withLearner: Bool = true, withLevels: Bool = true) async throws
        -> StoredMemory? {
        try await client.withConnection { conn in
            try await Self.memory(conn, userID: userID, version: version, withLearner: withLearner, withLevels: withLevels,
                                  logger: self.logger)
        }
    }

    static func memory(_ conn: PostgresConnection, userID: Int64, version: Int64?, withLearner: Bool, withLevels: Bool = true,
                       logger: Logger) async throws -> StoredMemory? {
        // The current version's learner part is users.learner; an older one's, its version row's.
        let rows = try await conn.query("""
            SELECT m.version, m.levels::text,
                   CASE WHEN NOT \(withLearner) THEN NULL WHEN m.version = u.version THEN u.learner ELSE m.learner END,
                   u.jobs_applied
            FROM users u JOIN memory_versions m ON m.user_id = u.id AND m.version = COALESCE(\(version), u.version)
            WHERE u.id = \(userID)
            """, logger: logger)
        var found: (Int64, [String: Int64], Data?, Int64)?
        for try await r in rows.decode((Int64, String, Data?, Int64).self) { found = (r.0, try levelMap(r.1), r.2, r.3) }
        guard let (v, map, learner, jobsApplied) = found else { return nil }
        var levels: [String: Data] = [:]
        if withLevels && !map.isEmpty {
            let ids = Array(map.values)
            var byID: [Int64: Data] = [:]
            for try await (id, data) in try await conn.query("""
                SELECT id, tensors FROM level_snapshots WHERE user_id = \(userID) AND id = ANY(\(ids))
                """, logger: logger).decode((Int64, Data).self) {
                byID[id] = data
            }
            for (name, id) in map {
                guard let data = byID[id] else { throw Failure(description: "level snapshot \(id) of user \(userID) is missing") }
                levels[name] = data
            }
        }
        return StoredMemory(userID: userID, version: v, levels: levels, levelIDs: map, learner: learner, jobsApplied: jobsApplied)
    }

    /// Writes `change` as the version after `current` and makes it current.
    /// Runs inside the caller's transaction, which holds the user's row lock.
    static func apply(_ change: MemoryChange, after current: (version: Int64, levels: [String: Int64]), userID: Int64,
                      tx: PostgresConnection, logger: Logger) async throws -> (version: Int64, levels: [String: Int64]) {
        var levels = current.levels
        for (name, part) in change.levels.sorted(by: { $0.key < $1.key }) {
            guard let data = part else { levels[name] = nil; continue }
            let rows = try await tx.query("""
                INSERT INTO level_snapshots (user_id, level, dtype, shapes, tensors)
                VALUES (\(userID), \(name), 'safetensors', \(Self.safetensorsShapes(data))::jsonb, \(data)) RETURNING id
                """, logger: logger)
            for try await id in rows.decode(Int64.self) { levels[name] = id }
        }
        let version = current.version + 1
        try await commitVersion(userID: userID, version: version, parent: current.version, levels: levelJSON(levels),
                                learner: change.learner, cause: change.cause, causeID: change.causeID, actor: change.actor,
                                tx: tx, logger: logger)
        return (version, levels)
    }

    /// Inserts version `version` (levels: JSON map of level name to snapshot id)
    /// and makes it, with its learner part, the user's current one.
    static func commitVersion(userID: Int64, version: Int64, parent: Int64, levels: String, learner: Data?, cause: String,
                              causeID: String?, actor: String, tx: PostgresConnection, logger: Logger) async throws {
        try await tx.query("""
            INSERT INTO memory_versions (user_id, version, parent, levels, learner, cause, cause_id, actor)
            VALUES (\(userID), \(version), \(parent), \(levels)::jsonb, \(learner), \(cause), \(causeID), \(actor))
            """, logger: logger)
        try await tx.query("UPDATE users SET version = \(version), learner = \(learner) WHERE id = \(userID)", logger: logger)
    }

    /// Version 0 of a new user: the backbone, no level stored.
    static func insertCreatedVersion(userID: Int64, actor: String, tx: PostgresConnection, logger: Logger) async throws {
        try await tx.query("""
            INSERT INTO memory_versions (user_id, version, levels, cause, actor)
            VALUES (\(userID), 0, '{}'::jsonb, 'created', \(actor))
            """, logger: logger)
    }

    /// The tensors' dtypes and shapes from a safetensors header, as JSON
    /// ({"name": {"dtype", "shape"}}), for the snapshot's metadata columns;
    /// "{}" when the bytes are not a valid container (Model's codec decides).
    static func safetensorsShapes(_ data: Data) -> String {
        guard let header = try? Safetensors.parse(data) else { return "{}" }
        let out: [String: Any] = header.entries.mapValues { ["dtype": $0.dtype.rawValue, "shape": $0.shape] }
        let json = (try? JSONSerialization.data(withJSONObject: out, options: [.sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: json, as: UTF8.self)
    }

    /// Drops versions older than the newest `keep` (never the current one)
    /// and the snapshots no kept version names.
    static func prune(userID: Int64, keep: Int, tx: PostgresConnection, logger: Logger) async throws {
        try await tx.query("""
            DELETE FROM memory_versions m USING users u
            WHERE m.user_id = \(userID) AND u.id = m.user_id AND m.version <> u.version
              AND m.version <= (SELECT max(version) FROM memory_versions WHERE user_id = \(userID)) - \(Int64(keep))
            """, logger: logger)
        try await tx.query("""
            DELETE FROM level_snapshots s WHERE s.user_id = \(userID) AND NOT EXISTS (
                SELECT 1 FROM memory_versions m, jsonb_each_text(m.levels) e
                WHERE m.user_id = \(userID) AND e.value::bigint = s.id)
            """, logger: logger)
    }

    /// Runs `body` on the user's current memory with the user's row locked
    /// (waiting for a learning job in progress), then writes what it returns
    /// as a new version; nil leaves the memory as it is. With
    /// `cancelQueued`, a change also cancels the user's jobs queued before
    /// it (see `cancelQueued`). Returns the version current afterwards.
    public func mutateMemory(userID: Int64, keep: Int, cancelQueued: Bool = false,
                             _ body: @Sendable (StoredMemory) async throws -> MemoryChange?) async throws -> MemoryMutation {
        try await transaction { tx in
            for try await _ in try await tx.query("SELECT id FROM users WHERE id = \(userID) FOR NO KEY UPDATE",
                                                  logger: self.logger).decode(Int64.self) {}
            guard let current = try await Self.memory(tx, userID: userID, version: nil, withLearner: true, logger: self.logger)
            else { throw Failure(description: "user \(userID) has no current memory version") }
            guard let change = try await body(current) else { return MemoryMutation(version: current.version, cancelledJobs: []) }
            let cancelled = cancelQueued
                ? try await Self.cancelQueued(userID: userID, version: current.version, cause: change.cause, actor: change.actor,
                                              tx: tx, logger: self.logger)
                : []
            let next = try await Self.apply(change, after: (current.version, current.levelIDs), userID: userID, tx: tx,
                                            logger: self.logger)
            try await Self.audit(tx, userID: userID, event: change.cause, from: current.version, to: next.version, actor: change.actor,
                                 causeID: change.causeID, logger: self.logger)
            try await Self.prune(userID: userID, keep: keep, tx: tx, logger: self.logger)
            return MemoryMutation(version: next.version, cancelledJobs: cancelled)
        }
    }

    /// Marks the user's queued jobs `cancelled` (in the caller's transaction,
    /// which holds the user's row lock, so no round is applying them), with a
    /// `learning_cancelled` audit event naming them and the operation that
    /// cancelled them. Returns their ids.
    static func cancelQueued(userID: Int64, version: Int64, cause: String, actor: String, tx: PostgresConnection,
                             logger: Logger) async throws -> [Int64] {
        var ids: [Int64] = []
        for try await id in try await tx.query("""
            UPDATE learning_jobs SET state = 'cancelled', finished_at = clock_timestamp()
            WHERE user_id = \(userID) AND state = 'queued' RETURNING id
            """, logger: logger).decode(Int64.self) { ids.append(id) }
        guard !ids.isEmpty else { return [] }
        ids.sort()
        let detail = String(decoding: try JSONSerialization.data(withJSONObject: ["job_ids": ids, "by": cause] as [String: Any],
                                                                 options: [.sortedKeys]), as: UTF8.self)
        try await audit(tx, userID: userID, event: "learning_cancelled", from: version, to: version, actor: actor, causeID: cause,
                        detail: detail, logger: logger)
        return ids
    }

    /// Makes `target` (a new user of the same tenant) a copy of the source
    /// user's memory at `version` (the current one when nil): its levels'
    /// snapshots are copied, so erasing either user leaves the other whole.
    /// Fails when the target exists or the version is not kept.
    public func forkUser(source: User, version: Int64?, target targetName: UserName, actor: String) async throws -> User {
        let target = targetName.value
        try await transaction { tx in
            guard let memory = try await Self.memory(tx, userID: source.id, version: version, withLearner: true, logger: self.logger)
            else { throw NotFound(description: "version \(version ?? -1) of user '\(source.name)' is not kept") }
            var newID: Int64?
            for try await id in try await tx.query("""
                INSERT INTO users (tenant_id, name) VALUES (\(source.tenantID), \(target))
                ON CONFLICT (tenant_id, name) DO NOTHING RETURNING id
                """, logger: self.logger).decode(Int64.self) { newID = id }
            guard let id = newID else { throw Conflict(description: "user '\(target)' already exists") }
            try await Self.insertCreatedVersion(userID: id, actor: actor, tx: tx, logger: self.logger)
            if !memory.levels.isEmpty || memory.learner != nil {
                let change = MemoryChange(levels: memory.levels.mapValues { Optional($0) }, learner: memory.learner,
                                          cause: "fork", causeID: "\(source.name)@\(memory.version)", actor: actor)
                _ = try await Self.apply(change, after: (0, [:]), userID: id, tx: tx, logger: self.logger)
            }
            try await Self.audit(tx, userID: id, event: "fork", from: nil, to: memory.levels.isEmpty && memory.learner == nil ? 0 : 1,
                                 actor: actor, causeID: "\(source.name)@\(memory.version)", logger: self.logger)
        }
        guard let user = try await user(tenantID: source.tenantID, name: targetName) else {
            throw Failure(description: "the forked user '\(target)' was not created")
        }
        return user
    }

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
            return try await Self.enqueue(job, kind: "generation", source: id, userID: userID, actor: actor, tx: tx, logger: logger)
        }
    }

    static func enqueue(_ job: LearningRequest, kind: String, source: UUID, userID: Int64, actor: String,
                        tx: PostgresConnection, logger: Logger) async throws -> Int64 {
        for try await jobID in try await tx.query("""
            INSERT INTO learning_jobs (user_id, kind, source_id, tokens, learnable, actor)
            VALUES (\(userID), \(kind), \(source), \(job.tokens.map(Int32.init)), \(job.learnable), \(actor)) RETURNING id
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
            return (id, try await Self.enqueue(job, kind: "feedback", source: id, userID: generation.userID, actor: actor,
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

    /// What a rollback did.
    public enum RollbackOutcome: Sendable, Equatable {
        /// The new version, and the queued jobs cancelled.
        case rolledBack(MemoryMutation)
        /// The version asked for is not kept.
        case notKept
        /// `ifCurrent` was given and the user's current version is another one (nothing changed).
        case moved(current: Int64)
    }

    /// Makes kept version `version` current again, as a new version naming
    /// the same level snapshots and holding the same learner part. Waits for
    /// a learning round in progress. With `ifCurrent`, only when that is
    /// still the user's current version (a policy acting on the version it
    /// measured). With `cancelQueued`, the user's queued jobs are cancelled
    /// (they were made before the rollback, against what it undoes).
    public func rollback(userID: Int64, to version: Int64, keep: Int, actor: String, cancelQueued: Bool = false,
                         ifCurrent: Int64? = nil) async throws -> RollbackOutcome {
        try await transaction { tx in
            var current: Int64?
            for try await v in try await tx.query("SELECT version FROM users WHERE id = \(userID) FOR NO KEY UPDATE",
                                                  logger: self.logger).decode(Int64.self) { current = v }
            guard let current else { return .notKept }
            if let ifCurrent, ifCurrent != current { return .moved(current: current) }
            var target: (String, Data?)?
            for try await r in try await tx.query("""
                SELECT m.levels::text, CASE WHEN m.version = u.version THEN u.learner ELSE m.learner END
                FROM memory_versions m JOIN users u ON u.id = m.user_id
                WHERE m.user_id = \(userID) AND m.version = \(version)
                """, logger: self.logger).decode((String, Data?).self) { target = r }
            guard let (levels, learner) = target else { return .notKept }
            let cancelled = cancelQueued
                ? try await Self.cancelQueued(userID: userID, version: current, cause: "rollback", actor: actor, tx: tx,
                                              logger: self.logger)
                : []
            let next = current + 1
            try await Self.commitVersion(userID: userID, version: next, parent: current, levels: levels, learner: learner,
                                         cause: "rollback", causeID: String(version), actor: actor, tx: tx, logger: self.logger)
            try await Self.audit(tx, userID: userID, event: "rollback", from: current, to: next, actor: actor,
                                 causeID: String(version), detail: "{\"restored\": \(version)}", logger: self.logger)
            try await Self.prune(userID: userID, keep: keep, tx: tx, logger: self.logger)
            return .rolledBack(MemoryMutation(version: next, cancelledJobs: cancelled))
        }
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
                SELECT id, kind, source_id, tokens, learnable, actor FROM learning_jobs
                WHERE user_id = \(user.id) AND state = 'queued' ORDER BY id LIMIT \(limit)
                """, logger: self.logger).decode((Int64, String, UUID?, [Int32], [Bool], String).self) {
                jobs.append(LearningJob(id: r.0, kind: r.1, sourceID: r.2, tokens: r.3.map(Int.init), learnable: r.4, actor: r.5))
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
                try await Self.audit(tx, userID: user.id, event: "learning_failed", from: current.version, to: current.version,
                                     actor: "system", causeID: nil, detail: detail, logger: self.logger)
                self.logger.error("learning jobs \(ids) of user \(user.id) failed: \(failure.reason)")
                return ([], (jobs, failure.reason))
            }
            precondition(outcome.changes.count == jobs.count, "one outcome per job")
            var applied: [AppliedJob] = []
            for (job, change) in zip(jobs, outcome.changes) {
                let from = current.version
                if let change { current = try await Self.apply(change, after: current, userID: user.id, tx: tx, logger: self.logger) }
                try await Self.audit(tx, userID: user.id, event: job.kind == "feedback" ? "feedback" : "learning", from: from,
                                     to: current.version, actor: job.actor, causeID: job.sourceID?.uuidString.lowercased(),
                                     detail: "{\"job_id\": \(job.id), \"learnable_tokens\": \(job.learnable.dropFirst().filter { $0 }.count)}",
                                     logger: self.logger)
                for try await lag in try await tx.query("""
                    UPDATE learning_jobs SET state = 'done', applied_version = \(current.version), finished_at = clock_timestamp()
                    WHERE id = \(job.id) RETURNING EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8
                    """, logger: self.logger).decode(Double.self) {
                    applied.append((job, current.version, lag))
                }
            }
            try await tx.query("""
                UPDATE users SET learner = \(outcome.learner), jobs_applied = jobs_applied + \(Int64(jobs.count))
                WHERE id = \(user.id)
                """, logger: self.logger)
            try await Self.prune(userID: user.id, keep: keep, tx: tx, logger: self.logger)
            return (applied, nil)
        }
        if let f = round.failed { failed?(f.jobs, f.reason) }   // committed
        return round.applied
    }
}

/// A job `learnNext` applied: the memory version current after it, and its
/// lag in seconds (enqueue to commit).
public typealias AppliedJob = (job: LearningJob, version: Int64, lagSeconds: Double)

/// Thrown by a `learnNext` body when the user's jobs can never be applied by
/// this server (their stored memory cannot be read, e.g. it was made under
/// another level configuration or backbone): `learnNext` marks the jobs
/// `failed` with a `learning_failed` audit event instead of retrying them.
public struct JobsUnlearnable: Error, CustomStringConvertible {
    public let reason: String
    public init(reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// A row that a request names does not exist (→ 404).
public struct NotFound: Error, CustomStringConvertible {
    public let description: String
}

/// A row that a request would create exists already (→ 409).
public struct Conflict: Error, CustomStringConvertible {
    public let description: String
}
