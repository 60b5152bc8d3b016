// Roles and secrets: an app key gets 403 on every admin operation and
// changes nothing (read back from the database), while it serves the app
// operations; and nothing the service or the store logs, at any level,
// contains key material (the keys used, wrong keys presented).
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Testing
@testable import Service
@testable import Store

@Suite("Roles and secrets", .serialized)
struct RoleTests {
    /// A body that would make each admin operation act if the role check let it through.
    static func body(_ e: Endpoint, stateFile: [UInt8]) -> (String?, [UInt8]) {
        switch e.operation {
        case "resetMemory": ("application/json", Array("{}".utf8))
        case "rollbackMemory": ("application/json", Array(#"{"version": 0}"#.utf8))
        case "forkMemory": ("application/json", Array(#"{"to": "mallory"}"#.utf8))
        case "consolidateMemory": ("application/json", Array(#"{"steps": 1}"#.utf8))
        case "importMemory": ("application/octet-stream", stateFile)
        case "setAuditPolicies": ("application/json", Array(#"{"policies": []}"#.utf8))
        case "setAuditProbes": ("application/json", Array(#"{"probes": ["p"]}"#.utf8))
        default: (nil, [])
        }
    }

    @Test("an app key gets 403 on every admin operation and changes nothing; it serves the app operations; no key material is logged")
    func appKeys() async throws {
        let logs = CapturedLogs()
        let (db, adminKey) = try await Fixture.database(logger: logs.logger(label: "continuum.store", level: .trace))
        let tenant = try #require(try await db.tenant(named: "acme"))
        let (_, appKey) = try await db.createKey(tenantID: tenant.id, name: "app", role: .app)
        let wrongKey = "ck-" + String(repeating: "Q", count: 43)
        try await Fixture.app(db, logger: logs.logger(level: .trace)).test(.live) { client in
            let port = try #require(client.port)
            func call(_ method: HTTPRequest.Method, _ uri: String, key: String, type: String? = "application/json",
                      _ body: [UInt8] = []) async throws -> (status: HTTPResponse.Status, body: ByteBuffer) {
                var headers: HTTPFields = [.authorization: "Bearer \(key)"]
                if let type { headers[.contentType] = type }
                return try await requestOnNewConnection(port: port, method, uri, headers: headers,
                                                        body: body.isEmpty ? nil : ByteBuffer(bytes: body))
            }
            func error(_ r: (status: HTTPResponse.Status, body: ByteBuffer)) throws -> [String: Any] {
                let object = try r.body.json()
                return try #require(object["error"] as? [String: Any])
            }
            // alice has a queued learning job, is frozen, and her state file is at hand.
            let taught = try await call(.post, "/v1/generate", key: appKey,
                                        Array(#"{"user": "alice", "prompt": "My cat is called Zorblax and my dog is called Quillon.", "max_tokens": 2}"#.utf8))
            #expect(taught.status == .ok)
            let alice = try #require(try await db.user(tenantID: tenant.id, name: try UserName("alice")))
            try await db.setFrozen(userID: alice.id, true, actor: "test")
            let export = try await call(.get, "/v1/users/alice/memory/export", key: adminKey, type: nil)
            #expect(export.status == .ok)
            let stateFile = Array(buffer: export.body)
            #expect(stateFile.count > AccessMiddleware.drainLimit)   // so the refused import also closes its connection

            let before = try await HostileInputTests.snapshot(db)
            let admin = Endpoints.all.filter { $0.access == .key(.admin) }
            #expect(admin.count == 17)
            for e in admin {
                let (type, body) = Self.body(e, stateFile: stateFile)
                let r = try await call(e.method, e.path.replacingOccurrences(of: "{user}", with: "alice"), key: appKey, type: type, body)
                #expect(r.status == .forbidden, "\(e.operation): \(r.status)")
                #expect(try error(r)["code"] as? String == "insufficient_role", "\(e.operation)")
            }
            #expect(try await HostileInputTests.snapshot(db) == before, "an admin operation with an app key changed stored state")
            #expect(try await db.user(tenantID: tenant.id, name: try UserName("alice"))?.frozen == true)
            #expect(try await db.auditSettings(tenantID: tenant.id) == (nil, nil))

            // What an app key may do.
            for (method, uri, body) in [(HTTPRequest.Method.get, "/v1/models", ""), (.get, "/v1/users/alice/memory", ""),
                                        (.get, "/v1/users/alice/memory/versions", ""),
                                        (.post, "/v1/completions", #"{"model": "continuum", "prompt": "Hi", "max_tokens": 1, "user": "bob"}"#),
                                        (.post, "/v1/chat/completions", #"{"model": "continuum", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}"#)] {
                let r = try await call(method, uri, key: appKey, type: body.isEmpty ? nil : "application/json", Array(body.utf8))
                #expect(r.status == .ok, "\(uri) with an app key: \(r.status)")
            }
            // The admin key can do the admin operations (one of them suffices here: the rest is tested elsewhere).
            let cleared = try await call(.post, "/v1/users/alice/audit/clear", key: adminKey, type: nil)
            #expect(cleared.status == .ok)
            // Keys that are not valid, in every shape, are refused and not logged either.
            for header in ["Bearer \(wrongKey)", "bearer  \(wrongKey)", "Basic \(wrongKey)", "\(wrongKey)", "Bearer"] {
                let r = try await client.execute(uri: "/v1/models", method: .get, headers: [.authorization: header])
                #expect(r.status == .unauthorized, "\(header)")
            }
            // An error path that logs (a fault of ours) with the key on the request.
            try await db.execute(unsafeSQL: "ALTER TABLE generations RENAME TO generations_gone")
            let failed = try await call(.post, "/v1/generate", key: appKey, Array(#"{"user": "alice", "prompt": "Hi", "max_tokens": 1}"#.utf8))
            // …and on a generated route, whose errors carry the whole request (headers included).
            let failedFeedback = try await call(.post, "/v1/feedback", key: appKey,
                                                Array(#"{"generation_id": "gen-00000000-0000-0000-0000-000000000000", "rating": "positive"}"#.utf8))
            try await db.execute(unsafeSQL: "ALTER TABLE generations_gone RENAME TO generations")
            #expect(failed.status == .internalServerError && failedFeedback.status == .internalServerError)
        }
        await db.close()
        let text = logs.text
        #expect(!text.isEmpty && text.contains("internal error"))
        for key in [adminKey, appKey, wrongKey] {
            #expect(!text.contains(key) && !text.contains(String(key.dropFirst(11))), "key material in the logs")
        }
        #expect(!text.lowercased().contains("authorization:") && !text.contains("Bearer"), "an Authorization header in the logs")
    }
}

@Suite("Browser sessions", .serialized)
struct SessionTests {
    @Test("sign-in exchanges an admin key for an HttpOnly SameSite cookie that opens the reports and nothing else")
    func signIn() async throws {
        let (db, adminKey) = try await Fixture.database()
        let tenant = try #require(try await db.tenant(named: "acme"))
        let (_, appKey) = try await db.createKey(tenantID: tenant.id, name: "app", role: .app)
        try await Fixture.app(db).test(.live) { client in
            func form(_ key: String) async throws -> TestResponse {
                try await client.execute(uri: "/signin", method: .post, headers: [.contentType: "application/x-www-form-urlencoded"],
                                         body: ByteBuffer(string: "key=" + (key.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? "")))
            }
            let page = try await client.execute(uri: "/signin", method: .get)
            #expect(page.status == .ok && page.body.text.contains("<form method=\"post\" action=\"/signin\">"))
            #expect(try await form("ck-nope").status == .unauthorized)
            #expect(try await form(appKey).status == .forbidden)
            let signed = try await form(adminKey)
            #expect(signed.status == .seeOther && signed.headers[.location] == "/v1/audit?format=html")
            let cookie = try #require(signed.headers[.setCookie])
            #expect(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Path=/"), "\(cookie)")
            #expect(!cookie.contains(adminKey) && !cookie.contains(String(adminKey.dropFirst(11))))
            let token = try #require(cookie.split(separator: ";").first?.split(separator: "=", maxSplits: 1).last.map(String.init))
            let withCookie: HTTPFields = [.cookie: "continuum_session=\(token)"]
            // The reports open with the cookie…
            _ = try await generate(client, key: adminKey, user: "alice", prompt: "Hello", maxTokens: 1, learn: false)
            let ranking = try await client.execute(uri: "/v1/audit?format=html", method: .get, headers: withCookie)
            #expect(ranking.status == .ok && ranking.headers[.contentType]?.hasPrefix("text/html") == true)
            let userPage = try await client.execute(uri: "/v1/users/alice/audit?format=html", method: .get, headers: withCookie)
            #expect(userPage.status == .ok && userPage.body.text.contains("<svg"))
            // …but the cookie stands for the key on nothing else.
            let clear = try await client.execute(uri: "/v1/users/alice/audit/clear", method: .post, headers: withCookie)
            #expect(clear.status == .unauthorized)
            let memory = try await client.execute(uri: "/v1/users/alice/memory", method: .get, headers: withCookie)
            #expect(memory.status == .unauthorized)
            // Without a session, a browser asking for a page goes to the sign-in page; an API client gets 401.
            let bare = try await client.execute(uri: "/v1/audit?format=html", method: .get)
            #expect(bare.status == .seeOther && bare.headers[.location] == "/signin")
            #expect(try await client.execute(uri: "/v1/audit", method: .get).status == .unauthorized)
            // Signing out ends the session.
            let out = try await client.execute(uri: "/signout", method: .post, headers: withCookie)
            #expect(out.status == .seeOther && out.headers[.setCookie]?.contains("Max-Age=0") == true)
            #expect(try await client.execute(uri: "/v1/audit?format=html", method: .get, headers: withCookie).status == .seeOther)
        }
        await db.close()
    }
}
