// Tenants and their API keys. A key is shown once, at creation; the database
// keeps only its SHA-256 and an 8-character prefix for listings.
import Digest
import Foundation

import PostgresNIO

extension Database {
    /// SHA-256 of a key, hex.
    static func hash(key: String) -> String {
        var h = SHA256()
        Array(key.utf8).withUnsafeBytes { h.update($0) }
        return h.finalizeHex()
    }

    /// A new random key: "ck-" and 43 base-62 characters (256 bits from the system CSPRNG).
    static func newKey() -> String {
        let alphabet = Array("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
        var rng = SystemRandomNumberGenerator()
        return "ck-" + String((0..<43).map { _ in alphabet[Int(rng.next(upperBound: UInt64(alphabet.count)))] })
    }

    public func createTenant(name: String) async throws -> Tenant {
        let trimmed = name.trimmingCharacters(in: .whitespaces)
        guard !trimmed.isEmpty, trimmed.count <= 200 else { throw Failure(description: "a tenant name must have 1 to 200 characters") }
        let rows = try await client.query("""
            INSERT INTO tenants (name) VALUES (\(trimmed)) ON CONFLICT (name) DO NOTHING
            RETURNING id, name, learning, created_at
            """, logger: logger)
        for try await (id, name, learning, created) in rows.decode((Int64, String, Bool, Date).self) {
            return Tenant(id: id, name: name, learning: learning, createdAt: created)
        }
        throw Failure(description: "a tenant named '\(trimmed)' already exists")
    }

    public func tenants() async throws -> [Tenant] {
        let rows = try await client.query("SELECT id, name, learning, created_at FROM tenants ORDER BY id", logger: logger)
        var out: [Tenant] = []
        for try await (id, name, learning, created) in rows.decode((Int64, String, Bool, Date).self) {
            out.append(Tenant(id: id, name: name, learning: learning, createdAt: created))
        }
        return out
    }

    public func tenant(named name: String) async throws -> Tenant? {
        let rows = try await client.query("SELECT id, name, learning, created_at FROM tenants WHERE name = \(name)", logger: logger)
        for try await (id, name, learning, created) in rows.decode((Int64, String, Bool, Date).self) {
            return Tenant(id: id, name: name, learning: learning, createdAt: created)
        }
        return nil
    }

    typealias KeyRow = (Int64, Int64, String, String, String, Date, Date?)

    static func key(_ r: KeyRow) throws -> APIKey {
        guard let role = KeyRole(rawValue: r.4) else { throw Failure(description: "key \(r.0) has an unknown role '\(r.4)'") }
        return APIKey(id: r.0, tenantID: r.1, name: r.2, role: role, prefix: r.3, createdAt: r.5, revokedAt: r.6)
    }

    /// Creates a key of `role` for the tenant; returns its record and the
    /// key, which is not stored and cannot be shown again.
    public func createKey(tenantID: Int64, name: String = "", role: KeyRole) async throws -> (APIKey, String) {
        guard name.utf8.count <= 200, !name.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) else {
            throw Failure(description: "a key name must have at most 200 bytes and no control characters")
        }
        let key = Self.newKey()
        let rows = try await client.query("""
            INSERT INTO api_keys (tenant_id, name, prefix, key_hash, role)
            VALUES (\(tenantID), \(name), \(String(key.prefix(11))), \(Self.hash(key: key)), \(role.rawValue))
            RETURNING id, tenant_id, name, prefix, role, created_at, revoked_at
            """, logger: logger)
        for try await r in rows.decode(KeyRow.self) { return (try Self.key(r), key) }
        throw Failure(description: "the key was not created")
    }

    public func keys(tenantID: Int64) async throws -> [APIKey] {
        let rows = try await client.query("""
            SELECT id, tenant_id, name, prefix, role, created_at, revoked_at FROM api_keys WHERE tenant_id = \(tenantID) ORDER BY id
            """, logger: logger)
        var out: [APIKey] = []
        for try await r in rows.decode(KeyRow.self) { out.append(try Self.key(r)) }
        return out
    }

    /// Revokes a key of the tenant; false when the tenant has no such live key.
    public func revokeKey(id: Int64, tenantID: Int64) async throws -> Bool {
        let rows = try await client.query("""
            UPDATE api_keys SET revoked_at = now() WHERE id = \(id) AND tenant_id = \(tenantID) AND revoked_at IS NULL
            RETURNING id
            """, logger: logger)
        for try await _ in rows.decode(Int64.self) { return true }
        return false
    }

    // MARK: Browser sessions

    /// A session token: "cs-" and 43 base-62 characters (256 bits from the system CSPRNG).
    static func newSessionToken() -> String { "cs-" + newKey().dropFirst(3) }

    public func createSession(for principal: Principal, seconds: Double) async throws -> String {
        let token = Self.newSessionToken()
        let expires = Date().addingTimeInterval(seconds)
        try Self.checkStorable(expires)
        try await client.query("""
            INSERT INTO sessions (token_hash, key_id, expires_at) VALUES (\(Self.hash(key: token)), \(principal.keyID), \(expires))
            """, logger: logger)
        return token
    }

    public func session(token: String) async throws -> Principal? {
        guard token.hasPrefix("cs-"), token.count < 200 else { return nil }
        let rows = try await client.query("""
            SELECT k.tenant_id, k.id, k.role FROM sessions s JOIN api_keys k ON k.id = s.key_id
            WHERE s.token_hash = \(Self.hash(key: token)) AND s.expires_at > now() AND k.revoked_at IS NULL
            """, logger: logger)
        for try await (tenant, id, role) in rows.decode((Int64, Int64, String).self) {
            guard let role = KeyRole(rawValue: role) else { return nil }
            return Principal(tenantID: tenant, keyID: id, role: role)
        }
        return nil
    }

    public func endSession(token: String) async throws {
        try await client.query("DELETE FROM sessions WHERE token_hash = \(Self.hash(key: token))", logger: logger)
    }

    /// The tenant and key a presented key belongs to; nil for unknown or revoked keys.
    public func authenticate(key: String) async throws -> Principal? {
        guard key.hasPrefix("ck-"), key.count < 200 else { return nil }
        let rows = try await client.query("""
            SELECT tenant_id, id, role FROM api_keys WHERE key_hash = \(Self.hash(key: key)) AND revoked_at IS NULL
            """, logger: logger)
        for try await (tenant, id, role) in rows.decode((Int64, Int64, String).self) {
            guard let role = KeyRole(rawValue: role) else { return nil }   // a role this build does not know grants nothing
            return Principal(tenantID: tenant, keyID: id, role: role)
        }
        return nil
    }
}
