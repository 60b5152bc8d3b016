// The drift-audit endpoints (documented in openapi.yaml, routed by hand for
// their JSON / CSV / HTML variants): a user's report and events, an audit on
// demand, clearing a freeze, the tenant-wide ranking and events, and the
// tenant's policies and probe set.
import Foundation
import Hummingbird
import Store

struct AuditRoutes {
    let state: ServiceState

    func register(on router: Router<AppContext>) {
        router.get("/v1/users/:user/audit") { request, context in try await userReport(request, context, compute: false) }
        router.post("/v1/users/:user/audit") { request, context in try await userReport(request, context, compute: true) }
        router.post("/v1/users/:user/audit/clear") { request, context in try await clear(request, context) }
        router.get("/v1/users/:user/audit/events") { request, context in try await userEvents(request, context) }
        router.get("/v1/audit") { request, context in try await tenantReport(request, context) }
        router.get("/v1/audit/events") { request, context in try await tenantEvents(request, context) }
        router.get("/v1/audit/policies") { _, _ in try await policies() }
        router.put("/v1/audit/policies") { request, _ in try await setPolicies(request) }
        router.get("/v1/audit/probes") { _, _ in try await probes() }
        router.put("/v1/audit/probes") { request, _ in try await setProbes(request) }
    }

    // MARK: Helpers

    func user(_ context: AppContext) async throws -> (Principal, User) {
        let principal = try RequestPrincipal.required()
        guard let name = context.parameters.get("user") else { throw APIError.invalid("missing user") }
        return (principal, try await state.existingUser(name, principal))
    }

    static func iso(_ d: Date) -> String { ISO8601DateFormatter().string(from: d) }

    static func date(_ request: Request, _ name: String) throws -> Date? {
        guard let text = request.uri.queryParameters.get(name) else { return nil }
        if let d = ISO8601DateFormatter().date(from: text) { return d }
        if let d = Double(text) { return Date(timeIntervalSince1970: d) }
        throw APIError.invalid("\(name) must be an ISO 8601 time or Unix seconds", param: name)
    }

    static func int(_ request: Request, _ name: String, default value: Int, range: ClosedRange<Int>) throws -> Int {
        guard let text = request.uri.queryParameters.get(name) else { return value }
        guard let v = Int(text), range.contains(v) else {
            throw APIError.invalid("\(name) must be an integer in \(range.lowerBound)...\(range.upperBound)", param: name)
        }
        return v
    }

    static func format(_ request: Request) throws -> String {
        let f = request.uri.queryParameters.get("format") ?? "json"
        guard ["json", "csv", "html"].contains(f) else { throw APIError.invalid("format must be json, csv or html", param: "format") }
        return f
    }

    static func object(_ json: String) -> Any { (try? JSONSerialization.jsonObject(with: Data(json.utf8))) ?? NSNull() }

    static func eventObject(_ e: AuditEvent) -> [String: Any] {
        ["id": e.id, "event": e.event, "from_version": e.fromVersion as Any? ?? NSNull(), "to_version": e.toVersion as Any? ?? NSNull(),
         "actor": e.actor, "cause_id": e.causeID as Any? ?? NSNull(), "detail": object(e.detail), "time": iso(e.createdAt),
         "user_id": e.userID as Any? ?? NSNull()]
    }

