// The router over the in-memory store (Store's test double with the same
// semantics as PostgreSQL): the HTTP layer's behaviour without a database,
// on the tiny Llama. The same flows run against the real PostgreSQL store in
// the other suites; this one shows the service depends only on the store's
// protocols.
import Foundation
import Hummingbird
import HummingbirdTesting
import Testing
import TestSupport
@testable import Service
import Store

@Suite("Router on the in-memory store")
struct InMemoryRouterTests {
    @Test("keys and roles, generate with learning, memory versions, reset and another tenant, on InMemoryStore")
    func flows() async throws {
        let store = InMemoryStore()
        let acme = try await store.createTenant(name: "acme"), other = try await store.createTenant(name: "other")
        let (_, admin) = try await store.createKey(tenantID: acme.id, name: "admin", role: .admin)
        let (_, app) = try await store.createKey(tenantID: acme.id, name: "app", role: .app)
        let (_, stranger) = try await store.createKey(tenantID: other.id, name: "x", role: .admin)
        var c = ServiceConfiguration()
        c.port = 0
        c.learningWorkers = 1
        c.audit = false
        let application = try buildApplication(configuration: c, model: try TestModel.tiny.load(), levels: TestModel.tiny.levels,
                                               store: store)
        try await application.test(.live) { client in
            #expect(try await client.execute(uri: "/v1/users/alice/memory", method: .get).status == .unauthorized)
            // An app key generates and learns; the job is applied by the worker through the store's queue.
            let g = try await generate(client, key: app, user: "alice", prompt: "my dog is called Rex", maxTokens: 3, wait: true)
            let learning = try #require(g["learning"] as? [String: Any])
            #expect(learning["state"] as? String == "applied", "\(learning)")
            let version = try #require(learning["version"] as? Int)
            #expect(version >= 1)
            let memory = try await get(client, "/v1/users/alice/memory", key: app)
            #expect(memory.status == .ok)
            #expect(try memory.body.json()["version"] as? Int == version, "\(memory.body.text)")
            let versions = try #require(try await get(client, "/v1/users/alice/memory/versions", key: app).body.json()["data"]
                as? [[String: Any]])
            #expect(versions.first?["version"] as? Int == version && versions.last?["cause"] as? String == "created")
            // Admin operations: refused to the app key (nothing changes), done with the admin key.
            #expect(try await post(client, "/v1/users/alice/memory/reset", key: app, "{}").status == .forbidden)
            #expect(try await get(client, "/v1/users/alice/memory", key: admin).body.json()["version"] as? Int == version)
            let reset = try await post(client, "/v1/users/alice/memory/reset", key: admin, "{}")
            #expect(reset.status == .ok, "\(reset.body.text)")
            let after = try await get(client, "/v1/users/alice/memory", key: admin).body.json()
            #expect(after["version"] as? Int == version + 1, "\(after)")
            // Another tenant sees no alice.
            #expect(try await get(client, "/v1/users/alice/memory", key: stranger).status == .notFound)
            #expect(try await delete(client, "/v1/users/alice", key: stranger).status == .notFound)
            // Erasure, then the user is gone for its own tenant too.
            #expect(try await delete(client, "/v1/users/alice", key: admin).status == .ok)
            #expect(try await get(client, "/v1/users/alice/memory", key: admin).status == .notFound)
        }
    }
}
