// The store's parts of the hardening: keys made before roles become admin
// keys; the user id policy; times that cannot be bound are refused; the
// retention pruner deletes exactly what is past its retention and nothing a
// current memory, a kept version or a queued job needs.
import Foundation
import StoreTestSupport
import Testing
@testable import Store

@Suite("Store hardening")
struct HardeningStoreTests {
    @Test("keys made before roles existed become admin keys; new keys default to app")
    func roleMigration() async throws {
        let db = try await TestDatabase.make()
        let all = try Database.bundledMigrations()
        try await db.migrate(all.filter { $0.version < 4 })
        try await db.execute(unsafeSQL: "INSERT INTO tenants (name) VALUES ('old')")
        try await db.execute(unsafeSQL: """
            INSERT INTO api_keys (tenant_id, name, prefix, key_hash) SELECT id, 'legacy', 'ck-legacy0', 'h1' FROM tenants
            """)
        try await db.migrate()
        let tenant = try #require(try await db.tenant(named: "old"))
        #expect(try await db.keys(tenantID: tenant.id).map(\.role) == [.admin])
        try await db.execute(unsafeSQL: "INSERT INTO api_keys (tenant_id, prefix, key_hash) SELECT id, 'ck-new0000', 'h2' FROM tenants")
        #expect(try await db.keys(tenantID: tenant.id).map(\.role) == [.admin, .app])
        await #expect(throws: (any Error).self) {
            try await db.execute(unsafeSQL: "UPDATE api_keys SET role = 'root'")
        }
        await db.close()
    }

    @Test("user ids: length in bytes, no control, format, private-use or separator characters; strict percent-decoding")
    func userNames() throws {
        for ok in ["alice", "a b", "café", "用户", "a/b", "🙂", String(repeating: "x", count: 256), String(repeating: "é", count: 128)] {
            #expect((try? UserName(ok)) != nil, "\(ok)")
        }
        for bad in ["", String(repeating: "x", count: 257), String(repeating: "é", count: 129), "a\u{0}b", "a\nb", "a\u{7F}",
                    "a\u{85}b", "a\u{200B}b", "a\u{202E}b", "a\u{FEFF}", "a\u{E000}", "a\u{2028}b", "a\u{2029}b"] {
            #expect((try? UserName(bad)) == nil, "\(bad.unicodeScalars.map { String($0.value, radix: 16) })")
        }
        #expect(try UserName(percentEncoded: "caf%C3%A9").value == "café")
        #expect(try UserName(percentEncoded: "a%2Fb").value == "a/b")
        #expect(try UserName(percentEncoded: "a+b").value == "a+b")
        for bad in ["a%", "a%4", "a%ZZ", "%FF", "%C3", "a%00", "%0A", "%E2%80%AE"] {
            #expect((try? UserName(percentEncoded: bad[...])) == nil, "\(bad)")
        }
    }

    @Test("times outside years 1…9999 (and non-finite ones) are refused, not bound")
    func unstorableTimes() async throws {
        let db = try await TestDatabase.make()
        try await db.migrate()
        let t = try await db.createTenant(name: "t")
        for bad in [Date(timeIntervalSince1970: .nan), Date(timeIntervalSince1970: .infinity), Date(timeIntervalSince1970: 1e300),
                    Date(timeIntervalSince1970: -1e20), Date.distantFuture.addingTimeInterval(1e12)] {
            await #expect(throws: Database.Failure.self) { _ = try await db.auditEvents(tenantID: t.id, since: bad) }
            await #expect(throws: Database.Failure.self) { _ = try await db.rankedDrift(tenantID: t.id, metric: "kl_mean", until: bad) }
        }
        #expect(try await db.auditEvents(tenantID: t.id, since: Date(timeIntervalSince1970: 0)).isEmpty)
        await db.close()
    }

    @Test("retention prunes finished jobs, generations (with their feedback), old drift reports and audit events, and nothing else")
    func retention() async throws {
        let db = try await TestDatabase.make()
        try await db.migrate()
        let tenant = try await db.createTenant(name: "acme")
        let user = try #require(try await db.user(tenantID: tenant.id, name: try UserName("alice"), create: true))
        let old = "now() - interval '40 days'", recent = "now() - interval '1 day'"
        // Generations: one old with feedback and a done job, one recent.
        let oldGen = UUID(), newGen = UUID()
        for (id, job) in [(oldGen, LearningRequest(tokens: [1, 2, 3], learnable: [false, true, true])),
                          (newGen, LearningRequest(tokens: [4, 5], learnable: [false, true]))] {
            _ = try await db.recordGeneration(id: id, userID: user.id, memoryVersion: 0, prompt: [1], completion: [2], job: job, actor: "t")
        }
        let stored = try #require(try await db.generation(id: oldGen, tenantID: tenant.id))
        _ = try await db.recordFeedback(generation: stored, rating: "positive", correction: nil, job: nil, actor: "t")
        try await db.execute(unsafeSQL: "UPDATE generations SET created_at = \(old) WHERE id = '\(oldGen.uuidString)'")
        // Jobs: the old generation's is done long ago; a failed one recently; a queued one from long ago stays.
        try await db.execute(unsafeSQL: """
            UPDATE learning_jobs SET state = 'done', finished_at = \(old), created_at = \(old) WHERE source_id = '\(oldGen.uuidString)'
            """)
        try await db.execute(unsafeSQL: """
            UPDATE learning_jobs SET state = 'failed', finished_at = \(recent) WHERE source_id = '\(newGen.uuidString)'
            """)
        _ = try await db.recordGeneration(id: UUID(), userID: user.id, memoryVersion: 0, prompt: [7], completion: [],
                                          job: LearningRequest(tokens: [7, 8], learnable: [false, true]), actor: "t")
        try await db.execute(unsafeSQL: "UPDATE learning_jobs SET created_at = \(old) WHERE state = 'queued'")
        // Drift reports: versions 0 (kept: the user's current), 5 and 6 (not kept), old; 7 newest, old too.
        for v in [0, 5, 6, 7] {
            try await db.saveDriftReport(userID: user.id, version: Int64(v), metrics: "{}", flags: "[]", passed: true)
        }
        try await db.execute(unsafeSQL: "UPDATE drift_reports SET computed_at = \(old)")
        // Audit events: one old, one recent.
        try await db.recordAudit(userID: user.id, event: .warn, from: 0, to: 0, actor: "t")
        try await db.execute(unsafeSQL: "UPDATE audit_events SET created_at = \(old)")
        try await db.recordAudit(userID: user.id, event: .warn, from: 0, to: 0, actor: "t")

        let counts = try await db.prune(Retention(finishedJobs: 7 * 86400, generations: 30 * 86400, driftReports: 30 * 86400,
                                                  auditEvents: 30 * 86400))
        #expect(counts == PruneCounts(finishedJobs: 1, generations: 1, driftReports: 2, auditEvents: 1), "\(counts)")
        #expect(try await db.generation(id: oldGen, tenantID: tenant.id) == nil)
        #expect(try await db.generation(id: newGen, tenantID: tenant.id) != nil)
        #expect(try await db.integer(unsafeSQL: "SELECT count(*) FROM feedback") == 0)
        #expect(try await db.integer(unsafeSQL: "SELECT count(*) FROM learning_jobs WHERE state = 'queued'") == 1)
        #expect(try await db.integer(unsafeSQL: "SELECT count(*) FROM learning_jobs WHERE state = 'failed'") == 1)
        #expect(try await db.driftReports(userID: user.id).map(\.version) == [0, 7])
        #expect(try await db.auditEvents(userID: user.id).count == 1)
        // Nothing is pruned when retention keeps everything, and a second pass finds nothing.
        #expect(try await db.prune(Retention()).total == 0)
        #expect(try await db.prune(Retention(finishedJobs: 7 * 86400, generations: 30 * 86400, driftReports: 30 * 86400,
                                             auditEvents: 30 * 86400)).total == 0)
        await db.close()
    }
}
