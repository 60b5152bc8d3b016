// The endpoint table the request pipeline enforces agrees with openapi.yaml:
// every operation, its role (`x-continuum-role`, or public when `security:
// []`), its request body's media type, and the error statuses the pipeline
// can answer for it are documented.
import Foundation
import HTTPTypes
import Testing
import Yams
@testable import Service

@Suite("Endpoints and the spec")
struct EndpointSpecTests {
    static func spec() throws -> [String: Any] {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../openapi.yaml")
        return try #require(try Yams.load(yaml: String(contentsOf: url, encoding: .utf8)) as? [String: Any])
    }

    @Test("every operation in openapi.yaml is in the endpoint table with the same role, body and documented statuses, and back")
    func agree() throws {
        let paths = try #require(try Self.spec()["paths"] as? [String: [String: Any]])
        var seen = Set<String>()
        for (path, item) in paths {
            for (method, value) in item {
                guard let op = value as? [String: Any], let id = op["operationId"] as? String,
                      let m = HTTPRequest.Method(method.uppercased()) else { continue }
                seen.insert(id)
                let e = try #require(Endpoints.endpoint(m, pattern: path), "\(method) \(path) is not in Endpoints")
                #expect(e.operation == id, "\(path)")
                let isPublic = (op["security"] as? [Any])?.isEmpty == true
                let role = op["x-continuum-role"] as? String
                switch e.access {
                case .public: #expect(isPublic && role == nil, "\(id) is public in the table")
                case .key(let r): #expect(!isPublic && role == r.rawValue, "\(id): role \(r.rawValue) in the table, \(role ?? "none") in the spec")
                }
                let body = op["requestBody"] as? [String: Any]
                let types = Set(((body?["content"] as? [String: Any]) ?? [:]).keys)
                switch e.body {
                case .none: #expect(body == nil, "\(id) takes no body in the table")
                case .json(let required):
                    #expect(types == ["application/json"] && (body?["required"] as? Bool ?? false) == required, "\(id): JSON body")
                case .binary: #expect(types == ["application/octet-stream"], "\(id): binary body")
                case .form: #expect(types == ["application/x-www-form-urlencoded"], "\(id): form body")
                }
                // A session cookie stands for the key exactly where the spec offers the session scheme.
                let schemes = ((op["security"] as? [[String: Any]]) ?? []).flatMap(\.keys)
                #expect(schemes.contains("session") == e.sessions, "\(id): session scheme in the spec vs the table")
                #expect(!e.sessions || e.method == .get, "\(id): a session may only stand for a key on a read")
                let statuses = Set(((op["responses"] as? [AnyHashable: Any]) ?? [:]).keys.map { "\($0)" })
                var needed: Set<String> = []
                if case .key(let r) = e.access {
                    needed.formUnion(["401", "500"])
                    if r == .admin { needed.insert("403") }
                    if e.sessions { needed.insert("303") }
                }
                if e.hasUser { needed.formUnion(["400", "404"]) }
                if e.body != .none { needed.formUnion(["400", "408", "413", "415"]) }
                #expect(needed.isSubset(of: statuses), "\(id) does not document \(needed.subtracting(statuses).sorted())")
            }
        }
        let table = Set(Endpoints.all.map(\.operation)).subtracting(Endpoints.undocumented)
        #expect(table == seen, "in the table only: \(table.subtracting(seen).sorted()); in the spec only: \(seen.subtracting(table).sorted())")
    }
}

@Suite("Grafana dashboard", .serialized)
struct DashboardTests {
    @Test("every metric the Grafana dashboard queries is one the service exposes on /metrics")
    func metricsExist() async throws {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Deploy/grafana/continuum-dashboard.json")
        let dashboard = try String(contentsOf: url, encoding: .utf8)
        let queried = Set(dashboard.matches(of: /continuum_[a-z_]+/).map { String($0.output) })
        #expect(queried.count > 15)
        let (db, key) = try await Fixture.database()
        try await Fixture.app(db).test(.live) { client in
            _ = try await generate(client, key: key, user: "gus", prompt: "Hello there", maxTokens: 2)
            let text = try await client.execute(uri: "/metrics", method: .get).body.text
            let exposed = Set(text.split(separator: "\n").filter { !$0.hasPrefix("#") }.compactMap { line in
                line.prefix { $0 != "{" && $0 != " " }.description
            })
            #expect(queried.subtracting(exposed).isEmpty, "queried but not exposed: \(queried.subtracting(exposed).sorted())")
        }
        await db.close()
    }
}
