// Endpoints: every route the service answers, with who may call it and what
// body it takes. The request pipeline (Middleware.swift) reads this table
// for every request before any handler runs: a route that is not public
// needs a key (401 before the body is read), an admin route an admin key
// (403), and the body is read only up to the route's limit and only in the
// media type the route takes (413, 415). openapi.yaml documents the same
// facts per operation (`x-continuum-role`, the request body's media type);
// a test checks the two agree.
import Hummingbird
import Store

/// Who may call an endpoint.
enum Access: Sendable, Equatable {
    /// No key needed (health, readiness, metrics, the spec and its docs).
    case `public`
    /// A key with at least this role.
    case key(KeyRole)
}

/// The request body an endpoint reads.
enum BodyKind: Sendable, Equatable {
    /// None (a body sent anyway is read, up to the limit, and ignored).
    case none
    /// JSON (`application/json`); `required`: an empty body is refused.
    case json(required: Bool)
    /// Bytes (`application/octet-stream`), up to `max_import_bytes`.
    case binary
    /// An HTML form (`application/x-www-form-urlencoded`): the sign-in page's.
    case form
}

/// One route: its OpenAPI operation id, method and path (`{name}` for a path parameter).
struct Endpoint: Sendable, Equatable {
    let operation: String
    let method: HTTPRequest.Method
    let path: String
    let access: Access
    let body: BodyKind
    /// A browser session (the sign-in cookie) may stand for the key: only the
    /// audit's read-only reports, so a cookie can never change anything.
    var sessions = false

    /// Whether the path names a user (`{user}`), which the pipeline decodes and checks.
    var hasUser: Bool { path.contains("{user}") }
}

enum Endpoints {
    static let all: [Endpoint] = [
        .init(operation: "health", method: .get, path: "/healthz", access: .public, body: .none),
        .init(operation: "ready", method: .get, path: "/readyz", access: .public, body: .none),
        .init(operation: "metrics", method: .get, path: "/metrics", access: .public, body: .none),
        .init(operation: "spec", method: .get, path: "/openapi.yaml", access: .public, body: .none),
        .init(operation: "docs", method: .get, path: "/docs", access: .public, body: .none),
        .init(operation: "signInPage", method: .get, path: "/signin", access: .public, body: .none),
        .init(operation: "signIn", method: .post, path: "/signin", access: .public, body: .form),
        .init(operation: "signOut", method: .post, path: "/signout", access: .public, body: .none),

        .init(operation: "listModels", method: .get, path: "/v1/models", access: .key(.app), body: .none),
        .init(operation: "generate", method: .post, path: "/v1/generate", access: .key(.app), body: .json(required: true)),
        .init(operation: "createCompletion", method: .post, path: "/v1/completions", access: .key(.app), body: .json(required: true)),
        .init(operation: "createChatCompletion", method: .post, path: "/v1/chat/completions", access: .key(.app),
              body: .json(required: true)),
        .init(operation: "createFeedback", method: .post, path: "/v1/feedback", access: .key(.app), body: .json(required: true)),
        .init(operation: "getMemory", method: .get, path: "/v1/users/{user}/memory", access: .key(.app), body: .none),
        .init(operation: "listVersions", method: .get, path: "/v1/users/{user}/memory/versions", access: .key(.app), body: .none),

        .init(operation: "eraseUser", method: .delete, path: "/v1/users/{user}", access: .key(.admin), body: .none),
        .init(operation: "resetMemory", method: .post, path: "/v1/users/{user}/memory/reset", access: .key(.admin),
              body: .json(required: false)),
        .init(operation: "rollbackMemory", method: .post, path: "/v1/users/{user}/memory/rollback", access: .key(.admin),
              body: .json(required: true)),
        .init(operation: "forkMemory", method: .post, path: "/v1/users/{user}/memory/fork", access: .key(.admin),
              body: .json(required: true)),
        .init(operation: "consolidateMemory", method: .post, path: "/v1/users/{user}/memory/consolidate", access: .key(.admin),
              body: .json(required: false)),
        .init(operation: "exportMemory", method: .get, path: "/v1/users/{user}/memory/export", access: .key(.admin), body: .none),
        .init(operation: "importMemory", method: .post, path: "/v1/users/{user}/memory/import", access: .key(.admin), body: .binary),
        .init(operation: "getUserAudit", method: .get, path: "/v1/users/{user}/audit", access: .key(.admin), body: .none,
              sessions: true),
        .init(operation: "auditUser", method: .post, path: "/v1/users/{user}/audit", access: .key(.admin), body: .none),
        .init(operation: "clearUserAudit", method: .post, path: "/v1/users/{user}/audit/clear", access: .key(.admin), body: .none),
        .init(operation: "listUserAuditEvents", method: .get, path: "/v1/users/{user}/audit/events", access: .key(.admin),
              body: .none, sessions: true),
        .init(operation: "tenantAudit", method: .get, path: "/v1/audit", access: .key(.admin), body: .none, sessions: true),
        .init(operation: "listTenantAuditEvents", method: .get, path: "/v1/audit/events", access: .key(.admin), body: .none,
              sessions: true),
        .init(operation: "getAuditPolicies", method: .get, path: "/v1/audit/policies", access: .key(.admin), body: .none),
        .init(operation: "setAuditPolicies", method: .put, path: "/v1/audit/policies", access: .key(.admin),
              body: .json(required: true)),
        .init(operation: "getAuditProbes", method: .get, path: "/v1/audit/probes", access: .key(.admin), body: .none),
        .init(operation: "setAuditProbes", method: .put, path: "/v1/audit/probes", access: .key(.admin), body: .json(required: true)),
    ]

    /// Operations served but not in openapi.yaml (the spec itself and its docs page).
    static let undocumented: Set<String> = ["spec", "docs"]

    private static let byRoute: [String: Endpoint] = Dictionary(uniqueKeysWithValues: all.map { (key($0.method, $0.path), $0) })

    private static func key(_ method: HTTPRequest.Method, _ path: String) -> String { method.rawValue + " " + path }

    /// The endpoint of a matched route (`pattern`: the router's path, as
    /// `RequestContext.endpointPath` gives it, `{name}` for parameters).
    static func endpoint(_ method: HTTPRequest.Method, pattern: String) -> Endpoint? {
        byRoute[key(method, pattern)] ?? (method == .head ? byRoute[key(.get, pattern)] : nil)
    }

    /// The methods served at a request path (for 405 and its Allow header).
    static func methods(at path: String) -> [HTTPRequest.Method] {
        let segments = path.split(separator: "/", omittingEmptySubsequences: false)
        return all.filter { e in
            let pattern = e.path.split(separator: "/", omittingEmptySubsequences: false)
            return pattern.count == segments.count
                && zip(pattern, segments).allSatisfy { p, s in (p.hasPrefix("{") && p.hasSuffix("}") && !s.isEmpty) || p == s }
        }.map(\.method)
    }
}
