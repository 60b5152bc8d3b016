// The drift audit's storage: audit events (every mutation of a user's
// memory), drift reports per memory version, per-tenant audit settings
// (policies, probe set) and freezing. Every query is scoped by tenant or by a
// user id resolved within it.
import Foundation
import Logging
import PostgresNIO

extension Database {
    /// Refuses a time a query may not bind (StoreLimits.storableDates: the
    /// service refuses others with 400 before they get here).
    static func checkStorable(_ dates: Date?...) throws {
        for d in dates.compactMap({ $0 }) where !StoreLimits.isStorable(d) {
            throw Failure(description: "time \(d.timeIntervalSince1970) s is outside years 1…9999")
        }
    }

    /// Records an audit event of the user (in the caller's transaction).
    static func audit(_ tx: PostgresConnection, userID: Int64, event: AuditEventKind, from: Int64?, to: Int64?, actor: String,
                      causeID: String?, detail: String = "{}", logger: Logger) async throws {
        try await tx.query("""
            INSERT INTO audit_events (tenant_id, user_id, event, from_version, to_version, actor, cause_id, detail)
            SELECT tenant_id, id, \(event.rawValue), \(from), \(to), \(actor), \(causeID), \(detail)::jsonb FROM users WHERE id = \(userID)
            """, logger: logger)
    }

    /// Records an audit event of the user in a transaction of its own.
    public func recordAudit(userID: Int64, event: AuditEventKind, from: Int64?, to: Int64?, actor: String, causeID: String? = nil,
                            detail: String = "{}") async throws {
        try await transaction { tx in
            try await Self.audit(tx, userID: userID, event: event, from: from, to: to, actor: actor, causeID: causeID,
                                 detail: detail, logger: self.logger)
        }
    }

    /// The user's audit events in order, optionally within [since, until), at most `limit` (the newest).
    public func auditEvents(userID: Int64, since: Date? = nil, until: Date? = nil, limit: Int = 1000) async throws -> [AuditEvent] {
        try await events(where: "user_id = $1", bind: userID, since: since, until: until, limit: limit)
    }

    /// The tenant's audit events (tombstones included) in order, optionally within [since, until).
    public func auditEvents(tenantID: Int64, since: Date? = nil, until: Date? = nil, limit: Int = 1000) async throws -> [AuditEvent] {
        try await events(where: "tenant_id = $1", bind: tenantID, since: since, until: until, limit: limit)
    }

    private func events(where condition: String, bind: Int64, since: Date?, until: Date?, limit: Int) async throws -> [AuditEvent] {
        try Self.checkStorable(since, until)
        var binds = PostgresBindings()
        binds.append(bind)
        binds.append(since ?? Date(timeIntervalSince1970: 0))
        binds.append(until ?? Date(timeIntervalSinceNow: 365 * 86400 * 100))
        binds.append(Int64(limit))
        let sql = """
            SELECT * FROM (
                SELECT id, user_id, event, from_version, to_version, actor, cause_id, detail::text, created_at FROM audit_events
                WHERE \(condition) AND created_at >= $2 AND created_at < $3 ORDER BY id DESC LIMIT $4) e
            ORDER BY id
            """
        var out: [AuditEvent] = []
        for try await r in try await client.query(PostgresQuery(unsafeSQL: sql, binds: binds), logger: logger)
            .decode((Int64, Int64?, String, Int64?, Int64?, String, String?, String, Date).self) {
            guard let event = AuditEventKind(rawValue: r.2) else { throw Failure(description: "audit event \(r.0) has an unknown kind '\(r.2)'") }
            out.append(AuditEvent(id: r.0, userID: r.1, event: event, fromVersion: r.3, toVersion: r.4, actor: r.5, causeID: r.6,
                                  detail: r.7, createdAt: r.8))
        }
        return out
    }

    // MARK: Drift reports

    /// Stores the report of a version (replacing an earlier one of the same version).
    public func saveDriftReport(userID: Int64, version: Int64, metrics: String, flags: String, passed: Bool) async throws {
        try await client.query("""
            INSERT INTO drift_reports (user_id, version, metrics, flags, passed)
            VALUES (\(userID), \(version), \(metrics)::jsonb, \(flags)::jsonb, \(passed))
            ON CONFLICT (user_id, version) DO UPDATE SET metrics = EXCLUDED.metrics, flags = EXCLUDED.flags,
                passed = EXCLUDED.passed, computed_at = now()
            """, logger: logger)
    }

    /// The user's reports, oldest version first.
    public func driftReports(userID: Int64) async throws -> [DriftReport] {
        var out: [DriftReport] = []
        for try await r in try await client.query("""
            SELECT user_id, version, metrics::text, flags::text, passed, computed_at FROM drift_reports
            WHERE user_id = \(userID) ORDER BY version
            """, logger: logger).decode((Int64, Int64, String, String, Bool, Date).self) {
            out.append(DriftReport(userID: r.0, version: r.1, metrics: r.2, flags: r.3, passed: r.4, computedAt: r.5))
        }
        return out
    }

