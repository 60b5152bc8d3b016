// Memory operations and the learning queue: a reset, rollback or import
// cancels the user's jobs queued before it (an audit event names them, a
// request waiting on one hears `cancelled`), unless keep_queued; the jobs
// of other users are not touched; the on-demand audit is rate-limited per user.
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Testing
@testable import Service
@testable import Store

@Suite("Operations and the queue", .serialized)
struct QueueOperationsTests {
    static func states(_ db: Database, _ user: String) async throws -> [String] {
        var out: [String] = []
        for job in try await jobIDs(db, user) {
            out.append(try #require(try await db.jobState(id: job)).state.rawValue)
        }
        return out
    }

    static func jobIDs(_ db: Database, _ user: String) async throws -> [Int64] {
        let n = try await db.integer(unsafeSQL: "SELECT count(*) FROM learning_jobs j JOIN users u ON u.id = j.user_id WHERE u.name = $1", user)
        var ids: [Int64] = []
        for i in 0..<n {
            ids.append(Int64(try await db.integer(unsafeSQL: """
                SELECT j.id FROM learning_jobs j JOIN users u ON u.id = j.user_id WHERE u.name = $1 ORDER BY j.id OFFSET \(i) LIMIT 1
                """, user)))
        }
        return ids
    }

    @Test("reset, rollback and import cancel the user's queued jobs (audited, wait_for_learning hears cancelled) unless keep_queued")
    func cancellation() async throws {
        let (db, key) = try await Fixture.database()
        // No learning worker: jobs stay queued until an operation decides.
        try await Fixture.app(db).test(.live) { client in
            let port = try #require(client.port)
            for u in ["carol", "dave"] {
                for i in 0..<2 { _ = try await generate(client, key: key, user: u, prompt: "Fact \(i): my parrot is called Pim.") }
            }
            // A request waiting on its job while a reset comes.
            let waiting = Task {
                try await postOnNewConnection(port: port, "/v1/generate", key: key,
                                              Fixture.json(["user": "carol", "prompt": "And my owl is called Hoot.", "max_tokens": 2,
                                                            "wait_for_learning": true]))
            }
            while try await Self.jobIDs(db, "carol").count < 3 { try await Task.sleep(for: .milliseconds(20)) }
            let carolJobs = try await Self.jobIDs(db, "carol")
            let reset = try await post(client, "/v1/users/carol/memory/reset", key: key, "{}")
            #expect(reset.status == .ok)
            let cancelled = try #require(try reset.body.json()["cancelled_jobs"] as? [Int])
            #expect(cancelled.map(Int64.init) == carolJobs)
            #expect(try await Self.states(db, "carol") == ["cancelled", "cancelled", "cancelled"])
            #expect(try await Self.states(db, "dave") == ["queued", "queued"], "another user's jobs were touched")
            let w = try await waiting.value
            let learning = try #require(try w.body.json()["learning"] as? [String: Any])
            #expect(learning["state"] as? String == "cancelled", "\(learning)")
            let events = try #require(try await get(client, "/v1/users/carol/audit/events", key: key).body.json()["data"] as? [[String: Any]])
            let event = try #require(events.first { $0["event"] as? String == "learning_cancelled" })
            #expect((event["detail"] as? [String: Any])?["job_ids"] as? [Int] == cancelled && event["cause_id"] as? String == "reset")

            // keep_queued keeps them; a plain rollback then cancels them.
            let dave = try await Self.jobIDs(db, "dave")
            let kept = try await post(client, "/v1/users/dave/memory/reset", key: key, #"{"keep_queued": true}"#)
            let keptJobs = try kept.body.json()["cancelled_jobs"] as? [Int]
            #expect(kept.status == .ok && keptJobs == [])
            #expect(try await Self.states(db, "dave") == ["queued", "queued"])
            let rolled = try await post(client, "/v1/users/dave/memory/rollback", key: key, #"{"version": 0}"#)
            let rolledJobs = try rolled.body.json()["cancelled_jobs"] as? [Int]
            #expect(rolled.status == .ok && rolledJobs?.map(Int64.init) == dave)
            #expect(try await Self.states(db, "dave") == ["cancelled", "cancelled"])

            // Import: with keep_queued=true the queue stays, without it it is cancelled.
            _ = try await generate(client, key: key, user: "dave", prompt: "A new fact: my boat is the Tern.")
            let state = try await get(client, "/v1/users/dave/memory/export", key: key)
            func importState(_ query: String) async throws -> [String: Any] {
                let r = try await client.execute(uri: "/v1/users/dave/memory/import" + query, method: .post,
                                                 headers: [.authorization: "Bearer \(key)", .contentType: "application/octet-stream"],
                                                 body: state.body)
                #expect(r.status == .ok, "\(r.body.text.prefix(300))")
                return try r.body.json()
            }
            #expect(try await importState("?keep_queued=true")["cancelled_jobs"] as? [Int] == [])
            #expect(try await Self.states(db, "dave").last == "queued")
            #expect((try await importState("")["cancelled_jobs"] as? [Int])?.count == 1)
            #expect(try await Self.states(db, "dave").last == "cancelled")
        }
        await db.close()
    }

    @Test("a rollback from a version that is no longer current does nothing (the policy's compare-and-set)")
    func rollbackIfCurrent() async throws {
        let (db, key) = try await Fixture.database()
        try await Fixture.app(db).test(.live) { client in
            _ = try await generate(client, key: key, user: "erin", prompt: "My heron is called Stilt.")
            let tenant = try #require(try await db.tenant(named: "acme"))
            let erin = try #require(try await db.user(tenantID: tenant.id, name: try UserName("erin")))
            // Versions 1 and 2 (two resets), then a policy that measured version 1 tries to roll back.
            for _ in 0..<2 { #expect(try await post(client, "/v1/users/erin/memory/reset", key: key, #"{"keep_queued": true}"#).status == .ok) }
            let moved = try await db.rollback(userID: erin.id, to: 0, keep: 32, actor: "policy", cancelQueued: true, ifCurrent: 1)
            #expect(moved == .moved(current: 2))
            #expect(try await db.user(id: erin.id, tenantID: tenant.id)?.version == 2)
            #expect(try await Self.states(db, "erin") == ["queued"], "a skipped rollback cancelled jobs")
            let done = try await db.rollback(userID: erin.id, to: 0, keep: 32, actor: "policy", cancelQueued: true, ifCurrent: 2)
            guard case .rolledBack(let m) = done else { Issue.record("not rolled back: \(done)"); return }
            #expect(m.version == 3 && m.cancelledJobs.count == 1)
        }
        await db.close()
    }

    @Test("on-demand audits are limited per user per minute (429 with Retry-After); other users are not held back")
    func auditRateLimit() async throws {
        let (db, key) = try await Fixture.database()
        try await Fixture.app(db, { $0.auditsPerUserPerMinute = 1 }).test(.live) { client in
            for u in ["fay", "gus"] { _ = try await generate(client, key: key, user: u, prompt: "Hello", maxTokens: 1, learn: false) }
            let first = try await post(client, "/v1/users/fay/audit", key: key, "")
            #expect(first.status == .ok)
            let second = try await post(client, "/v1/users/fay/audit", key: key, "")
            let type = try errorObject(second)["type"] as? String
            #expect(second.status == .tooManyRequests && type == "rate_limit_error")
            let retry = try #require(second.headers[.retryAfter].flatMap { Int($0) })
            #expect((1...60).contains(retry))
            // Reading the stored report is not an audit.
            #expect(try await get(client, "/v1/users/fay/audit", key: key).status == .ok)
            #expect(try await post(client, "/v1/users/gus/audit", key: key, "").status == .ok)
        }
        await db.close()
    }
}