    static func response(_ object: Any) throws -> Response {
        let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])
        return Response(status: .ok, headers: [.contentType: "application/json"], body: ResponseBody(byteBuffer: ByteBuffer(bytes: data)))
    }

    static func text(_ text: String, type: String) -> Response {
        Response(status: .ok, headers: [.contentType: type], body: ResponseBody(byteBuffer: ByteBuffer(string: text)))
    }

    static let csvMetrics = ["kl_mean", "kl_max", "top1_agreement", "forgetting_ppl_ratio", "personalization_ppl_ratio",
                             "param_norm", "param_change"]

    static func csvValue(_ metrics: [String: Any], _ key: String) -> String {
        switch metrics[key] {
        case let n as NSNumber: return "\(n)"
        case let s as String: return s
        default: return ""
        }
    }

    // MARK: A user's report

    func userReport(_ request: Request, _ context: AppContext, compute: Bool) async throws -> Response {
        let (principal, user) = try await user(context)
        let format = try Self.format(request)
        var reports = try await state.database.driftReports(userID: user.id)
        if compute || reports.isEmpty {
            _ = try await state.auditor.audit(user, actor: ServiceState.actor(principal))
            reports = try await state.database.driftReports(userID: user.id)
        }
        let current = try await state.database.user(id: user.id, tenantID: principal.tenantID) ?? user
        let events = try await state.database.auditEvents(userID: user.id, limit: 100)
        switch format {
        case "csv":
            var out = "version,computed_at,passed,flags," + Self.csvMetrics.joined(separator: ",") + "\n"
            for r in reports {
                let m = Self.object(r.metrics) as? [String: Any] ?? [:]
                let flags = (Self.object(r.flags) as? [[String: Any]] ?? []).compactMap { $0["metric"] as? String }.joined(separator: ";")
                out += "\(r.version),\(Self.iso(r.computedAt)),\(r.passed),\(flags)," + Self.csvMetrics.map { Self.csvValue(m, $0) }.joined(separator: ",") + "\n"
            }
            return Self.text(out, type: "text/csv; charset=utf-8")
        case "html":
            return Self.text(AuditPage.user(name: user.name, frozen: current.frozen, version: current.version, reports: reports,
                                            events: events), type: "text/html; charset=utf-8")
        default:
            let latest = reports.last!
            return try Self.response([
                "user": user.name, "version": current.version, "audited_version": latest.version, "frozen": current.frozen,
                "metrics": Self.object(latest.metrics), "flags": Self.object(latest.flags), "passed": latest.passed,
                "computed_at": Self.iso(latest.computedAt),
                "history": reports.map { ["version": $0.version, "computed_at": Self.iso($0.computedAt), "passed": $0.passed,
                                          "flags": Self.object($0.flags), "metrics": Self.object($0.metrics)] as [String: Any] },
                "events": events.suffix(50).map(Self.eventObject),
            ])
        }
    }

    func clear(_ request: Request, _ context: AppContext) async throws -> Response {
        let (principal, user) = try await user(context)
        let changed = try await state.database.setFrozen(userID: user.id, false, actor: ServiceState.actor(principal))
        return try Self.response(["user": user.name, "frozen": false, "changed": changed])
    }

    func userEvents(_ request: Request, _ context: AppContext) async throws -> Response {
        let (_, user) = try await user(context)
        let events = try await state.database.auditEvents(userID: user.id, since: try Self.date(request, "since"),
                                                          until: try Self.date(request, "until"),
                                                          limit: try Self.int(request, "limit", default: 1000, range: 1...10000))
        return try Self.response(["user": user.name, "data": events.map(Self.eventObject)])
    }

    // MARK: The tenant's report

    func tenantReport(_ request: Request, _ context: AppContext) async throws -> Response {
        let principal = try RequestPrincipal.required()
        let format = try Self.format(request)
        let metric = request.uri.queryParameters.get("metric") ?? "kl_mean"
        guard Policy.metrics.contains(metric) else {
            throw APIError.invalid("metric must be one of \(Policy.metrics.joined(separator: ", "))", param: "metric")
        }
        let order = request.uri.queryParameters.get("order") ?? (metric == "top1_agreement" ? "asc" : "desc")
        guard order == "asc" || order == "desc" else { throw APIError.invalid("order must be asc or desc", param: "order") }
        let flagged = request.uri.queryParameters.get("flagged") == "true"
        let limit = try Self.int(request, "limit", default: 50, range: 1...1000)
        let offset = try Self.int(request, "offset", default: 0, range: 0...1_000_000)
        let ranked = try await state.database.rankedDrift(tenantID: principal.tenantID, metric: metric, ascending: order == "asc",
                                                          flaggedOnly: flagged, since: try Self.date(request, "since"),
                                                          until: try Self.date(request, "until"), limit: limit, offset: offset)
        switch format {
        case "csv":
            var out = "rank,user,version,frozen,passed,flags,computed_at," + Self.csvMetrics.joined(separator: ",") + "\n"
            for (i, r) in ranked.enumerated() {
                let m = Self.object(r.report.metrics) as? [String: Any] ?? [:]
                let flags = (Self.object(r.report.flags) as? [[String: Any]] ?? []).compactMap { $0["metric"] as? String }
                out += "\(offset + i + 1),\(Self.csvField(r.user)),\(r.report.version),\(r.frozen),\(r.report.passed),"
                    + "\(flags.joined(separator: ";")),\(Self.iso(r.report.computedAt)),"
                    + Self.csvMetrics.map { Self.csvValue(m, $0) }.joined(separator: ",") + "\n"
            }
            return Self.text(out, type: "text/csv; charset=utf-8")
        case "html":
            return Self.text(AuditPage.tenant(metric: metric, ranked: ranked, offset: offset), type: "text/html; charset=utf-8")
        default:
            return try Self.response([
                "metric": metric, "order": order, "limit": limit, "offset": offset,
                "data": ranked.enumerated().map { i, r in
                    ["rank": offset + i + 1, "user": r.user, "version": r.report.version, "frozen": r.frozen, "passed": r.report.passed,
                     "flags": Self.object(r.report.flags), "metrics": Self.object(r.report.metrics),
                     "computed_at": Self.iso(r.report.computedAt)] as [String: Any]
                },
            ])
        }
    }

    static func csvField(_ s: String) -> String {
        s.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" }) ? "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\"" : s
    }

    func tenantEvents(_ request: Request, _ context: AppContext) async throws -> Response {
        let principal = try RequestPrincipal.required()
        let events = try await state.database.auditEvents(tenantID: principal.tenantID, since: try Self.date(request, "since"),
                                                          until: try Self.date(request, "until"),
                                                          limit: try Self.int(request, "limit", default: 1000, range: 1...10000))
        return try Self.response(["data": events.map(Self.eventObject)])
    }

    // MARK: Settings

    func body(_ request: Request) async throws -> Data {
        var request = request
        do {
            return Data(buffer: try await request.collectBody(upTo: state.configuration.maxBodyBytes))
        } catch {
            throw APIError.tooLarge("the request body exceeds \(state.configuration.maxBodyBytes) bytes")
        }
    }

    func policies() async throws -> Response {
        let principal = try RequestPrincipal.required()
        let custom = try await state.database.auditSettings(tenantID: principal.tenantID).policies
        let policies = try await state.auditor.policies(tenantID: principal.tenantID)
        return try Self.response(["policies": Self.object(try Auditor.json(policies)), "default": custom == nil])
    }

    func setPolicies(_ request: Request) async throws -> Response {
        let principal = try RequestPrincipal.required()
        struct Body: Decodable { let policies: [Policy]? }
        let body = try JSONDecoder().decode(Body.self, from: try await body(request))
        try body.policies?.forEach { try $0.validate() }
        try await state.database.setPolicies(tenantID: principal.tenantID, json: try body.policies.map { try Auditor.json($0) })
        return try await policies()
    }

    func probes() async throws -> Response {
        let principal = try RequestPrincipal.required()
        let custom = try await state.database.auditSettings(tenantID: principal.tenantID).probes
        return try Self.response(["probes": try await state.auditor.probes(tenantID: principal.tenantID), "default": custom == nil])
    }

    func setProbes(_ request: Request) async throws -> Response {
        let principal = try RequestPrincipal.required()
        struct Body: Decodable { let probes: [String]? }
        let body = try JSONDecoder().decode(Body.self, from: try await body(request))
        if let p = body.probes {
            guard (1...256).contains(p.count) else { throw APIError.invalid("give 1 to 256 probes", param: "probes") }
            guard p.allSatisfy({ !$0.isEmpty && state.model.tokenizer.encode($0).count <= 256 }) else {
                throw APIError.invalid("each probe must have 1 to 256 tokens", param: "probes")
            }
        }
        try await state.database.setProbes(tenantID: principal.tenantID, json: try body.probes.map { try Auditor.json($0) })
        return try await probes()
    }
}
