// Recall through the API (issue 12.6): a user teaches the first benchmark
// fact set (scripts/bench-data/facts-1.json, 20 facts in 80 turns) through
// /v1/chat/completions, the default levels learn from each turn, sleep
// consolidates fast into mid (fast cleared), and the held-out questions are
// asked through the API, greedily, with the benchmark's lead-in. The real
// model and the server's default level configuration and consolidation
// (transplant), as `continuum bench learn` measures them; the thresholds sit
// below what was measured.
import Foundation
import Hummingbird
import HummingbirdTesting
import Memory
import Model
import Testing
import TestSupport
@testable import Service

struct RecallFact: Decodable {
    let answer: String
    let teach: [String]
    let question: String
    let leadIn: String
    enum CodingKeys: String, CodingKey { case answer, teach, question, leadIn = "lead_in" }
}

@Suite("Recall through the API", .serialized)
struct RecallServiceTests {
    static let facts: [RecallFact] = {
        struct Set: Decodable { let facts: [RecallFact] }
        let url = Fixtures.tests.deletingLastPathComponent().appendingPathComponent("scripts/bench-data/facts-1.json")
        return try! JSONDecoder().decode(Set.self, from: Data(contentsOf: url)).facts
    }()

    /// Whether `text`, after leading spaces, starts with `word` as a whole word (the benchmark's rule).
    static func startsWithWord(_ text: String, _ word: String) -> Bool {
        let t = text.drop { $0 == " " }
        guard t.hasPrefix(word) else { return false }
        return t.dropFirst(word.count).first.map { !($0.isLetter || $0.isNumber) } ?? true
    }

    @Test("facts taught in chat turns are recalled on held-out questions after sleep; another user's answers stay the backbone's")
    func recall() async throws {
        let (db, key) = try await Fixture.database()
        let model = try TestModel.real.load()
        var c = ServiceConfiguration()
        c.port = 0
        c.learningWorkers = 1
        c.learningNice = 0
        c.audit = false
        let app = try buildApplication(configuration: c, model: model, store: db)
        try await app.test(.live) { client in
            let port = try #require(client.port)
            func call(_ method: HTTPRequest.Method, _ uri: String, _ body: [String: Any]? = nil) async throws -> [String: Any] {
                let tc = TestClient(host: "localhost", port: port, configuration: .init(timeout: .seconds(900)))
                tc.connect()
                defer { Task { try? await tc.shutdown() } }
                var headers: HTTPFields = [.authorization: "Bearer \(key)"]
                if body != nil { headers[.contentType] = "application/json" }
                let r = try await tc.execute(.init(uri, method: method, authority: "localhost", headers: headers,
                                                   body: body.map { ByteBuffer(string: Fixture.json($0)) }))
                let buffer = r.body ?? ByteBuffer()
                try #require(r.head.status == .ok, "\(method) \(uri): \(r.head.status) \(buffer.text)")
                return try buffer.json()
            }
            // The benchmark's order: round r teaches every fact's r-th turn, facts interleaved.
            let n = Self.facts.count
            for round in 0..<4 {
                for i in 0..<n {
                    let f = Self.facts[(i * 7 + round * 3) % n]
                    _ = try await call(.post, "/v1/chat/completions", [
                        "model": "continuum", "user": "alice", "temperature": 0, "max_tokens": 1,
                        "messages": [["role": "user", "content": f.teach[round]]]])
                }
            }
            var memory: [String: Any] = [:]
            for _ in 0..<1200 {
                memory = try await call(.get, "/v1/users/alice/memory")
                if memory["queued_jobs"] as? Int == 0 { break }
                try await Task.sleep(for: .milliseconds(500))
            }
            #expect(memory["jobs_applied"] as? Int == 4 * n && memory["queued_jobs"] as? Int == 0, "\(memory)")

            // Greedy answers after the benchmark's lead-in, through /v1/completions (learn: false, so asking teaches nothing).
            func answers(_ user: String?) async throws -> [String] {
                var out: [String] = []
                for f in Self.facts {
                    let prompt = model.chatTemplate.render([ChatMessage(role: "user", content: f.question)]) + f.leadIn
                    var body: [String: Any] = ["model": "continuum", "prompt": prompt, "temperature": 0,
                                               "max_tokens": model.tokenizer.encode(" " + f.answer).count + 2]
                    if let user { body["user"] = user; body["learn"] = false }
                    let r = try await call(.post, "/v1/completions", body)
                    out.append(try #require((r["choices"] as? [[String: Any]])?.first?["text"] as? String))
                }
                return out
            }
            func recalled(_ texts: [String]) -> Int { zip(Self.facts, texts).filter { Self.startsWithWord($1, $0.answer) }.count }
            let backbone = try await answers(nil)
            let awake = try await answers("alice")

            let slept = try await call(.post, "/v1/users/alice/memory/consolidate", [:])
            // The service's default sleep: the fast level's units written into mid (transplant), fast cleared.
            #expect((slept["units_written"] as? Int ?? 0) > 0 && (slept["kl_after"] as? Double ?? 1) < (slept["kl_before"] as? Double ?? 0),
                    "\(slept)")
            let asleep = try await answers("alice")
            // The knowledge is in mid: the new current version stores no fast level.
            let versions = try #require(try await call(.get, "/v1/users/alice/memory/versions")["data"] as? [[String: Any]])
            #expect(versions.first?["cause"] as? String == "consolidate" && versions.first?["levels"] as? [String] == ["mid"],
                    "\(versions.first ?? [:])")
            // Another user, never taught, asked alongside: the backbone's answers exactly.
            async let other = answers("bob")
            let again = try await answers("alice")
            let bob = try await other

            print("recall through the API: backbone \(recalled(backbone))/\(n), wake \(recalled(awake))/\(n), after sleep \(recalled(asleep))/\(n)")
            for (f, (a, s)) in zip(Self.facts, zip(awake, asleep)) { print("  \(f.answer): wake '\(a)', sleep '\(s)'") }
            #expect(recalled(backbone) == 0)
            // Measured on 2026-12-02 (AVX-512 Xeon, debug build): wake 6/20, after sleep 6/20. The bars sit below.
            #expect(recalled(awake) >= 4, "wake: \(awake)")
            #expect(recalled(asleep) >= 4, "after sleep: \(asleep)")
            #expect(again == asleep)
            #expect(bob == backbone)
        }
    }
}
