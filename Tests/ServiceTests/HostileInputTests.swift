// Hostile and malformed requests against the service over real HTTP on
// loopback: each gets the status the API documents (never a 5xx), the
// process keeps serving (/healthz answers after every one), and nothing
// stored changes. Classes: non-finite and far-off times, numbers out of
// range, user ids that break the policy (length, NUL and control or format
// characters, bad percent-encoding, non-UTF-8), media types, bodies too
// large (declared and streamed), unauthenticated bodies, garbage state files,
// JSON that does not fit the API, oversized corrections and probes, unknown
// routes and methods, malformed Authorization headers.
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Testing
@testable import Service
@testable import Store

@Suite("Hostile input", .serialized)
struct HostileInputTests {
    /// One hostile request and the status it must get.
    struct Case: Sendable {
        let name: String
        let method: HTTPRequest.Method
        let uri: String
        var contentType: String? = "application/json"
        var body: [UInt8] = []
        var key: Bool = true
        let status: Int

        init(_ name: String, _ method: HTTPRequest.Method, _ uri: String, json: String? = nil, bytes: [UInt8]? = nil,
             contentType: String? = "application/json", key: Bool = true, _ status: Int) {
            self.name = name
            self.method = method
            self.uri = uri
            self.body = bytes ?? json.map { Array($0.utf8) } ?? []
            self.contentType = contentType
            self.key = key
            self.status = status
        }
    }

    static var random4K: [UInt8] {
        var g = SeededBytes(seed: 11)
        return (0..<4096).map { _ in g.next() }
    }

