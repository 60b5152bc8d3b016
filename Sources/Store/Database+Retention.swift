// Retention: what the database keeps and for how long. Rows that only record
// the past (finished learning jobs with their token arrays, generations kept
// for feedback, drift reports of versions no longer kept, audit events) are
// deleted once older than their retention; nothing a user's current memory,
// a kept version or a queued job needs is ever pruned:
//   * learning jobs: only finished ones (done, failed, cancelled), by finished_at;
//   * generations (and the feedback on them): by created_at; feedback on a
//     pruned generation answers 404;
//   * drift reports: by computed_at, except each user's newest report and the
//     reports of versions still kept (rollback policies and rankings read those);
//   * audit events: by created_at, erasure tombstones included.
// Deletes run in batches, each its own statement, so no lock is held long.
import Foundation
import PostgresNIO

/// How long each kind of record is kept, in seconds (nil: forever).
public struct Retention: Sendable, Equatable {
    public var finishedJobs: Double?
    public var generations: Double?
    public var driftReports: Double?
    public var auditEvents: Double?

    public init(finishedJobs: Double? = nil, generations: Double? = nil, driftReports: Double? = nil, auditEvents: Double? = nil) {
        self.finishedJobs = finishedJobs
        self.generations = generations
        self.driftReports = driftReports
        self.auditEvents = auditEvents
    }
}

/// Rows a pruning pass deleted, per kind.
public struct PruneCounts: Sendable, Equatable {
    public var finishedJobs = 0
    public var generations = 0
    public var driftReports = 0
    public var auditEvents = 0
    public var total: Int { finishedJobs + generations + driftReports + auditEvents }
}

extension Database {
    /// Rows deleted per statement.
    static let pruneBatch = 5000

    /// Deletes what `retention` no longer keeps, as of `now`.
    public func prune(_ retention: Retention, now: Date = Date()) async throws -> PruneCounts {
        var counts = PruneCounts()
        func cutoff(_ seconds: Double?) -> Date? { seconds.map { now.addingTimeInterval(-$0) } }
        if let c = cutoff(retention.finishedJobs) {
            counts.finishedJobs = try await deleteInBatches("""
                DELETE FROM learning_jobs WHERE id IN (
                    SELECT id FROM learning_jobs WHERE state <> 'queued' AND finished_at < $1 LIMIT $2)
                """, before: c)
        }
        if let c = cutoff(retention.generations) {
            counts.generations = try await deleteInBatches("""
                DELETE FROM generations WHERE id IN (SELECT id FROM generations WHERE created_at < $1 LIMIT $2)
                """, before: c)
        }
        if let c = cutoff(retention.driftReports) {
            counts.driftReports = try await deleteInBatches("""
                DELETE FROM drift_reports d WHERE (d.user_id, d.version) IN (
                    SELECT r.user_id, r.version FROM drift_reports r
                    WHERE r.computed_at < $1
                      AND NOT EXISTS (SELECT 1 FROM memory_versions m WHERE m.user_id = r.user_id AND m.version = r.version)
                      AND r.version < (SELECT max(n.version) FROM drift_reports n WHERE n.user_id = r.user_id)
                    LIMIT $2)
                """, before: c)
        }
        // Expired browser sessions are never of use.
        try await client.query("DELETE FROM sessions WHERE expires_at <= \(now)", logger: logger)
        if let c = cutoff(retention.auditEvents) {
            counts.auditEvents = try await deleteInBatches("""
                DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events WHERE created_at < $1 LIMIT $2)
                """, before: c)
        }
        return counts
    }

    /// Runs a `DELETE … $1 (cutoff) … LIMIT $2 (batch)` until a batch deletes fewer than a full batch.
    private func deleteInBatches(_ sql: String, before cutoff: Date) async throws -> Int {
        var total = 0
        while true {
            var binds = PostgresBindings()
            binds.append(cutoff)
            binds.append(Int64(Self.pruneBatch))
            let rows = try await client.query(PostgresQuery(unsafeSQL: sql + " RETURNING 1", binds: binds), logger: logger)
            var n = 0
            for try await _ in rows.decode(Int.self) { n += 1 }
            total += n
            if n < Self.pruneBatch { return total }
        }
    }
}
