// The store against a real PostgreSQL: StoreTestSupport's private cluster,
// started from the system's binaries for this test process (it fails, saying
// why, when PostgreSQL is not installed).
import Foundation
import StoreTestSupport
import Testing
@testable import Store

@Suite("Store")
struct StoreTests {
    @Test("migrations apply once, in order, also when two processes start together")
    func migrations() async throws {
        let db = try await TestDatabase.make()
        let other = try Database(url: try TestDatabase.server.get().url(database: try await db.currentDatabase()))
        let bundled = try Database.bundledMigrations()
        #expect(bundled.first?.version == 1)
        #expect(try await db.isMigrated() == false)
        async let a = db.migrate()
        async let b = other.migrate()
        let (ra, rb) = try await (a, b)
        #expect((ra + rb).sorted() == bundled.map(\.version))   // each applied by exactly one of them
        #expect(try await db.migrate().isEmpty)
        #expect(try await db.isMigrated())
        #expect(try await db.schemaVersion() == bundled.map(\.version).max())
        await other.close()
        await db.close()
    }

    @Test("a failing migration leaves nothing behind and names itself")
    func failingMigration() async throws {
        let db = try await TestDatabase.make()
        let bad = [Database.Migration(version: 1, name: "0001_ok", sql: "CREATE TABLE a (x INT);"),
                   Database.Migration(version: 2, name: "0002_bad", sql: "CREATE TABLE b (x INT);\nSELECT * FROM nowhere;")]
        await #expect(throws: (any Error).self) { try await db.migrate(bad) }
        #expect(try await db.schemaVersion() == 1)
        #expect(try await db.integer(unsafeSQL: "SELECT count(*) FROM pg_tables WHERE tablename = 'b'") == 0)
        await db.close()
    }

    @Test("API keys: shown once, stored hashed, scoped to their tenant, revocable")
    func keys() async throws {
        let db = try await TestDatabase.make()
        try await db.migrate()
        let acme = try await db.createTenant(name: "acme")
        let other = try await db.createTenant(name: "other")
        await #expect(throws: Database.Failure.self) { try await db.createTenant(name: "acme") }
        let (record, key) = try await db.createKey(tenantID: acme.id, name: "ci", role: .app)
        #expect(key.hasPrefix("ck-") && key.count == 46 && key.hasPrefix(record.prefix))
        #expect(try await db.authenticate(key: key) == Principal(tenantID: acme.id, keyID: record.id, role: .app))
        let (adminRecord, adminKey) = try await db.createKey(tenantID: acme.id, name: "ops", role: .admin)
        #expect(adminRecord.role == .admin)
        #expect(try await db.authenticate(key: adminKey) == Principal(tenantID: acme.id, keyID: adminRecord.id, role: .admin))
        #expect(try await db.authenticate(key: key + "x") == nil)
        #expect(try await db.authenticate(key: "ck-" + String(repeating: "A", count: 43)) == nil)
        // Only the hash is stored.
        #expect(try await db.integer(unsafeSQL: "SELECT count(*) FROM api_keys WHERE key_hash = $1 OR prefix = $1", key) == 0)
        #expect(try await db.integer(unsafeSQL: "SELECT count(*) FROM api_keys WHERE key_hash = $1", Database.hash(key: key)) == 1)
        // Another tenant cannot revoke it; its own tenant can.
        #expect(try await db.revokeKey(id: record.id, tenantID: other.id) == false)
        #expect(try await db.revokeKey(id: record.id, tenantID: acme.id))
        #expect(try await db.authenticate(key: key) == nil)
        #expect(try await db.keys(tenantID: acme.id).first?.revokedAt != nil)
        #expect(try await db.tenants().map(\.name) == ["acme", "other"])
        await db.close()
    }
}
