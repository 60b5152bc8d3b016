// The drift-audit endpoints (documented in openapi.yaml, routed by hand for
// their JSON / CSV / HTML variants): a user's report and events, an audit on
// demand, clearing a freeze, the tenant-wide ranking and events, and the
// tenant's policies and probe set. The JSON replies are the generated types,
// built from the store's records in Replies.swift; CSV and HTML read the same values.
import Foundation
import Hummingbird
import Memory
import Model
import Store

struct AuditController {
    let configuration: ServiceConfiguration
    let store: any MemoryStore & AuditStore
    let auditor: Auditor
    /// On-demand audits per user in the last minute.
    let limiter: RateLimiter
    let tokenizer: Tokenizer
    /// The most bytes one token decodes to (texts longer than this times a cap are refused before tokenizing).
    let maxTokenBytes: Int

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

    static func iso(_ d: Date) -> String { ISO8601DateFormatter().string(from: d) }

    static func format(_ request: Request) throws -> String { try Query(request).oneOf("format", ["json", "csv", "html"]) }

    static func text(_ text: String, type: String) -> Response {
        Response(status: .ok, headers: [.contentType: type], body: ResponseBody(byteBuffer: ByteBuffer(string: text)))
    }

    /// The CSV reports' metric columns: every rankable metric.
    static let csvMetrics = DriftMetric.allCases

    /// A metric in a CSV cell: an integral value without a fraction, none as an empty cell.
    static func csvValue(_ metrics: Components.Schemas.DriftMetrics, _ metric: DriftMetric) -> String {
        guard let v = metrics.value(metric) else { return "" }
        return v.isFinite && v.rounded() == v && abs(v) < 1e15 ? String(Int64(v)) : "\(v)"
    }

    static func csvField(_ s: String) -> String {
        s.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" }) ? "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\"" : s
    }

    // MARK: A user's report

    func userReport(_ request: Request, _ context: AppContext, compute: Bool) async throws -> Response {
        let (principal, user) = try await store.requestUser()
        let format = try Self.format(request)
        var reports = try await store.driftReports(userID: user.id)
        if compute || reports.isEmpty {
            if let wait = limiter.admit(user.id) {
                throw APIError.rateLimited("at most \(configuration.auditsPerUserPerMinute) on-demand audits per user per minute (audits_per_user_per_minute); retry in \(Int(wait.rounded(.up))) s",
                                           retryAfter: Int(wait.rounded(.up)))
            }
            _ = try await auditor.audit(user, actor: principal.actor)
            reports = try await store.driftReports(userID: user.id)
        }
        let current = try await store.user(id: user.id, tenantID: principal.tenantID) ?? user
        let events = try await store.auditEvents(userID: user.id, limit: 100)
        let history = try reports.map(Components.Schemas.AuditVersion.init)
        switch format {
        case "csv":
            var out = "version,computed_at,passed,flags," + Self.csvMetrics.map(\.rawValue).joined(separator: ",") + "\n"
            for r in history {
                out += "\(r.version),\(Self.iso(r.computedAt)),\(r.passed),\(r.flagged.joined(separator: ";")),"
                    + Self.csvMetrics.map { Self.csvValue(r.metrics, $0) }.joined(separator: ",") + "\n"
            }
            return Self.text(out, type: "text/csv; charset=utf-8")
        case "html":
            return Self.text(AuditPage.user(name: user.name, frozen: current.frozen, version: current.version, reports: history,
                                            events: events), type: "text/html; charset=utf-8")
        default:
            guard let latest = history.last else { throw APIError.internalError }   // an audit just stored one
            return try JSONReply.response(Components.Schemas.AuditReport(
                user: user.name, version: current.version, auditedVersion: latest.version, frozen: current.frozen,
                metrics: latest.metrics, flags: latest.flags, passed: latest.passed, computedAt: latest.computedAt,
                history: history, events: try events.suffix(50).map(Components.Schemas.AuditEvent.init)))
        }
    }

    func clear(_ request: Request, _ context: AppContext) async throws -> Response {
        let (principal, user) = try await store.requestUser()
        let changed = try await store.setFrozen(userID: user.id, false, actor: principal.actor)
        return try JSONReply.response(Components.Schemas.AuditCleared(user: user.name, frozen: false, changed: changed))
    }

    func userEvents(_ request: Request, _ context: AppContext) async throws -> Response {
        let (_, user) = try await store.requestUser()
        let q = Query(request)
        let events = try await store.auditEvents(userID: user.id, since: try q.date("since"), until: try q.date("until"),
                                                          limit: try q.int("limit", default: 1000, range: 1...10000))
        return try JSONReply.response(Components.Schemas.AuditEventList(user: user.name,
                                                                       data: try events.map(Components.Schemas.AuditEvent.init)))
    }

    // MARK: The tenant's report

