// The HTTP service over real HTTP on loopback (Hummingbird's live test
// client), with a real PostgreSQL (StoreTestSupport's private cluster for this
// test process) and, unless a test needs the real one, the tiny Llama fixture as
// the backbone. Both models and the cluster must be present: the tests fail,
// saying how to get them, when they are not.
import Foundation
import Hummingbird
import HummingbirdTesting
import Logging
import Memory
import Model
import Testing
import TestSupport
@testable import Service
import Store
import StoreTestSupport

/// The backbone a service test runs on. `.tiny` (the default) for every
/// assertion that holds for any Llama (statuses, roles, queues, bit-identity
/// of forks, rollbacks and resets, streaming mechanics); `.real`, the default
/// SmolLM2 model, only where the assertion is about that model (learning
/// lowers a taught name's NLL, drift thresholds measured on it) or needs its
/// size (generations long or slow enough to race against).
enum TestModel: Sendable {
    case tiny, real

    func load() throws -> LlamaModel {
        switch self {
        case .tiny: try Fixtures.tinyLlama()
        case .real: try Fixtures.backbone()
        }
    }

    /// Small, quick levels for tests, fast every 8 learnable tokens, mid every
    /// 32, every token learned (no surprise gate). On the real model: its
    /// last six layers, width 8. On the tiny one: both its layers, width 32
    /// (so a user's state file is still larger than the request drain limit).
    var levels: LevelConfiguration {
        switch self {
        case .tiny: Fixture.tinyLevels
        case .real: Fixture.realLevels
        }
    }
}

enum Fixture {
    /// A migrated scratch database (on StoreTestSupport's private cluster,
    /// shared with StoreTests) with one tenant and its key.
    static func database(logger: Logger = Logger(label: "continuum.store")) async throws -> (Database, key: String) {
        let db = try await TestDatabase.make(logger: logger)
        try await db.migrate()
        let tenant = try await db.createTenant(name: "acme")
        let (_, key) = try await db.createKey(tenantID: tenant.id, role: .admin)
        return (db, key)
    }

    static let realLevels = try! LevelConfiguration(levels: [
        .init(name: "mid", chunkSize: 32, width: 8, layers: Array(24..<30), learningRate: 3e-3),
        .init(name: "fast", chunkSize: 8, width: 8, layers: Array(24..<30), learningRate: 1e-2),
    ], minSurprise: 0)
    static let tinyLevels = try! LevelConfiguration(levels: [
        .init(name: "mid", chunkSize: 32, width: 32, layers: [0, 1], learningRate: 3e-3),
        .init(name: "fast", chunkSize: 8, width: 32, layers: [0, 1], learningRate: 1e-2),
    ], minSurprise: 0)

    /// The service on any free port. Without `learning`, no worker applies
    /// the jobs requests enqueue (so a user's memory stays where it is).
    static func app(_ db: Database, on backbone: TestModel = .tiny, learning: Bool = false,
                    logger: Logger = Logger(label: "continuum"), _ configure: (inout ServiceConfiguration) -> Void = { _ in })
        throws -> some ApplicationProtocol {
        var c = ServiceConfiguration()
        c.port = 0
        c.learningWorkers = learning ? 1 : 0
        c.learningNice = 0   // the tests' other suites compute at normal priority meanwhile: do not starve this one's learning
        c.audit = false   // AuditTests turn it on
        c.auditReferenceTokens = 128
        configure(&c)
        return try buildApplication(configuration: c, model: try backbone.load(), levels: backbone.levels, store: db, logger: logger)
    }
}

extension ByteBuffer {
    var text: String { String(buffer: self) }
    func json() throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(buffer: self)) as? [String: Any])
    }
}

func post(_ client: some TestClientProtocol, _ uri: String, key: String?, _ body: String) async throws -> TestResponse {
    var headers: HTTPFields = [.contentType: "application/json"]
    if let key { headers[.authorization] = "Bearer \(key)" }
    return try await client.execute(uri: uri, method: .post, headers: headers, body: ByteBuffer(string: body))
}

/// POST on a connection of its own: the test client's one connection
/// pipelines requests one after another, so concurrent requests need their own.
func postOnNewConnection(port: Int, _ uri: String, key: String, _ body: String) async throws
    -> (status: HTTPResponse.Status, body: ByteBuffer) {
    try await requestOnNewConnection(port: port, .post, uri, headers: [.contentType: "application/json", .authorization: "Bearer \(key)"],
                                     body: ByteBuffer(string: body))
}

