// Memory versions in PostgreSQL. Version n of a user is a memory_versions
// row naming one level_snapshots row (the level's weights) per stored level
// and holding its learner part (counters, recent contexts); users.version is
// the current version. What only the current version needs is the user's:
// users.learner (the learner part with the open chunks' accumulators, which
// every learning round rewrites) and level_moments (each level's optimizer
// moments, rewritten when the level takes a step). A level's snapshot is
// written only when that level changes. Every change runs in a
// transaction holding the user's row lock (FOR NO KEY UPDATE), so it waits
// for a learning round in progress and is applied wholly or not at all.
import Foundation
import Logging
import PostgresNIO

extension Database {
    // MARK: Versions

    /// The user's versions kept, newest first.
    public func versions(userID: Int64) async throws -> [MemoryVersion] {
        let rows = try await client.query("""
            SELECT version, parent, levels::text, cause, cause_id, actor, created_at FROM memory_versions
            WHERE user_id = \(userID) ORDER BY version DESC
            """, logger: logger)
        var out: [MemoryVersion] = []
        for try await r in rows.decode((Int64, Int64?, String, String, String?, String, Date).self) {
            guard let cause = MemoryCause(rawValue: r.3) else { throw Failure(description: "version \(r.0) of user \(userID) has an unknown cause '\(r.3)'") }
            out.append(MemoryVersion(version: r.0, parent: r.1, levels: try Self.levelMap(r.2), cause: cause, causeID: r.4,
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
                   u.jobs_applied, m.version = u.version
            FROM users u JOIN memory_versions m ON m.user_id = u.id AND m.version = COALESCE(\(version), u.version)
            WHERE u.id = \(userID)
            """, logger: logger)
        var found: (Int64, [String: Int64], Data?, Int64, Bool)?
        for try await r in rows.decode((Int64, String, Data?, Int64, Bool).self) { found = (r.0, try levelMap(r.1), r.2, r.3, r.4) }
        guard let (v, map, learner, jobsApplied, isCurrent) = found else { return nil }
        // The optimizer's moments are the current version's only.
        var moments: [String: Data] = [:]
        if withLevels && withLearner && isCurrent {
            for try await (name, data) in try await conn.query("""
                SELECT level, tensors FROM level_moments WHERE user_id = \(userID)
                """, logger: logger).decode((String, Data).self) {
                moments[name] = data
            }
        }
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
        return StoredMemory(userID: userID, version: v, levels: levels, levelIDs: map, moments: moments, learner: learner,
                            jobsApplied: jobsApplied)
    }

    /// Writes `change` as the version after `current` and makes it current.
    /// Runs inside the caller's transaction, which holds the user's row lock.
    /// `setsLearner` false: the user's current learner part and moments are
    /// left for the caller to write (a learning round writes its final ones
    /// once, after all its versions, rather than each version's in turn).
    static func apply(_ change: MemoryChange, after current: (version: Int64, levels: [String: Int64]), userID: Int64,
                      setsLearner: Bool = true, tx: PostgresConnection,
                      logger: Logger) async throws -> (version: Int64, levels: [String: Int64]) {
        var levels = current.levels
        for (name, part) in change.levels.sorted(by: { $0.key < $1.key }) {
            guard let data = part else { levels[name] = nil; continue }
            let rows = try await tx.query("""
                INSERT INTO level_snapshots (user_id, level, dtype, shapes, tensors)
                VALUES (\(userID), \(name), 'safetensors', \(change.shapes[name] ?? "{}")::jsonb, \(data)) RETURNING id
                """, logger: logger)
            for try await id in rows.decode(Int64.self) { levels[name] = id }
        }
        let version = current.version + 1
        try await commitVersion(userID: userID, version: version, parent: current.version, levels: levelJSON(levels),
                                learner: change.learner, working: change.working, cause: change.cause, causeID: change.causeID,
                                actor: change.actor, setsLearner: setsLearner, tx: tx, logger: logger)
        if setsLearner { try await writeMoments(change.moments, userID: userID, tx: tx, logger: logger) }
        return (version, levels)
    }

    /// Writes the user's optimizer moments by level (nil: the level's
    /// optimizer starts afresh, its row is deleted); levels not named keep theirs.
    static func writeMoments(_ moments: [String: Data?], userID: Int64, tx: PostgresConnection, logger: Logger) async throws {
        for (name, part) in moments.sorted(by: { $0.key < $1.key }) {
            if let part {
                try await tx.query("""
                    INSERT INTO level_moments (user_id, level, tensors) VALUES (\(userID), \(name), \(part))
                    ON CONFLICT (user_id, level) DO UPDATE SET tensors = EXCLUDED.tensors
                    """, logger: logger)
            } else {
                try await tx.query("DELETE FROM level_moments WHERE user_id = \(userID) AND level = \(name)", logger: logger)
            }
        }
    }

    /// Inserts version `version` (levels: JSON map of level name to snapshot
    /// id; `learner` its learner part) and makes it the user's current one,
    /// with `working` (nil: `learner`) as the user's learner part unless
    /// `setsLearner` is false.
    static func commitVersion(userID: Int64, version: Int64, parent: Int64, levels: String, learner: Data?, working: Data? = nil,
                              cause: MemoryCause, causeID: String?, actor: String, setsLearner: Bool = true, tx: PostgresConnection,
                              logger: Logger) async throws {
        try await tx.query("""
            INSERT INTO memory_versions (user_id, version, parent, levels, learner, cause, cause_id, actor)
            VALUES (\(userID), \(version), \(parent), \(levels)::jsonb, \(learner), \(cause.rawValue), \(causeID), \(actor))
            """, logger: logger)
        // A consolidation or a reset leaves nothing to consolidate.
        let settled = cause == .consolidate || cause == .reset
        if setsLearner {
            try await tx.query("""
                UPDATE users SET version = \(version), learner = \(working ?? learner),
                    unconsolidated_tokens = CASE WHEN \(settled) THEN 0 ELSE unconsolidated_tokens END
                WHERE id = \(userID)
                """, logger: logger)
        } else {
            try await tx.query("""
                UPDATE users SET version = \(version),
                    unconsolidated_tokens = CASE WHEN \(settled) THEN 0 ELSE unconsolidated_tokens END
                WHERE id = \(userID)
                """, logger: logger)
        }
    }

    /// Version 0 of a new user: the backbone, no level stored.
    static func insertCreatedVersion(userID: Int64, actor: String, tx: PostgresConnection, logger: Logger) async throws {
        try await tx.query("""
            INSERT INTO memory_versions (user_id, version, levels, cause, actor)
            VALUES (\(userID), 0, '{}'::jsonb, 'created', \(actor))
            """, logger: logger)
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
            try await Self.audit(tx, userID: userID, event: AuditEventKind(change.cause) ?? .learning, from: current.version, to: next.version, actor: change.actor,
                                 causeID: change.causeID, logger: self.logger)
            try await Self.prune(userID: userID, keep: keep, tx: tx, logger: self.logger)
            return MemoryMutation(version: next.version, cancelledJobs: cancelled)
        }
    }

    /// Marks the user's queued jobs `cancelled` (in the caller's transaction,
    /// which holds the user's row lock, so no round is applying them), with a
    /// `learning_cancelled` audit event naming them and the operation that
    /// cancelled them. Returns their ids.
    static func cancelQueued(userID: Int64, version: Int64, cause: MemoryCause, actor: String, tx: PostgresConnection,
                             logger: Logger) async throws -> [Int64] {
        var ids: [Int64] = []
        for try await id in try await tx.query("""
            UPDATE learning_jobs SET state = 'cancelled', finished_at = clock_timestamp()
            WHERE user_id = \(userID) AND state = 'queued' RETURNING id
            """, logger: logger).decode(Int64.self) { ids.append(id) }
        guard !ids.isEmpty else { return [] }
        ids.sort()
        let detail = String(decoding: try JSONSerialization.data(withJSONObject: ["job_ids": ids, "by": cause.rawValue] as [String: Any],
                                                                 options: [.sortedKeys]), as: UTF8.self)
        try await audit(tx, userID: userID, event: .learningCancelled, from: version, to: version, actor: actor, causeID: cause.rawValue,
                        detail: detail, logger: logger)
        return ids
    }

    /// Makes `target` (a new user of the same tenant) a copy of the source
    /// user's memory at `version` (the current one when nil): its levels'
    /// snapshots are copied, so erasing either user leaves the other whole;
    /// at the current version the optimizer's state too.
    /// Fails when the target exists or the version is not kept.
    public func forkUser(source: User, version: Int64?, target targetName: UserName, actor: String) async throws -> User {
        let target = targetName.value
        try await transaction { tx in
            guard let memory = try await Self.memory(tx, userID: source.id, version: version, withLearner: true, withLevels: false,
                                                     logger: self.logger)
            else { throw NotFound(description: "version \(version ?? -1) of user '\(source.name)' is not kept") }
            var newID: Int64?
            for try await id in try await tx.query("""
                INSERT INTO users (tenant_id, name) VALUES (\(source.tenantID), \(target))
                ON CONFLICT (tenant_id, name) DO NOTHING RETURNING id
                """, logger: self.logger).decode(Int64.self) { newID = id }
            guard let id = newID else { throw Conflict(description: "user '\(target)' already exists") }
            try await Self.insertCreatedVersion(userID: id, actor: actor, tx: tx, logger: self.logger)
            let copied = !memory.levelIDs.isEmpty || memory.learner != nil
            // The version's own learner part; at the source's current version the copy also
            // takes its optimizer's state (memory.learner is then the user's learner part).
            var versionLearner: Data?, isCurrent = false
            for try await r in try await tx.query("""
                SELECT m.learner, m.version = u.version FROM memory_versions m JOIN users u ON u.id = m.user_id
                WHERE m.user_id = \(source.id) AND m.version = \(memory.version)
                """, logger: self.logger).decode((Data?, Bool).self) {
                (versionLearner, isCurrent) = r
            }
            if copied {
                // The source's snapshot rows are copied in the database, so erasing either user leaves the other whole.
                var levels: [String: Int64] = [:]
                for (name, snapshot) in memory.levelIDs.sorted(by: { $0.key < $1.key }) {
                    for try await copy in try await tx.query("""
                        INSERT INTO level_snapshots (user_id, level, dtype, shapes, tensors)
                        SELECT \(id), level, dtype, shapes, tensors FROM level_snapshots WHERE user_id = \(source.id) AND id = \(snapshot)
                        RETURNING id
                        """, logger: self.logger).decode(Int64.self) { levels[name] = copy }
                    guard levels[name] != nil else { throw Failure(description: "level snapshot \(snapshot) of user \(source.id) is missing") }
                }
                try await Self.commitVersion(userID: id, version: 1, parent: 0, levels: Self.levelJSON(levels), learner: versionLearner,
                                             working: isCurrent ? memory.learner : nil, cause: .fork,
                                             causeID: "\(source.name)@\(memory.version)", actor: actor, tx: tx, logger: self.logger)
                if isCurrent {
                    try await tx.query("""
                        INSERT INTO level_moments (user_id, level, tensors)
                        SELECT \(id), level, tensors FROM level_moments WHERE user_id = \(source.id)
                        """, logger: self.logger)
                }
            }
            try await Self.audit(tx, userID: id, event: .fork, from: nil, to: copied ? 1 : 0,
                                 actor: actor, causeID: "\(source.name)@\(memory.version)", logger: self.logger)
        }
        guard let user = try await user(tenantID: source.tenantID, name: targetName) else {
            throw Failure(description: "the forked user '\(target)' was not created")
        }
        return user
    }

    /// Makes kept version `version` current again, as a new version naming
    /// the same level snapshots and holding the same learner part; its
    /// optimizer starts afresh (no moments, the open chunks empty). Waits for
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
                SELECT levels::text, learner FROM memory_versions WHERE user_id = \(userID) AND version = \(version)
                """, logger: self.logger).decode((String, Data?).self) { target = r }
            guard let (levels, learner) = target else { return .notKept }
            let cancelled = cancelQueued
                ? try await Self.cancelQueued(userID: userID, version: current, cause: .rollback, actor: actor, tx: tx,
                                              logger: self.logger)
                : []
            let next = current + 1
            try await Self.commitVersion(userID: userID, version: next, parent: current, levels: levels, learner: learner,
                                         cause: .rollback, causeID: String(version), actor: actor, tx: tx, logger: self.logger)
            // The version's weights and counters; its optimizer starts afresh.
            try await tx.query("DELETE FROM level_moments WHERE user_id = \(userID)", logger: self.logger)
            try await Self.audit(tx, userID: userID, event: .rollback, from: current, to: next, actor: actor,
                                 causeID: String(version), detail: "{\"restored\": \(version)}", logger: self.logger)
            try await Self.prune(userID: userID, keep: keep, tx: tx, logger: self.logger)
            return .rolledBack(MemoryMutation(version: next, cancelledJobs: cancelled))
        }
    }
}
