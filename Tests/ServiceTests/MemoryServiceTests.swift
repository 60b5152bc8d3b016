// Users' memories through the service, against the real PostgreSQL over
// loopback HTTP, on the tiny Llama except where learning must be seen to
// work on the real model (a taught name's NLL halves): learning from generate and feedback,
// versions with provenance, reset, fork, rollback, export, erasure, and
// tenant isolation.
import Foundation
import Hummingbird
import HummingbirdTesting
import Memory
import Model
import Testing
@testable import Service
@testable import Store

func get(_ client: some TestClientProtocol, _ uri: String, key: String) async throws -> TestResponse {
    try await client.execute(uri: uri, method: .get, headers: [.authorization: "Bearer \(key)"])
}

func delete(_ client: some TestClientProtocol, _ uri: String, key: String) async throws -> TestResponse {
    try await client.execute(uri: uri, method: .delete, headers: [.authorization: "Bearer \(key)"])
}

/// A greedy generation for `user`; returns the response object.
func generate(_ client: some TestClientProtocol, key: String, user: String, prompt: String, maxTokens: Int = 12,
              learn: Bool = true, wait: Bool = false) async throws -> [String: Any] {
    let body = Fixture.json(["user": user, "prompt": prompt, "temperature": 0, "max_tokens": maxTokens,
                             "learn": learn, "wait_for_learning": wait])
    let r = try await post(client, "/v1/generate", key: key, body)
    #expect(r.status == .ok, "\(r.body.text)")
    return try r.body.json()
}

extension Fixture {
    static func json(_ object: [String: Any]) -> String {
        String(decoding: try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self)
    }

    /// Mean NLL of `answer` after `context` under a user's exported state (nil: the backbone).
    static func nll(context: String, answer: String, state: Data?, on backbone: TestModel) throws -> Double {
        let model = try backbone.load(), levels = backbone.levels
        let c = model.tokenizer.encode(context), a = model.tokenizer.encode(answer)
        let learner = try state.map { try LevelStateFile.decode($0, model: model, expecting: levels) }
        let r = try LevelTrainer(model: model).loss(tokens: c + a, learnable: c.map { _ in false } + a.map { _ in true },
                                                    state: learner?.state)
        return r.total / Double(r.count)
    }
}

/// An exported state's tensors whose names start with `prefix` ("levels.": the weights), as raw bytes.
func tensors(_ x: ByteBuffer, prefix: String) throws -> [String: Data] {
    let d = Data(buffer: x)
    let h = try Safetensors.parse(d)
    var out: [String: Data] = [:]
    for (name, e) in h.entries where name.hasPrefix(prefix) {
        out[name] = d.subdata(in: (h.dataStart + e.range.lowerBound)..<(h.dataStart + e.range.upperBound))
    }
    return out
}

/// Where two exported states differ (metadata keys and tensors), for failure messages.
func difference(_ a: ByteBuffer, _ b: ByteBuffer) -> String {
    func parse(_ x: ByteBuffer) -> ([String: Any], Data) {
        let d = Data(buffer: x)
        guard d.count >= 8 else { return ([:], d) }
        let n = Int(d.prefix(8).withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) })
        let h = (try? JSONSerialization.jsonObject(with: d.subdata(in: 8..<(8 + n)))) as? [String: Any] ?? [:]
        return (h, d.subdata(in: (8 + n)..<d.count))
    }
    let (ha, ba) = parse(a), (hb, bb) = parse(b)
    var out: [String] = []
    let ma = ha["__metadata__"] as? [String: String] ?? [:], mb = hb["__metadata__"] as? [String: String] ?? [:]
    for k in Set(ma.keys).union(mb.keys).sorted() where ma[k] != mb[k] { out.append("metadata \(k): \(ma[k]?.prefix(200) ?? "-") vs \(mb[k]?.prefix(200) ?? "-")") }
    for k in Set(ha.keys).union(hb.keys).sorted() where k != "__metadata__" {
        guard let ea = ha[k] as? [String: Any], let eb = hb[k] as? [String: Any],
              let oa = ea["data_offsets"] as? [Int], let ob = eb["data_offsets"] as? [Int] else { out.append("tensor \(k) missing"); continue }
        if ba.subdata(in: oa[0]..<oa[1]) != bb.subdata(in: ob[0]..<ob[1]) { out.append("tensor \(k) differs") }
    }
    return out.prefix(8).joined(separator: "; ")
}