    static let longUser = String(repeating: "u", count: 300)
    static let cases: [Case] = [
        // Times: non-finite, huge, malformed; the valid extremes are fine.
        Case("since=nan", .get, "/v1/audit/events?since=nan", 400),
        Case("since=1e300", .get, "/v1/audit?since=1e300", 400),
        Case("until=inf", .get, "/v1/users/alice/audit/events?until=inf", 400),
        Case("until=-inf", .get, "/v1/audit/events?until=-inf", 400),
        Case("since=-1e20", .get, "/v1/audit/events?since=-1e20", 400),
        Case("since=1e15", .get, "/v1/audit/events?since=1e15", 400),
        Case("since=month 13", .get, "/v1/audit/events?since=2026-13-45T00:00:00Z", 400),
        Case("since empty", .get, "/v1/audit/events?since=", 400),
        Case("since=year 0", .get, "/v1/audit/events?since=0000-01-01T00:00:00Z", 400),
        Case("since=0 is fine", .get, "/v1/audit/events?since=0", 200),
        Case("until=9999-12-31 is fine", .get, "/v1/audit/events?until=9999-12-31T23:59:59Z", 200),
        Case("since ISO with fraction is fine", .get, "/v1/audit?since=2026-01-01T00:00:00.250Z", 200),
        // Numbers and enums in the query.
        Case("limit=0", .get, "/v1/audit/events?limit=0", 400),
        Case("limit=-1", .get, "/v1/users/alice/audit/events?limit=-1", 400),
        Case("limit overflowing Int64", .get, "/v1/audit/events?limit=99999999999999999999", 400),
        Case("limit=abc", .get, "/v1/audit?limit=abc", 400),
        Case("offset=-1", .get, "/v1/audit?offset=-1", 400),
        Case("flagged=maybe", .get, "/v1/audit?flagged=maybe", 400),
        Case("format=xml", .get, "/v1/audit?format=xml", 400),
        Case("metric=bogus", .get, "/v1/audit?metric=bogus", 400),
        Case("order=sideways", .get, "/v1/audit?order=sideways", 400),
        Case("every ranking metric is fine (top1_agreement has a digit)", .get, "/v1/audit?metric=top1_agreement", 200),
        Case("ranking by param_change ascending is fine", .get, "/v1/audit?metric=param_change&order=asc&flagged=true", 200),
        Case("export version=-5", .get, "/v1/users/alice/memory/export?version=-5", 400),
        Case("export version=abc", .get, "/v1/users/alice/memory/export?version=abc", 400),
        Case("export version=huge", .get, "/v1/users/alice/memory/export?version=9223372036854775807", 404),
        Case("import keep_queued=perhaps", .post, "/v1/users/alice/memory/import?keep_queued=perhaps", bytes: [1, 2, 3],
             contentType: "application/octet-stream", 400),
        // User ids: the same policy on generated and hand-written routes.
        Case("user 300 bytes, generated route", .get, "/v1/users/\(longUser)/memory", 400),
        Case("user 300 bytes, hand route", .get, "/v1/users/\(longUser)/audit", 400),
        Case("user 300 bytes, import", .post, "/v1/users/\(longUser)/memory/import", bytes: [1], contentType: "application/octet-stream", 400),
        Case("user 300 bytes in a body", .post, "/v1/generate", json: #"{"user": "\#(longUser)", "prompt": "hi", "max_tokens": 1}"#, 400),
        Case("user with NUL, generated route", .post, "/v1/users/a%00b/memory/reset", json: "{}", 400),
        Case("user with NUL, hand route", .get, "/v1/users/a%00b/audit/events", 400),
        Case("user with NUL in a body", .post, "/v1/generate", json: #"{"user": "a\u0000b", "prompt": "hi", "max_tokens": 1}"#, 400),
        Case("user with a newline", .get, "/v1/users/a%0Ab/memory", 400),
        Case("user with DEL", .get, "/v1/users/a%7Fb/memory/versions", 400),
        Case("user with a bidi override (Cf)", .get, "/v1/users/a%E2%80%AEb/memory", 400),
        Case("user with bad percent-encoding", .get, "/v1/users/a%ZZ/memory", 400),
        Case("user with a truncated escape", .get, "/v1/users/a%4/audit", 400),
        Case("user not UTF-8", .get, "/v1/users/%FF%FE/memory", 400),
        Case("user with U+2028 in a body", .post, "/v1/completions",
             json: #"{"model": "continuum", "user": "a\u2028b", "prompt": "hi", "max_tokens": 1}"#, 400),
        Case("fork to an empty user", .post, "/v1/users/alice/memory/fork", json: #"{"to": ""}"#, 400),
        Case("fork to a user with NUL", .post, "/v1/users/alice/memory/fork", json: #"{"to": "x\u0000"}"#, 400),
        Case("a valid unicode user that does not exist", .get, "/v1/users/caf%C3%A9/memory", 404),
        // Media types.
        Case("text/plain to generate", .post, "/v1/generate", json: #"{"user": "a", "prompt": "hi"}"#, contentType: "text/plain", 415),
        Case("text/plain to feedback (generated)", .post, "/v1/feedback", json: #"{"generation_id": "x", "rating": "positive"}"#,
             contentType: "text/plain", 415),
        Case("form to reset (generated)", .post, "/v1/users/alice/memory/reset", json: "levels=fast",
             contentType: "application/x-www-form-urlencoded", 415),
        Case("JSON to import", .post, "/v1/users/alice/memory/import", json: "{}", contentType: "application/json", 415),
        Case("no Content-Type is taken as JSON", .post, "/v1/users/alice/memory/rollback", json: #"{"version": 999}"#,
             contentType: nil, 404),
        // State files that are not state files.
        Case("import 8 bytes of 0xFF", .post, "/v1/users/alice/memory/import", bytes: [UInt8](repeating: 0xFF, count: 8),
             contentType: "application/octet-stream", 400),
        Case("import 4 KB of random bytes", .post, "/v1/users/alice/memory/import", bytes: random4K,
             contentType: "application/octet-stream", 400),
        Case("import an empty body", .post, "/v1/users/alice/memory/import", bytes: [], contentType: "application/octet-stream", 400),
        Case("import a header length past the end", .post, "/v1/users/alice/memory/import",
             bytes: [0xF0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F] + Array("{}".utf8), contentType: "application/octet-stream", 400),
        // JSON that does not fit.
        Case("not JSON", .post, "/v1/generate", json: "{not json", 400),
        Case("deeply nested JSON", .post, "/v1/chat/completions", json: String(repeating: "[", count: 100_000), 400),
        Case("max_tokens 1e400", .post, "/v1/generate", json: #"{"user": "a", "prompt": "hi", "max_tokens": 1e400}"#, 400),
        Case("max_tokens beyond Int64", .post, "/v1/generate", json: #"{"user": "a", "prompt": "hi", "max_tokens": 9223372036854775808}"#, 400),
        Case("top_p 1e-60", .post, "/v1/generate", json: #"{"user": "a", "prompt": "hi", "top_p": 1e-60}"#, 400),
        Case("repetition_penalty 1e300", .post, "/v1/generate", json: #"{"user": "a", "prompt": "hi", "repetition_penalty": 1e300}"#, 400),
        Case("an empty stop string", .post, "/v1/generate", json: #"{"user": "a", "prompt": "hi", "stop": [""]}"#, 400),
        Case("a 300-byte stop string", .post, "/v1/generate",
             json: #"{"user": "a", "prompt": "hi", "stop": ["\#(String(repeating: "s", count: 300))"]}"#, 400),
        Case("a tool role", .post, "/v1/chat/completions", json: #"{"model": "continuum", "messages": [{"role": "tool", "content": "x"}]}"#, 400),
        Case("both prompt and messages", .post, "/v1/generate",
             json: #"{"user": "a", "prompt": "hi", "messages": [{"role": "user", "content": "x"}]}"#, 400),
        Case("rollback to version -1", .post, "/v1/users/alice/memory/rollback", json: #"{"version": -1}"#, 400),
        Case("rollback to Int64.max", .post, "/v1/users/alice/memory/rollback", json: #"{"version": 9223372036854775807}"#, 404),
        Case("consolidate 65 steps", .post, "/v1/users/alice/memory/consolidate", json: #"{"steps": 65}"#, 400),
        Case("consolidate -1 steps", .post, "/v1/users/alice/memory/consolidate", json: #"{"steps": -1}"#, 400),
        Case("consolidate 300 generated tokens", .post, "/v1/users/alice/memory/consolidate", json: #"{"generated_tokens": 300}"#, 400),
        Case("reset an unknown level", .post, "/v1/users/alice/memory/reset", json: #"{"levels": ["slow"]}"#, 400),
        Case("65 policies", .put, "/v1/audit/policies",
             json: #"{"policies": [\#(Array(repeating: #"{"metric": "kl_max", "max": 1, "action": "warn"}"#, count: 65).joined(separator: ","))]}"#, 400),
        Case("a policy on an unknown metric", .put, "/v1/audit/policies", json: #"{"policies": [{"metric": "x", "max": 1, "action": "warn"}]}"#, 400),
        Case("a policy with an unknown action", .put, "/v1/audit/policies",
             json: #"{"policies": [{"metric": "kl_max", "max": 1, "action": "explode"}]}"#, 400),
        Case("a probe with NUL", .put, "/v1/audit/probes", json: #"{"probes": ["a\u0000b"]}"#, 400),
        Case("257 probes", .put, "/v1/audit/probes", json: #"{"probes": [\#(Array(repeating: #""p""#, count: 257).joined(separator: ","))]}"#, 400),
        Case("a probe of 300 tokens", .put, "/v1/audit/probes",
             json: #"{"probes": ["\#(String(repeating: "word ", count: 300))"]}"#, 400),
        Case("feedback with a NUL correction", .post, "/v1/feedback",
             json: #"{"generation_id": "GENERATION", "rating": "negative", "correction": "a\u0000b"}"#, 400),
        Case("feedback with a 600-token correction", .post, "/v1/feedback",
             json: #"{"generation_id": "GENERATION", "rating": "negative", "correction": "\#(String(repeating: "word ", count: 600))"}"#, 413),
        Case("feedback on an id that is not an id", .post, "/v1/feedback",
             json: #"{"generation_id": "\#(String(repeating: "z", count: 5000))", "rating": "positive"}"#, 404),
        // Routes, methods and keys.
        Case("an unknown route", .get, "/v1/nope", 404),
        Case("DELETE on generate", .delete, "/v1/generate", 405),
        Case("PATCH on a memory", .patch, "/v1/users/alice/memory", 405),
        Case("no key", .post, "/v1/feedback", json: #"{"generation_id": "x", "rating": "positive"}"#, key: false, 401),
        Case("no key on a hand route", .get, "/v1/audit", key: false, 401),
    ]

    @Test("hostile requests get their documented 4xx, the server keeps serving, nothing stored changes")
    func hostileRequests() async throws {
        let (db, key) = try await Fixture.database()
        try await Fixture.app(db).test(.live) { client in
            // alice exists, with one generation to give feedback on.
            let g = try await post(client, "/v1/generate", key: key, #"{"user": "alice", "prompt": "Hello", "max_tokens": 2, "learn": false}"#)
            let generation = try #require(try g.body.json()["id"] as? String)
            let before = try await Self.snapshot(db)
            for c in Self.cases {
                var headers: HTTPFields = [:]
                if let t = c.contentType { headers[.contentType] = t }
                if c.key { headers[.authorization] = "Bearer \(key)" }
                let body = String(decoding: c.body, as: UTF8.self).replacingOccurrences(of: "GENERATION", with: generation)
                let r = try await client.execute(uri: c.uri, method: c.method, headers: headers,
                                                 body: c.body.isEmpty ? nil : ByteBuffer(bytes: body == String(decoding: c.body, as: UTF8.self) ? c.body : Array(body.utf8)))
                #expect(Int(r.status.code) == c.status, "\(c.name): \(r.status.code) \(r.body.text.prefix(300))")
                if r.status.code >= 400 {
                    let e = try? errorObject(r)
                    #expect(e?["type"] is String && e?["message"] is String, "\(c.name): not an OpenAI error body: \(r.body.text.prefix(200))")
                }
                #expect(r.headers[HTTPField.Name("x-request-id")!] != nil, "\(c.name): no x-request-id")
                let h = try await client.execute(uri: "/healthz", method: .get)
                #expect(h.status == .ok, "/healthz after \(c.name)")
            }
            #expect(try await Self.snapshot(db) == before, "stored state changed")
        }
        await db.close()
    }

    @Test("bodies: an unauthenticated or declared-too-large body is refused before it is sent; a streamed one at the limit")
    func bodies() async throws {
        let (db, key) = try await Fixture.database()
        try await Fixture.app(db, { $0.maxBodyBytes = 64 << 10; $0.bodyReadTimeoutSeconds = 2 }).test(.live) { client in
            let port = try #require(client.port)
            // 300 MB announced, a few bytes sent, no key: 401 at once, then the connection closes.
            let unauthenticated = try await RawHTTP.run {
                let c = try RawHTTP(port: port)
                defer { c.shutdown() }
                try c.send("POST /v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 300000000\r\n\r\n{\"a\":")
                let r = try c.reply()
                return (r.status, r.headers["connection"], c.closedByPeer(within: 5))
            }
            #expect(unauthenticated.0 == 401 && unauthenticated.1 == "close" && unauthenticated.2, "\(unauthenticated)")
            // With a key, over the limit by its Content-Length: 413 before the body.
            let declared = try await RawHTTP.run {
                let c = try RawHTTP(port: port)
                defer { c.shutdown() }
                try c.send("POST /v1/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(key)\r\nContent-Type: application/json\r\nContent-Length: 300000000\r\n\r\n")
                return try c.reply().status
            }
            #expect(declared == 413)
            // Chunked, no length: read up to the limit, then 413.
            let chunked = try await RawHTTP.run {
                let c = try RawHTTP(port: port)
                defer { c.shutdown() }
                try c.send("POST /v1/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(key)\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                let chunk = String(repeating: "x", count: 16 << 10)
                for _ in 0..<8 { try? c.send(String(16 << 10, radix: 16) + "\r\n" + chunk + "\r\n") }
                return try c.reply().status
            }
            #expect(chunked == 413)
            // A body that stops arriving: 408 after body_read_timeout_seconds.
            let stalled = try await RawHTTP.run {
                let c = try RawHTTP(port: port)
                defer { c.shutdown() }
                try c.send("POST /v1/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(key)\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user\":")
                return try c.reply().status
            }
            #expect(stalled == 408)
            let h = try await client.execute(uri: "/healthz", method: .get)
            #expect(h.status == .ok)
        }
        await db.close()
    }

    @Test("a 500 names only the request id, and the error is logged under it")
    func internalErrors() async throws {
        let (db, key) = try await Fixture.database()
        let logs = CapturedLogs()
        try await Fixture.app(db, logger: logs.logger(level: .trace)).test(.live) { client in
            // A fault of ours: the database goes away under the request.
            try await db.execute(unsafeSQL: "ALTER TABLE users RENAME TO users_gone")
            let r = try await post(client, "/v1/generate", key: key, #"{"user": "bob", "prompt": "hi", "max_tokens": 1}"#)
            try await db.execute(unsafeSQL: "ALTER TABLE users_gone RENAME TO users")
            let id = try #require(r.headers[HTTPField.Name("x-request-id")!])
            let e = try errorObject(r)
            #expect(r.status == .internalServerError && e["code"] as? String == "internal_error")
            let message = try #require(e["message"] as? String)
            #expect(message.contains(id) && !message.contains("users") && !message.lowercased().contains("psql"), "\(message)")
            #expect(logs.text.contains(id) && logs.text.contains("internal error"), "the error is not logged with its request id")
        }
        await db.close()
    }
}

/// Rows of every table, to show a request changed nothing.
extension HostileInputTests {
    static func snapshot(_ db: Database) async throws -> [Int] {
        var out: [Int] = []
        for table in ["users", "memory_versions", "level_snapshots", "level_moments", "learning_jobs", "generations", "feedback", "audit_events",
                      "drift_reports", "audit_settings", "api_keys", "tenants"] {
            out.append(try await db.integer(unsafeSQL: "SELECT count(*) FROM \(table)"))
        }
        out.append(try await db.integer(unsafeSQL: "SELECT COALESCE(sum(version), 0)::bigint FROM users"))
        out.append(try await db.integer(unsafeSQL: "SELECT count(*) FROM users WHERE frozen"))
        out.append(try await db.integer(unsafeSQL: "SELECT count(*) FROM learning_jobs WHERE state = 'queued'"))
        return out
    }
}

/// A reproducible byte source for test data.
struct SeededBytes {
    var state: UInt64
    init(seed: UInt64) { state = seed &* 0x9E37_79B9_7F4A_7C15 | 1 }
    mutating func next() -> UInt8 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return UInt8(truncatingIfNeeded: state >> 24)
    }
}