    func tenantReport(_ request: Request, _ context: AppContext) async throws -> Response {
        let principal = try RequestScope.principal()
        let q = Query(request)
        let format = try Self.format(request)
        let metricName = try q.oneOf("metric", DriftMetric.allCases.map(\.rawValue), default: DriftMetric.klMean.rawValue)
        let metric = DriftMetric(rawValue: metricName) ?? .klMean
        let order = try q.oneOf("order", ["asc", "desc"], default: metric.lowIsDrift ? "asc" : "desc")
        let flagged = try q.bool("flagged", default: false)
        let limit = try q.int("limit", default: 50, range: 1...1000)
        let offset = try q.int("offset", default: 0, range: 0...1_000_000)
        let ranked = try await store.rankedDrift(tenantID: principal.tenantID, metric: metric.rawValue, ascending: order == "asc",
                                                          flaggedOnly: flagged, since: try q.date("since"),
                                                          until: try q.date("until"), limit: limit, offset: offset)
        let rows = try ranked.enumerated().map { i, r in try Components.Schemas.RankedUser(r, rank: offset + i + 1) }
        switch format {
        case "csv":
            var out = "rank,user,version,frozen,passed,flags,computed_at," + Self.csvMetrics.map(\.rawValue).joined(separator: ",") + "\n"
            for r in rows {
                out += "\(r.rank),\(Self.csvField(r.user)),\(r.version),\(r.frozen),\(r.passed),"
                    + "\(r.flags.map(\.metric).joined(separator: ";")),\(Self.iso(r.computedAt)),"
                    + Self.csvMetrics.map { Self.csvValue(r.metrics, $0) }.joined(separator: ",") + "\n"
            }
            return Self.text(out, type: "text/csv; charset=utf-8")
        case "html":
            return Self.text(AuditPage.tenant(metric: metric, ranked: rows), type: "text/html; charset=utf-8")
        default:
            return try JSONReply.response(Components.Schemas.TenantAudit(metric: metric.rawValue, order: order == "asc" ? .asc : .desc,
                                                                        limit: limit, offset: offset, data: rows))
        }
    }

    func tenantEvents(_ request: Request, _ context: AppContext) async throws -> Response {
        let principal = try RequestScope.principal()
        let q = Query(request)
        let events = try await store.auditEvents(tenantID: principal.tenantID, since: try q.date("since"),
                                                          until: try q.date("until"), limit: try q.int("limit", default: 1000, range: 1...10000))
        return try JSONReply.response(Components.Schemas.AuditEventList(data: try events.map(Components.Schemas.AuditEvent.init)))
    }

    // MARK: Settings

    /// The JSON body, decoded (the pipeline has read it, within max_body_bytes).
    func decode<T: Decodable>(_ type: T.Type, _ request: Request) async throws -> T {
        try JSONDecoder().decode(T.self, from: Data(buffer: try await request.body.collect(upTo: configuration.maxBodyBytes)))
    }

    func policies() async throws -> Response {
        let principal = try RequestScope.principal()
        let custom = try await store.auditSettings(tenantID: principal.tenantID).policies
        let policies = try await auditor.policies(tenantID: principal.tenantID)
        return try JSONReply.response(Components.Schemas.Policies(policies: try policies.map { try $0.reply() }, _default: custom == nil))
    }

    func setPolicies(_ request: Request) async throws -> Response {
        let principal = try RequestScope.principal()
        struct Body: Decodable { let policies: [Policy]? }
        let body = try await decode(Body.self, request)
        if let p = body.policies, p.count > configuration.maxPolicies {
            throw APIError.invalid("give at most \(configuration.maxPolicies) policies (max_policies), got \(p.count)", param: "policies")
        }
        try body.policies?.forEach { try $0.validate() }   // Policy.Invalid → 400 naming the field
        try await store.setPolicies(tenantID: principal.tenantID, json: try body.policies.map { try Auditor.json($0) })
        return try await policies()
    }

    func probes() async throws -> Response {
        let principal = try RequestScope.principal()
        let custom = try await store.auditSettings(tenantID: principal.tenantID).probes
        return try JSONReply.response(Components.Schemas.Probes(probes: try await auditor.probes(tenantID: principal.tenantID),
                                                                _default: custom == nil))
    }

    func setProbes(_ request: Request) async throws -> Response {
        let principal = try RequestScope.principal()
        struct Body: Decodable { let probes: [String]? }
        let body = try await decode(Body.self, request)
        if let p = body.probes {
            guard (1...256).contains(p.count) else { throw APIError.invalid("give 1 to 256 probes", param: "probes") }
            guard p.allSatisfy({ !$0.unicodeScalars.contains("\u{0}") }) else {
                throw APIError.invalid("a probe must not contain NUL characters", param: "probes")
            }
            // No token is longer than maxTokenBytes: longer texts are refused before they are tokenized.
            guard p.allSatisfy({ !$0.isEmpty && $0.utf8.count <= 256 * maxTokenBytes
                                 && tokenizer.encode($0).count <= 256 }) else {
                throw APIError.invalid("each probe must have 1 to 256 tokens", param: "probes")
            }
        }
        try await store.setProbes(tenantID: principal.tenantID, json: try body.probes.map { try Auditor.json($0) })
        return try await probes()
    }
}
