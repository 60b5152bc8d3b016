// Automatic consolidation ("sleep") in the service: a durable job in the
// learning queue, enqueued by a round that passes `every_tokens` or by the
// idle sweep, applied once, audited with its trigger, counted on /metrics,
// and leaving a version with cause `consolidate` whose fast level is fresh.
// The tiny Llama: the assertions are about the queue, not what is learned.
import Foundation
import Hummingbird
import HummingbirdTesting
import Testing
@testable import Service
import Store

@Suite("Automatic consolidation")
struct ConsolidationServiceTests {
    /// Polls `condition` every 50 ms for up to `seconds`.
    static func eventually(_ seconds: Double = 30, _ condition: () async throws -> Bool) async throws -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if try await condition() { return true }
            try await Task.sleep(for: .milliseconds(50))
        }
        return try await condition()
    }

    static func events(_ client: some TestClientProtocol, key: String, user: String) async throws -> [[String: Any]] {
        try #require(try await get(client, "/v1/users/\(user)/audit/events", key: key).body.json()["data"] as? [[String: Any]])
    }

    static func versions(_ client: some TestClientProtocol, key: String, user: String) async throws -> [[String: Any]] {
        try #require(try await get(client, "/v1/users/\(user)/memory/versions", key: key).body.json()["data"] as? [[String: Any]])
    }

    @Test("every_tokens: a round past the count queues a consolidation; it is applied once, audited, on /metrics, fast cleared")
    func everyTokens() async throws {
        let (db, key) = try await Fixture.database()
        try await Fixture.app(db, learning: true) { c in
            c.consolidation.idleSeconds = 0
            c.consolidation.everyTokens = 5
            c.consolidation.steps = 2
            c.consolidation.generatedTokens = 4
        }.test(.live) { client in
            // Each teaching turn has more than 5 learnable tokens: every round asks for a consolidation.
            _ = try await generate(client, key: key, user: "alice", prompt: MemoryServiceTests.teaching[0], maxTokens: 2, wait: true)
            let consolidated = try await Self.eventually {
                try await Self.events(client, key: key, user: "alice").contains { $0["event"] as? String == "consolidate" }
            }
            #expect(consolidated, "no consolidation after a round past every_tokens")
            let events = try await Self.events(client, key: key, user: "alice")
            let consolidations = events.filter { $0["event"] as? String == "consolidate" }
            #expect(consolidations.count == 1, "\(events)")
            let event = try #require(consolidations.first)
            #expect(event["actor"] as? String == "system")
            let detail = try #require(event["detail"] as? [String: Any])
            #expect(detail["trigger"] as? String == "tokens", "\(detail)")
            #expect((detail["steps"] as? Double ?? 0) > 0 && (detail["kl_before"] as? Double) != nil, "\(detail)")
            // The version it made: cause consolidate, mid stored, fast fresh.
            let versions = try await Self.versions(client, key: key, user: "alice")
            let newest = try #require(versions.first)
            #expect(newest["cause"] as? String == "consolidate" && newest["actor"] as? String == "system", "\(versions)")
            #expect(newest["levels"] as? [String] == ["mid"], "\(newest)")
            let memory = try await get(client, "/v1/users/alice/memory", key: key).body.json()
            #expect(memory["consolidations"] as? Int == 1 && memory["queued_jobs"] as? Int == 0, "\(memory)")
            // Nothing learned since: no second consolidation is queued.
            try await Task.sleep(for: .milliseconds(300))
            #expect(try await Self.events(client, key: key, user: "alice").filter { $0["event"] as? String == "consolidate" }.count == 1)
            let metrics = try await client.execute(uri: "/metrics", method: .get).body.text
            #expect(metrics.contains("\ncontinuum_consolidations_total{trigger=\"tokens\"} 1.0\n"), "\(metrics)")
            #expect(metrics.contains("\ncontinuum_consolidation_seconds_count 1\n"))
            // Bob has learned nothing: untouched.
            _ = try await generate(client, key: key, user: "bob", prompt: "Hi", maxTokens: 1, learn: false)
            #expect(try await Self.versions(client, key: key, user: "bob").count == 1)
        }
        await db.close()
    }

    @Test("idle_seconds: a user idle that long with learned tokens is consolidated once by the sweep; on-demand still works")
    func idle() async throws {
        let (db, key) = try await Fixture.database()
        try await Fixture.app(db, learning: true) { c in
            c.consolidation.idleSeconds = 0.5
            c.consolidation.sweepSeconds = 0.1
            c.consolidation.steps = 2
            c.consolidation.generatedTokens = 4
        }.test(.live) { client in
            _ = try await generate(client, key: key, user: "carol", prompt: MemoryServiceTests.teaching[1], maxTokens: 2, wait: true)
            #expect(try await Self.versions(client, key: key, user: "carol").first?["cause"] as? String == "learning")
            let consolidated = try await Self.eventually {
                try await Self.versions(client, key: key, user: "carol").first?["cause"] as? String == "consolidate"
            }
            #expect(consolidated, "the idle sweep did not consolidate")
            let event = try #require(try await Self.events(client, key: key, user: "carol").last { $0["event"] as? String == "consolidate" })
            #expect((event["detail"] as? [String: Any])?["trigger"] as? String == "idle", "\(event)")
            // Idle longer: nothing new to consolidate, so no second one.
            try await Task.sleep(for: .milliseconds(1200))
            #expect(try await Self.events(client, key: key, user: "carol").filter { $0["event"] as? String == "consolidate" }.count == 1)
            let metrics = try await client.execute(uri: "/metrics", method: .get).body.text
            #expect(metrics.contains("\ncontinuum_consolidations_total{trigger=\"idle\"} 1.0\n"), "\(metrics)")
            #expect(metrics.contains("\ncontinuum_idle_consolidations_enqueued_total 1.0\n"), "\(metrics)")
            // On demand as before, counted as demand.
            _ = try await generate(client, key: key, user: "carol", prompt: MemoryServiceTests.teaching[2], maxTokens: 2, wait: true)
            #expect(try await post(client, "/v1/users/carol/memory/consolidate", key: key, #"{"steps": 2, "generated_tokens": 4}"#).status == .ok)
            let after = try await client.execute(uri: "/metrics", method: .get).body.text
            #expect(after.contains("\ncontinuum_consolidations_total{trigger=\"demand\"} 1.0\n"), "\(after)")
        }
        await db.close()
    }

    @Test("the consolidation settings decode with defaults and refuse bad values")
    func configuration() throws {
        let d = try JSONDecoder().decode(ServiceConfiguration.self, from: Data("{}".utf8))
        #expect(d.consolidation == ConsolidationConfiguration() && d.consolidation.idleSeconds == 900 && d.consolidation.method == .transplant)
        #expect(d.consolidation.steps == 0 && d.consolidation.generatedTokens == 0)
        // A method's own budget when none is given.
        let distill = try JSONDecoder().decode(ServiceConfiguration.self, from: Data(#"{"consolidation": {"method": "distill"}}"#.utf8))
        #expect(distill.consolidation.steps == 16 && distill.consolidation.generatedTokens == 32)
        let c = try JSONDecoder().decode(ServiceConfiguration.self, from: Data(#"""
            {"consolidation": {"every_tokens": 500, "fast_norm": 2.5, "method": "sleep", "sleep": {"questions_per_text": 2}}}
            """#.utf8))
        #expect(c.consolidation.everyTokens == 500 && c.consolidation.fastNorm == 2.5 && c.consolidation.method == .sleep)
        #expect(c.consolidation.sleep.questionsPerText == 2)
        for bad in [#"{"consolidation": {"idle_seconds": -1}}"#, #"{"consolidation": {"every_token": 5}}"#,
                    #"{"consolidation": {"steps": 1001}}"#, #"{"consolidation": {"method": "nap"}}"#,
                    #"{"consolidation": {"method": "distill", "steps": 0}}"#,
                    #"{"consolidation": {"sleep": {"answer_tokens": 0}}}"#, #"{"consolidation": {"sweep_seconds": 0}}"#] {
            #expect(throws: (any Error).self, "\(bad)") { try JSONDecoder().decode(ServiceConfiguration.self, from: Data(bad.utf8)) }
        }
    }
}