    /// Each of the tenant's users' latest report, computed in [since, until),
    /// ranked by a numeric metric (descending, or ascending when `ascending`),
    /// optionally only flagged ones; a page of `limit` after `offset`.
    public func rankedDrift(tenantID: Int64, metric: String, ascending: Bool = false, flaggedOnly: Bool = false,
                            since: Date? = nil, until: Date? = nil, limit: Int = 50, offset: Int = 0) async throws -> [RankedDrift] {
        // Bound as a parameter anyway; a metric name is ASCII letters, digits and '_' (top1_agreement).
        guard !metric.isEmpty, metric.unicodeScalars.allSatisfy({ ("a"..."z").contains($0) || ("0"..."9").contains($0) || $0 == "_" })
        else { throw Failure(description: "bad metric name \(metric)") }
        try Self.checkStorable(since, until)
        var binds = PostgresBindings()
        binds.append(tenantID)
        binds.append(since ?? Date(timeIntervalSince1970: 0))
        binds.append(until ?? Date(timeIntervalSinceNow: 365 * 86400 * 100))
        binds.append(Int64(limit))
        binds.append(Int64(offset))
        binds.append(metric)
        let sql = """
            SELECT name, frozen, user_id, version, metrics::text, flags::text, passed, computed_at FROM (
                SELECT DISTINCT ON (u.id) u.name, u.frozen, r.* FROM drift_reports r JOIN users u ON u.id = r.user_id
                WHERE u.tenant_id = $1 AND r.computed_at >= $2 AND r.computed_at < $3
                ORDER BY u.id, r.version DESC) latest
            WHERE \(flaggedOnly ? "jsonb_array_length(flags) > 0" : "true")
            ORDER BY (metrics ->> $6)::float8 \(ascending ? "ASC" : "DESC") NULLS LAST, name
            LIMIT $4 OFFSET $5
            """
        var out: [RankedDrift] = []
        for try await r in try await client.query(PostgresQuery(unsafeSQL: sql, binds: binds), logger: logger)
            .decode((String, Bool, Int64, Int64, String, String, Bool, Date).self) {
            out.append(RankedDrift(user: r.0, frozen: r.1,
                                   report: DriftReport(userID: r.2, version: r.3, metrics: r.4, flags: r.5, passed: r.6, computedAt: r.7)))
        }
        return out
    }

    /// The newest kept version below `before` whose report passed (version 0,
    /// the backbone, counts as passing); nil when none is kept.
    public func lastPassingVersion(userID: Int64, before: Int64) async throws -> Int64? {
        for try await v in try await client.query("""
            SELECT m.version FROM memory_versions m LEFT JOIN drift_reports r ON r.user_id = m.user_id AND r.version = m.version
            WHERE m.user_id = \(userID) AND m.version < \(before) AND (m.version = 0 OR r.passed)
            ORDER BY m.version DESC LIMIT 1
            """, logger: logger).decode(Int64.self) {
            return v
        }
        return nil
    }

    // MARK: Settings and freezing

    /// The tenant's policies and probe set as JSON (nil: the defaults).
    public func auditSettings(tenantID: Int64) async throws -> (policies: String?, probes: String?) {
        for try await r in try await client.query("""
            SELECT policies::text, probes::text FROM audit_settings WHERE tenant_id = \(tenantID)
            """, logger: logger).decode((String?, String?).self) {
            return r
        }
        return (nil, nil)
    }

    /// Replaces the tenant's policies (JSON array; nil: back to the defaults).
    public func setPolicies(tenantID: Int64, json: String?) async throws {
        try await client.query("""
            INSERT INTO audit_settings (tenant_id, policies) VALUES (\(tenantID), \(json)::jsonb)
            ON CONFLICT (tenant_id) DO UPDATE SET policies = EXCLUDED.policies
            """, logger: logger)
    }

    /// Replaces the tenant's probe set (JSON array of strings; nil: back to the default set).
    public func setProbes(tenantID: Int64, json: String?) async throws {
        try await client.query("""
            INSERT INTO audit_settings (tenant_id, probes) VALUES (\(tenantID), \(json)::jsonb)
            ON CONFLICT (tenant_id) DO UPDATE SET probes = EXCLUDED.probes
            """, logger: logger)
    }

    /// Freezes (no learning until cleared) or unfreezes the user, with an audit event. False when nothing changed.
    @discardableResult
    public func setFrozen(userID: Int64, _ frozen: Bool, actor: String, causeID: String? = nil, detail: String = "{}")
        async throws -> Bool {
        try await transaction { tx in
            var changed = false
            for try await _ in try await tx.query("""
                UPDATE users SET frozen = \(frozen) WHERE id = \(userID) AND frozen <> \(frozen) RETURNING id
                """, logger: self.logger).decode(Int64.self) { changed = true }
            if changed {
                try await Self.audit(tx, userID: userID, event: frozen ? .freeze : .unfreeze, from: nil, to: nil, actor: actor,
                                     causeID: causeID, detail: detail, logger: self.logger)
            }
            return changed
        }
    }
}