/// Any request on a connection of its own (also for requests after which the server may close the connection).
func requestOnNewConnection(port: Int, _ method: HTTPRequest.Method, _ uri: String, headers: HTTPFields, body: ByteBuffer?)
    async throws -> (status: HTTPResponse.Status, body: ByteBuffer) {
    let client = TestClient(host: "localhost", port: port, configuration: .init(timeout: .seconds(120)))
    client.connect()
    defer { Task { try? await client.shutdown() } }
    let r = try await client.execute(.init(uri, method: method, authority: "localhost", headers: headers, body: body))
    return (r.head.status, r.body ?? ByteBuffer())
}

/// The error object of an OpenAI-style error body.
func errorObject(_ r: TestResponse) throws -> [String: Any] {
    try #require(try r.body.json()["error"] as? [String: Any])
}

/// Greedy text the engine gives without the server, for comparison.
func greedy(_ prompt: String, maxTokens: Int, on backbone: TestModel = .tiny) throws -> String {
    let model = try backbone.load()
    var p = SamplingParameters()
    p.temperature = 0
    p.maxTokens = maxTokens
    return try Generator(model: model).generate(prompt: model.tokenizer.encode(prompt), parameters: p).text
}

@Suite("Service", .serialized)
struct ServiceTests {
    @Test("health, readiness, the spec and its docs page are public")
    func operations() async throws {
        let (db, _) = try await Fixture.database()
        try await Fixture.app(db).test(.live) { client in
            let h = try await client.execute(uri: "/healthz", method: .get)
            let status = try h.body.json()["status"] as? String
            #expect(h.status == .ok && status == "ok")
            let r = try await client.execute(uri: "/readyz", method: .get)
            #expect(r.status == .ok)
            let checks = try #require(try r.body.json()["checks"] as? [String: Bool])
            #expect(checks == ["model": true, "database": true, "migrations": true])
            let spec = try await client.execute(uri: "/openapi.yaml", method: .get)
            let file = try String(contentsOf: URL(fileURLWithPath: #filePath).deletingLastPathComponent()
                .appendingPathComponent("../../openapi.yaml"), encoding: .utf8)
            #expect(spec.status == .ok && spec.body.text == file)
            let docs = try await client.execute(uri: "/docs", method: .get)
            #expect(docs.status == .ok && docs.body.text.contains("/v1/chat/completions") && docs.body.text.contains("Liveness"))
        }
        await db.close()
    }

    @Test("no key, a wrong key or a revoked key gets 401 in the OpenAI error shape")
    func authentication() async throws {
        let (db, key) = try await Fixture.database()
        try await Fixture.app(db).test(.live) { client in
            let none = try await client.execute(uri: "/v1/models", method: .get)
            #expect(none.status == .unauthorized)
            #expect(try errorObject(none)["type"] as? String == "authentication_error")
            let wrong = try await client.execute(uri: "/v1/models", method: .get, headers: [.authorization: "Bearer ck-nope"])
            #expect(wrong.status == .unauthorized)
            let gen = try await post(client, "/v1/generate", key: "ck-nope", #"{"user": "a", "prompt": "hi"}"#)
            #expect(gen.status == .unauthorized)
            let ok = try await client.execute(uri: "/v1/models", method: .get, headers: [.authorization: "Bearer \(key)"])
            #expect(ok.status == .ok)
            let data = try #require(try ok.body.json()["data"] as? [[String: Any]])
            #expect(data.first?["id"] as? String == "continuum")
            let p = try #require(try await db.authenticate(key: key))
            #expect(try await db.revokeKey(id: p.keyID, tenantID: p.tenantID))
            let revoked = try await client.execute(uri: "/v1/models", method: .get, headers: [.authorization: "Bearer \(key)"])
            #expect(revoked.status == .unauthorized)
        }
        await db.close()
    }

    @Test("a new user's greedy generation equals the bare backbone's, as JSON and as server-sent events")
    func generate() async throws {
        let (db, key) = try await Fixture.database()
        let prompt = "The capital of France is"
        let expected = try greedy(prompt, maxTokens: 24)
        let promptTokens = try TestModel.tiny.load().tokenizer.encode(prompt).count
        #expect(promptTokens > 1)
        try await Fixture.app(db).test(.live) { client in
            let body = #"{"user": "alice", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 24}"#
            let r = try await post(client, "/v1/generate", key: key, body)
            #expect(r.status == .ok)
            let j = try r.body.json()
            #expect(j["text"] as? String == expected)
            #expect(j["memory_version"] as? Int == 0 && j["user"] as? String == "alice")
            let usage = try #require(j["usage"] as? [String: Int])
            #expect(usage["prompt_tokens"] == promptTokens && usage["total_tokens"] == promptTokens + usage["completion_tokens"]!)
            let s = try await post(client, "/v1/generate", key: key,
                                   #"{"user": "alice", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 24, "stream": true}"#)
            #expect(s.status == .ok && s.headers[.contentType] == "text/event-stream")
            var streamed = "", done: [String: Any]?
            for event in s.body.text.components(separatedBy: "\n\n") where !event.isEmpty {
                let lines = event.split(separator: "\n")
                let data = Data(lines.first { $0.hasPrefix("data: ") }!.dropFirst(6).utf8)
                let object = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
                if lines.first == "event: token" { streamed += object["text"] as! String } else { done = object }
            }
            #expect(streamed == expected && done?["text"] as? String == expected)
        }
        await db.close()
    }

    @Test("OpenAI-compatible chat and completions, streamed with usage")
    func openAICompatible() async throws {
        let (db, key) = try await Fixture.database()
        let model = try TestModel.tiny.load()
        let chatPrompt = model.chatTemplate.render([ChatMessage(role: "user", content: "What is 2+2?")])
        let expectedChat = try greedy(chatPrompt, maxTokens: 16)
        try await Fixture.app(db).test(.live) { client in
            let chat = #"{"model": "continuum", "messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0, "max_tokens": 16, "user": "bob"}"#
            let r = try await post(client, "/v1/chat/completions", key: key, chat)
            #expect(r.status == .ok)
            let choice = try #require((try r.body.json()["choices"] as? [[String: Any]])?.first)
            #expect((choice["message"] as? [String: String])?["content"] == expectedChat)
            let streamBody = chat.replacingOccurrences(of: #""user": "bob"}"#,
                                                       with: #""user": "bob", "stream": true, "stream_options": {"include_usage": true}}"#)
            let s = try await post(client, "/v1/chat/completions", key: key, streamBody)
            let events = s.body.text.components(separatedBy: "\n\n").filter { !$0.isEmpty }
            #expect(events.last == "data: [DONE]")
            var content = "", usage: [String: Any]?
            for e in events.dropLast() {
                let o = try #require(try JSONSerialization.jsonObject(with: Data(e.dropFirst(6).utf8)) as? [String: Any])
                #expect(o["object"] as? String == "chat.completion.chunk")
                if let u = o["usage"] as? [String: Any] { usage = u }
                for c in (o["choices"] as? [[String: Any]]) ?? [] { content += ((c["delta"] as? [String: Any])?["content"] as? String) ?? "" }
            }
            #expect(content == expectedChat && usage?["completion_tokens"] as? Int != nil)
            let completion = try await post(client, "/v1/completions", key: key,
                                            #"{"model": "continuum", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 24}"#)
            let text = (try completion.body.json()["choices"] as? [[String: Any]])?.first?["text"] as? String
            #expect(text == (try greedy("The capital of France is", maxTokens: 24)))
        }
        await db.close()
    }

    @Test("bad input gets the right status and an OpenAI-style error", arguments: [
        ("/v1/generate", "{not json", 400, "invalid_request_error", nil as String?),
        ("/v1/generate", #"{"prompt": "hi"}"#, 400, "invalid_request_error", nil),
        ("/v1/generate", #"{"user": "a"}"#, 400, "invalid_request_error", "prompt"),
        ("/v1/generate", #"{"user": "a", "prompt": "hi", "max_tokens": 100000}"#, 400, "invalid_request_error", "max_tokens"),
        ("/v1/generate", #"{"user": "a", "prompt": "hi", "temperature": -1}"#, 400, "invalid_request_error", "temperature"),
        ("/v1/chat/completions", #"{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}"#, 404, "invalid_request_error", "model"),
        ("/v1/chat/completions", #"{"model": "continuum", "messages": []}"#, 400, "invalid_request_error", "messages"),
        ("/v1/completions", #"{"model": "continuum", "prompt": ""}"#, 400, "invalid_request_error", "prompt"),
        ("/v1/completions", #"{"model": "continuum", "prompt": "hi", "temperature": 7}"#, 400, "invalid_request_error", "temperature"),
        ("/v1/generate", #"{"user": "a", "prompt": "hi", "max_tokens": 0}"#, 400, "invalid_request_error", "max_tokens"),
        ("/v1/feedback", #"{"generation_id": "gen-00000000-0000-0000-0000-000000000000", "rating": "positive"}"#, 404,
         "not_found_error", nil),
        ("/v1/feedback", #"{"generation_id": "gen-x", "rating": "meh"}"#, 400, "invalid_request_error", nil),
        ("/v1/users/nobody/memory/rollback", #"{"version": 1}"#, 404, "not_found_error", nil),
        ("/v1/users/nobody/memory/fork", #"{"to": "somebody"}"#, 404, "not_found_error", nil),
    ])
    func badInput(uri: String, body: String, status: Int, type: String, param: String?) async throws {
        let (db, key) = try await Fixture.database()
        try await Fixture.app(db).test(.live) { client in
            let r = try await post(client, uri, key: key, body)
            #expect(r.status.code == status, "\(r.body.text)")
            let e = try errorObject(r)
            #expect(e["type"] as? String == type && !((e["message"] as? String) ?? "").isEmpty)
            if let param { #expect(e["param"] as? String == param) }
        }
        await db.close()
    }

    @Test("admission: beyond max_queued generations in flight, 429 in the OpenAI shape")
    func admission() async throws {
        let (db, key) = try await Fixture.database()
        // The real model, on purpose: its 96-token generations outlast the other requests' arrival. The tiny
        // Llama cannot hold a slot long enough: its context is 256 positions, so at most 255 tokens, which
        // it generates in about 8 ms (measured in-process), less than the spread of four requests' arrival
        // (each authenticates and loads its user from PostgreSQL first). Whether two would overlap, and a
        // 429 be seen, would be chance.
        try await Fixture.app(db, on: .real, { $0.maxBatch = 1; $0.maxQueued = 1 }).test(.live) { client in
            let statuses = try await withThrowingTaskGroup(of: (Int, String).self) { group in
                for i in 0..<4 {
                    group.addTask {
                        let r = try await postOnNewConnection(port: client.port!, "/v1/generate", key: key,
                                               #"{"user": "u\#(i)", "prompt": "Once upon a time", "max_tokens": 96, "temperature": 0}"#)
                        let type = (try? r.body.json()["error"] as? [String: Any])??["type"] as? String
                        return (Int(r.status.code), type ?? "")
                    }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(statuses.contains { $0.0 == 200 }, "\(statuses)")
            #expect(statuses.contains { $0.0 == 429 && $0.1 == "rate_limit_error" }, "\(statuses)")
            #expect(statuses.allSatisfy { $0.0 == 200 || $0.0 == 429 })
        }
        await db.close()
    }

    @Test("limits: body size and prompt length give 413")
    func limits() async throws {
        let (db, key) = try await Fixture.database()
        try await Fixture.app(db, { $0.maxBodyBytes = 2048; $0.maxPromptTokens = 8 }).test(.live) { client in
            let big = try await post(client, "/v1/generate", key: key,
                                     #"{"user": "a", "prompt": ""# + String(repeating: "x", count: 4000) + #""}"#)
            #expect(big.status == .contentTooLarge)
            let long = try await post(client, "/v1/generate", key: key, #"{"user": "a", "prompt": "one two three four five six seven eight nine ten"}"#)
            let param = try errorObject(long)["param"] as? String
            #expect(long.status == .contentTooLarge && param == "prompt")
        }
        await db.close()
    }

    @Test("concurrent users are batched together and each gets its own greedy text")
    func concurrent() async throws {
        let (db, key) = try await Fixture.database()
        let prompts = ["The capital of France is", "Water boils at", "def fibonacci(n):", "Once upon a time",
                       "The largest planet is", "2 + 2 ="]
        let expected = try prompts.map { try greedy($0, maxTokens: 12) }
        try await Fixture.app(db).test(.live) { client in
            try await withThrowingTaskGroup(of: (Int, String).self) { group in
                for (i, p) in prompts.enumerated() {
                    group.addTask {
                        let body = try JSONSerialization.data(withJSONObject: ["user": "u\(i)", "prompt": p, "temperature": 0, "max_tokens": 12])
                        let r = try await postOnNewConnection(port: client.port!, "/v1/generate", key: key,
                                                              String(decoding: body, as: UTF8.self))
                        return (i, (try r.body.json()["text"] as? String) ?? "<\(r.status)>")
                    }
                }
                for try await (i, text) in group { #expect(text == expected[i], "prompt \(i)") }
            }
        }
        await db.close()
    }
}