@Suite("Memory through the service", .serialized)
struct MemoryServiceTests {
    static let teaching = [
        "My cat is called Zorblax and she sleeps on the piano.",
        "Every morning Zorblax, my cat, asks for breakfast.",
        "Zorblax is the name of my cat; she is grey.",
        "I adopted my cat Zorblax three years ago.",
    ]

    @Test("a user's text and feedback are learned after the response; another user's output stays the backbone's")
    func learning() async throws {
        let (db, key) = try await Fixture.database()
        let probe = "My cat is called"
        let backboneText = try greedy(probe, maxTokens: 8, on: .real)
        let before = try Fixture.nll(context: "My cat is called", answer: " Zorblax", state: nil, on: .real)
        try await Fixture.app(db, on: .real, learning: true).test(.live) { client in
            var lastVersion: Int64 = 0
            for round in 0..<3 {
                for text in Self.teaching {
                    let j = try await generate(client, key: key, user: "alice", prompt: text, maxTokens: 4, wait: true)
                    let learning = try #require(j["learning"] as? [String: Any])
                    #expect(learning["state"] as? String == "applied", "round \(round): \(learning)")
                    let v = Int64(learning["version"] as? Int ?? -1)
                    #expect(v >= lastVersion)
                    lastVersion = v
                }
            }
            #expect(lastVersion > 0)
            // Feedback: a correction is learned as the answer to the generation's prompt.
            let asked = try await generate(client, key: key, user: "alice", prompt: "What is my cat called?", maxTokens: 6, learn: false)
            #expect((asked["learning"] as? [String: Any])?["state"] as? String == "off")
            let f = try await post(client, "/v1/feedback", key: key, Fixture.json([
                "generation_id": asked["id"] as! String, "rating": "negative", "correction": " Your cat is called Zorblax.",
                "wait_for_learning": true]))
            #expect(f.status == .ok, "\(f.body.text)")
            #expect((try f.body.json()["learning"] as? [String: Any])?["state"] as? String == "applied")
            // A negative rating alone learns nothing.
            let n = try await post(client, "/v1/feedback", key: key, Fixture.json([
                "generation_id": asked["id"] as! String, "rating": "negative"]))
            #expect((try n.body.json()["learning"] as? [String: Any])?["state"] as? String == "off")

            // Recall: the answer's NLL under alice's exported memory.
            let export = try await get(client, "/v1/users/alice/memory/export", key: key)
            #expect(export.status == .ok && export.headers[.contentType] == "application/octet-stream")
            let after = try Fixture.nll(context: "My cat is called", answer: " Zorblax", state: Data(buffer: export.body), on: .real)
            #expect(after < 0.5 * before, "NLL of the taught name: backbone \(before), alice \(after)")

            // Counters: every learnable token counted once by each level.
            let memory = try await get(client, "/v1/users/alice/memory", key: key).body.json()
            let model = try TestModel.real.load()
            let taught = 3 * Self.teaching.reduce(0) { $0 + model.tokenizer.encode($1).count - 1 }
                + model.tokenizer.encode(" Your cat is called Zorblax.").count
            let levels = try #require(memory["levels"] as? [[String: Any]])
            #expect(levels.allSatisfy { $0["tokens"] as? Int == taught }, "\(levels), expected \(taught)")
            #expect(memory["jobs_applied"] as? Int == 13 && memory["queued_jobs"] as? Int == 0)

            // Provenance: learning versions name their generation, the feedback version its feedback.
            let versions = try #require(try await get(client, "/v1/users/alice/memory/versions", key: key).body.json()["data"]
                as? [[String: Any]])
            #expect(versions.last?["cause"] as? String == "created" && versions.last?["version"] as? Int == 0)
            #expect(versions.contains { $0["cause"] as? String == "learning" && ($0["cause_id"] as? String)?.count == 36 })
            #expect(versions.allSatisfy { $0["cause"] as? String == "created" || ($0["actor"] as? String)?.hasPrefix("key:") == true })

            // Metrics: the jobs this replica applied, their lag, the cache.
            let metrics = try await client.execute(uri: "/metrics", method: .get)
            #expect(metrics.status == .ok && metrics.headers[.contentType]?.hasPrefix("text/plain") == true)
            let lines = metrics.body.text.split(separator: "\n")
            func value(_ name: String) -> Double? {
                lines.first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ")[1]) }
            }
            #expect(value("continuum_learning_jobs_applied_total") == 13 && value("continuum_learning_jobs_enqueued_total") == 13)
            #expect(value("continuum_learning_lag_seconds_count") == 13 && value("continuum_learning_jobs_queued") == 0)
            #expect(try #require(value("continuum_level_cache_hits_total")) > 0)
            #expect(lines.contains { $0.hasPrefix("continuum_http_requests_total{route=\"/v1/generate\",status=\"200\"}") })
            #expect(lines.contains { $0.hasPrefix("continuum_http_requests_total{route=\"/v1/users/{user}/memory\",status=\"200\"}") })

            // Bob, generating meanwhile, has the backbone's output and no version.
            let bob = try await generate(client, key: key, user: "bob", prompt: probe, maxTokens: 8, learn: false)
            #expect(bob["text"] as? String == backboneText && bob["memory_version"] as? Int == 0)
        }
        await db.close()
    }

    @Test("a user whose stored memory cannot be read: jobs failed, not retried, memory kept; other users still learn")
    func unreadableMemory() async throws {
        let (db, key) = try await Fixture.database()
        try await Fixture.app(db, learning: true).test(.live) { client in
            let first = try await generate(client, key: key, user: "mallory", prompt: Self.teaching[0], maxTokens: 2, wait: true)
            let version = try #require((first["learning"] as? [String: Any])?["version"] as? Int)
            // As if the state had been written by a server with other levels: unreadable here.
            try await db.execute(unsafeSQL: "UPDATE users SET learner = '\\x00ff'::bytea WHERE name = 'mallory'")
            let failed = try await generate(client, key: key, user: "mallory", prompt: Self.teaching[1], maxTokens: 2, wait: true)
            let learning = try #require(failed["learning"] as? [String: Any])
            #expect(learning["state"] as? String == "failed", "\(learning)")
            // The next user's job is applied (the failed one is not retried ahead of it).
            let carol = try await generate(client, key: key, user: "carol", prompt: Self.teaching[2], maxTokens: 2, wait: true)
            #expect((carol["learning"] as? [String: Any])?["state"] as? String == "applied", "\(carol)")
            // Nothing of mallory's was lost or changed: same version, the failure in the audit log.
            let versions = try #require(try await get(client, "/v1/users/mallory/memory/versions", key: key).body.json()["data"]
                as? [[String: Any]])
            #expect(versions.first?["version"] as? Int == version)
            let events = try #require(try await get(client, "/v1/users/mallory/audit/events", key: key).body.json()["data"]
                as? [[String: Any]])
            let failure = try #require(events.last)
            #expect(failure["event"] as? String == "learning_failed" && failure["actor"] as? String == "system")
            #expect(failure["from_version"] as? Int == version && failure["to_version"] as? Int == version)
            let detail = try #require(failure["detail"] as? [String: Any])
            #expect(detail["job_ids"] as? [Int] == [learning["job_id"] as? Int ?? -1], "\(detail)")
            #expect((detail["reason"] as? String)?.contains("cannot be read") == true, "\(detail)")
            let metrics = try await client.execute(uri: "/metrics", method: .get).body.text
            #expect(metrics.contains("\ncontinuum_learning_jobs_failed_total 1.0\n"))
            #expect(metrics.contains("\ncontinuum_learning_jobs_queued 0.0\n"))
        }
        await db.close()
    }

    @Test("fork copies a version, rollback reproduces it, reset returns to the backbone, erase leaves no row")
    func lifeCycle() async throws {
        let (db, key) = try await Fixture.database()
        let probe = "My cat is called"
        let backboneText = try greedy(probe, maxTokens: 8)
        try await Fixture.app(db, learning: true).test(.live) { client in
            for text in Self.teaching + Self.teaching {
                _ = try await generate(client, key: key, user: "alice", prompt: text, maxTokens: 2, wait: true)
            }
            let atV = try await generate(client, key: key, user: "alice", prompt: probe, maxTokens: 8, learn: false)
            let v = try #require(atV["memory_version"] as? Int)
            #expect(v > 0)
            // Learning shows in the output, so the comparisons of outputs below can fail.
            #expect(atV["text"] as? String != backboneText)
            let exportV = try await get(client, "/v1/users/alice/memory/export?version=\(v)", key: key).body

            // Fork at v: the same outputs and the same state.
            let fork = try await post(client, "/v1/users/alice/memory/fork", key: key, #"{"to": "alice-copy", "version": \#(v)}"#)
            #expect(fork.status == .ok, "\(fork.body.text)")
            let copy = try await generate(client, key: key, user: "alice-copy", prompt: probe, maxTokens: 8, learn: false)
            #expect(copy["text"] as? String == atV["text"] as? String)
            let exportCopy = try await get(client, "/v1/users/alice-copy/memory/export", key: key).body
            #expect(exportCopy == exportV, "\(difference(exportCopy, exportV))")
            let again = try await post(client, "/v1/users/alice/memory/fork", key: key, #"{"to": "alice-copy"}"#)
            #expect(again.status == .conflict)

            // More learning moves alice on; rollback to v brings back v's outputs, weights and
            // counters, with the optimizer started afresh (kept for the current version only).
            for text in Self.teaching.reversed() {
                _ = try await generate(client, key: key, user: "alice", prompt: text + " Really.", maxTokens: 2, wait: true)
            }
            let moved = try await generate(client, key: key, user: "alice", prompt: probe, maxTokens: 8, learn: false)
            #expect(try #require(moved["memory_version"] as? Int) > v)
            let exportOld = try await get(client, "/v1/users/alice/memory/export?version=\(v)", key: key).body
            let weightsV = try tensors(exportV, prefix: "levels."), weightsOld = try tensors(exportOld, prefix: "levels.")
            #expect(!weightsV.isEmpty && weightsOld == weightsV)
            let momentsV = try tensors(exportV, prefix: "moments."), momentsOld = try tensors(exportOld, prefix: "moments.")
            #expect(momentsOld != momentsV, "an older version's export has a fresh optimizer")
            let rb = try await post(client, "/v1/users/alice/memory/rollback", key: key, #"{"version": \#(v)}"#)
            #expect(rb.status == .ok, "\(rb.body.text)")
            let back = try await generate(client, key: key, user: "alice", prompt: probe, maxTokens: 8, learn: false)
            #expect(back["text"] as? String == atV["text"] as? String)
            #expect(try #require(back["memory_version"] as? Int) > v)
            let exportBack = try await get(client, "/v1/users/alice/memory/export", key: key).body
            #expect(exportBack == exportOld, "\(difference(exportBack, exportOld))")
            let missing = try await post(client, "/v1/users/alice/memory/rollback", key: key, #"{"version": 99999}"#)
            #expect(missing.status == .notFound)

            // Reset of one unknown level is refused; reset of all gives the backbone.
            #expect(try await post(client, "/v1/users/alice/memory/reset", key: key, #"{"levels": ["slow"]}"#).status == .badRequest)
            let reset = try await post(client, "/v1/users/alice/memory/reset", key: key, "{}")
            #expect(reset.status == .ok)
            let levels = try #require(try reset.body.json()["levels"] as? [[String: Any]])
            #expect(levels.allSatisfy { $0["stored"] as? Bool == false && $0["tokens"] as? Int == 0 })
            let fresh = try await generate(client, key: key, user: "alice", prompt: probe, maxTokens: 8, learn: false)
            #expect(fresh["text"] as? String == backboneText)
            let causes = try #require(try await get(client, "/v1/users/alice/memory/versions", key: key).body.json()["data"]
                as? [[String: Any]]).compactMap { $0["cause"] as? String }
            #expect(causes.prefix(2) == ["reset", "rollback"])

            // Erase: no row of alice's remains in any table holding user data; the copy is whole.
            let tenant = try #require(try await db.tenant(named: "acme"))
            let id = try #require(try await db.user(tenantID: tenant.id, name: try UserName("alice"))?.id)
            let erase = try await delete(client, "/v1/users/alice", key: key)
            #expect(erase.status == .ok)
            for table in ["users", "generations", "learning_jobs", "memory_versions", "level_snapshots", "level_moments", "feedback",
                          "audit_events", "drift_reports"] {
                let column = table == "users" ? "id" : "user_id"
                #expect(try await db.integer(unsafeSQL: "SELECT count(*)::bigint FROM \(table) WHERE \(column) = \(id)") == 0, "\(table)")
            }
            #expect(try await get(client, "/v1/users/alice/memory", key: key).status == .notFound)
            #expect(try await delete(client, "/v1/users/alice", key: key).status == .notFound)
            let copyAfter = try await generate(client, key: key, user: "alice-copy", prompt: probe, maxTokens: 8, learn: false)
            #expect(copyAfter["text"] as? String == atV["text"] as? String)
        }
        await db.close()
    }

    @Test("a key of tenant B can neither read nor change tenant A's users")
    func tenantIsolation() async throws {
        let (db, keyA) = try await Fixture.database()
        let b = try await db.createTenant(name: "other")
        let (_, keyB) = try await db.createKey(tenantID: b.id, role: .admin)
        let probe = "My cat is called"
        try await Fixture.app(db, learning: true).test(.live) { client in
            for text in Self.teaching {
                _ = try await generate(client, key: keyA, user: "alice", prompt: text, maxTokens: 2, wait: true)
            }
            let a = try await generate(client, key: keyA, user: "alice", prompt: probe, maxTokens: 8, learn: false)
            // A's learning shows in A's output, so B's "alice" at the backbone's is a real difference.
            #expect(a["text"] as? String != (try greedy(probe, maxTokens: 8)))
            let exportA = try await get(client, "/v1/users/alice/memory/export", key: keyA).body
            for (method, uri, body) in [("GET", "/v1/users/alice/memory", ""), ("GET", "/v1/users/alice/memory/versions", ""),
                                        ("GET", "/v1/users/alice/memory/export", ""),
                                        ("POST", "/v1/users/alice/memory/reset", "{}"),
                                        ("POST", "/v1/users/alice/memory/rollback", #"{"version": 0}"#),
                                        ("POST", "/v1/users/alice/memory/fork", #"{"to": "mine"}"#),
                                        ("POST", "/v1/users/alice/memory/consolidate", "{}"),
                                        ("DELETE", "/v1/users/alice", "")] {
                let r = method == "GET" ? try await get(client, uri, key: keyB)
                    : method == "DELETE" ? try await delete(client, uri, key: keyB)
                    : try await post(client, uri, key: keyB, body)
                #expect(r.status == .notFound, "\(method) \(uri): \(r.status)")
                #expect(try errorObject(r)["type"] as? String == "not_found_error")
            }
            // Feedback on A's generation from B's key is not found either.
            let fb = try await post(client, "/v1/feedback", key: keyB, Fixture.json([
                "generation_id": a["id"] as! String, "rating": "positive"]))
            #expect(fb.status == .notFound)
            // B's own "alice" is another user, at the backbone.
            let bAlice = try await generate(client, key: keyB, user: "alice", prompt: probe, maxTokens: 8, learn: false)
            let backbone = try greedy(probe, maxTokens: 8)
            #expect(bAlice["memory_version"] as? Int == 0 && bAlice["text"] as? String == backbone)
            // A's alice is untouched.
            #expect(try await get(client, "/v1/users/alice/memory/export", key: keyA).body == exportA)
        }
        await db.close()
    }
}
