// Users in PostgreSQL: creation (with version 0), lookup by name or id within
// a tenant, listing, and erasure (every row of the user goes with the users
// row, ON DELETE CASCADE; a content-free tombstone stays in the audit log).
import Foundation
import Logging
import PostgresNIO

extension Database {
    // MARK: Users

    static let userColumns = """
        u.id, u.tenant_id, u.name, u.version, u.jobs_applied, t.learning, u.frozen, u.created_at, u.unconsolidated_tokens
        """
    typealias UserRow = (Int64, Int64, String, Int64, Int64, Bool, Bool, Date, Int64)

    static func user(_ r: UserRow) -> User {
        User(id: r.0, tenantID: r.1, name: r.2, version: r.3, jobsApplied: r.4, learning: r.5, frozen: r.6, createdAt: r.7,
             unconsolidatedTokens: r.8)
    }

    /// The tenant's user named `name`; created (at version 0) when `create` and missing.
    public func user(tenantID: Int64, name userName: UserName, create: Bool = false) async throws -> User? {
        let name = userName.value
        func find() async throws -> User? {
            let rows = try await client.query("""
                SELECT \(unescaped: Self.userColumns) FROM users u JOIN tenants t ON t.id = u.tenant_id
                WHERE u.tenant_id = \(tenantID) AND u.name = \(name)
                """, logger: logger)
            for try await r in rows.decode(UserRow.self) { return Self.user(r) }
            return nil
        }
        // Read first: a plain read never waits, while INSERT … ON CONFLICT on a
        // row that a learning round is updating waits for that round to commit.
        if let user = try await find() { return user }
        guard create else { return nil }
        try await transaction { tx in
            let rows = try await tx.query("""
                INSERT INTO users (tenant_id, name) VALUES (\(tenantID), \(name)) ON CONFLICT (tenant_id, name) DO NOTHING
                RETURNING id
                """, logger: logger)
            for try await id in rows.decode(Int64.self) {
                try await Self.insertCreatedVersion(userID: id, actor: "server", tx: tx, logger: logger)
            }
        }
        return try await find()
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
}
