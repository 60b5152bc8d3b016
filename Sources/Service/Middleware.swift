// The request pipeline, outermost first, for every route (generated and
// hand-written alike):
//   1. MetricsMiddleware  counts the request by route pattern and status.
//   2. ErrorMiddleware    turns every error into an OpenAI-style error body
//                         with the right status; a 500 carries only the
//                         request id (also in every response's x-request-id
//                         header), and the error itself is logged under it.
//   3. AccessMiddleware   looks the route up in `Endpoints` and, before any
//                         handler or body read: 404/405 for unknown routes;
//                         401 without a valid key; 403 when the key's role
//                         is not enough; 400 for a user id in the path that
//                         breaks the policy (UserName); 413 when the declared
//                         length exceeds the route's limit; 415 for a media
//                         type the route does not take. Then it reads the body,
//                         up to the limit (413) within body_read_timeout_seconds
//                         (408), so no handler ever sees more.
// A refusal sent before a large body was read closes the connection after
// the response (Connection: close), so the unread body is not drained.
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import Store

/// The request context: Hummingbird's core storage and the connection, so
/// the pipeline can close it after refusing a request whose body it did not read.
public struct AppContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    let channel: any Channel

    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }

    /// Closes the connection once the current response has been written.
    func closeAfterResponse() {
        channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
    }
}

/// What the pipeline established about a request, for the handlers it
/// reaches (generated handlers get no context, so it travels as a task local).
struct RequestScope: Sendable {
    /// Hummingbird's request id (in every log line of the request and the x-request-id header).
    var id: String
    var principal: Principal?
    /// The `{user}` of the path, percent-decoded and checked.
    var user: UserName?

    @TaskLocal static var current = RequestScope(id: "-")

    /// The caller, or 401.
    static func principal() throws -> Principal {
        guard let p = current.principal else { throw APIError.unauthorized }
        return p
    }

    /// The path's user, checked (every route with `{user}` has one).
    static func user() throws -> UserName {
        guard let u = current.user else { throw APIError.invalid("missing user", param: "user") }
        return u
    }
}

/// Counts every request by route pattern and status, with its latency to the response head.
struct MetricsMiddleware: RouterMiddleware {
    let metrics: Metrics

    func handle(_ request: Request, context: AppContext, next: (Request, AppContext) async throws -> Response) async throws -> Response {
        let start = ContinuousClock.now
        // The pattern, not the path: a label names a route, never a user (and
        // unknown paths share one label, so they cannot grow the metrics).
        let route = context.endpointPath ?? "unmatched"
        do {
            let response = try await next(request, context)
            metrics.record(route: route, status: Int(response.status.code), seconds: (ContinuousClock.now - start).seconds)
            return response
        } catch {
            metrics.record(route: route, status: Int(APIError.from(error).status.code), seconds: (ContinuousClock.now - start).seconds)
            throw error
        }
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) * 1e-18 }
}

/// Turns every error into an OpenAI-style error response and tags every
/// response with the request id.
struct ErrorMiddleware: RouterMiddleware {
    static let requestIDHeader = HTTPField.Name("x-request-id")!

    func handle(_ request: Request, context: AppContext, next: (Request, AppContext) async throws -> Response) async throws -> Response {
        let id = context.id
        var response = try await RequestScope.$current.withValue(RequestScope(id: id)) {
            do {
                return try await next(request, context)
            } catch {
                return try APIError.reported(error, logger: context.logger, route: context.endpointPath)
                    .response(from: request, context: context)
            }
        }
        response.headers[Self.requestIDHeader] = id
        return response
    }
}

/// Authentication, roles, the path's user and the body, per `Endpoints`.
struct AccessMiddleware: RouterMiddleware {
    let keys: any TenantStore
    let configuration: ServiceConfiguration

    /// After a refusal, an unread body of at most this many bytes is drained
    /// (keeping the connection); a larger one closes the connection.
    static let drainLimit = 64 << 10

    func handle(_ request: Request, context: AppContext, next: (Request, AppContext) async throws -> Response) async throws -> Response {
        do {
            return try await admit(request, context, next)
        } catch let e as Refusal {
            var error = e.error
            let keep = e.bodyStarted ? false : await Self.drains(request)
            if !keep {
                context.closeAfterResponse()
                error.headers[.connection] = "close"
            }
            throw error
        }
    }

    /// An error answered before the body was read (or while it was, `bodyStarted`).
    struct Refusal: Error {
        let error: APIError
        var bodyStarted = false
    }

    /// Whether a refused request's unread body is small enough to drain: one
    /// declared small, or a chunked one that ends within `drainLimit` bytes
    /// and a second (read here and dropped).
    static func drains(_ request: Request) async -> Bool {
        if let text = request.headers[.contentLength] { return Int(text).map { $0 <= drainLimit } ?? false }
        guard announcesBody(request) else { return true }
        let body = request.body
        return (try? await withDeadline(seconds: 1) { try await body.collect(upTo: drainLimit) }) != nil
    }

    private func admit(_ request: Request, _ context: AppContext, _ next: (Request, AppContext) async throws -> Response)
        async throws -> Response {
        func refuse(_ e: APIError) -> Refusal { Refusal(error: e) }
        guard let pattern = context.endpointPath else {
            let allowed = Endpoints.methods(at: request.uri.path)
            throw refuse(allowed.isEmpty ? .noRoute(request.method, request.uri.path) : .methodNotAllowed(request.method, allowed))
        }
        guard let endpoint = Endpoints.endpoint(request.method, pattern: pattern) else {
            // A route registered without an entry in the table: a bug, refused rather than served unchecked.
            throw refuse(APIError.internalError)
        }
        var scope = RequestScope.current
        if case .key(let role) = endpoint.access {
            let principal: Principal
            if let header = request.headers[.authorization] {
                guard let key = Self.bearer(header), let p = try await keys.authenticate(key: key) else { throw refuse(.unauthorized) }
                principal = p
            } else if endpoint.sessions, let token = request.cookies[SessionController.cookieName]?.value,
                      let p = try await keys.session(token: token) {
                principal = p
            } else if endpoint.sessions, Query(request).string("format") == "html" {
                throw refuse(.signInFirst)   // a browser without a session: to the sign-in page
            } else {
                throw refuse(.unauthorized)
            }
            guard principal.role.permits(role) else { throw refuse(.forbidden(role)) }
            scope.principal = principal
        }
        if endpoint.hasUser {
            guard let raw = context.parameters.get("user") else { throw refuse(.invalid("missing user", param: "user")) }
            do { scope.user = try UserName(percentEncoded: raw[...]) } catch { throw refuse(.invalid("\(error)", param: "user")) }
        }
        var request = request
        let limit = endpoint.body == .binary ? configuration.maxImportBytes : configuration.maxBodyBytes
        try checkBodyHeaders(&request, endpoint, limit: limit)
        if Self.announcesBody(request) {
            let body = request.body
            let buffer: ByteBuffer
            do {
                buffer = try await withDeadline(seconds: configuration.bodyReadTimeoutSeconds) { try await body.collect(upTo: limit) }
            } catch is DeadlinePassed {
                throw Refusal(error: .requestTimeout(configuration.bodyReadTimeoutSeconds), bodyStarted: true)
            } catch let e as any HTTPResponseError where e.status == .contentTooLarge {   // NIOTooManyBytesError
                throw Refusal(error: .bodyTooLarge(limit, import: endpoint.body == .binary), bodyStarted: true)
            }
            request.body = .init(buffer: buffer)
        }
        return try await RequestScope.$current.withValue(scope) { try await next(request, context) }
    }

    /// Whether the request says it has a body (a non-zero Content-Length, or chunked).
    static func announcesBody(_ request: Request) -> Bool {
        request.headers[.contentLength].map { $0 != "0" } ?? (request.headers[.transferEncoding] != nil)
    }

    /// Checks the declared length and the media type before the body is
    /// read; a body without a Content-Type is taken as the route's type.
    private func checkBodyHeaders(_ request: inout Request, _ endpoint: Endpoint, limit: Int) throws {
        if let text = request.headers[.contentLength], let length = Int(text), length > limit {
            throw Refusal(error: .bodyTooLarge(limit, import: endpoint.body == .binary))
        }
        let expected: String
        switch endpoint.body {
        case .none: return
        case .json: expected = "application/json"
        case .binary: expected = "application/octet-stream"
        case .form: expected = "application/x-www-form-urlencoded"
        }
        let hasBody = Self.announcesBody(request)
        guard let type = request.headers[.contentType] else {
            if hasBody {
                var head = request.head
                head.headerFields[.contentType] = expected
                request = Request(head: head, body: request.body)
            }
            return
        }
        let media = type.split(separator: ";", maxSplits: 1).first.map { $0.trimmingCharacters(in: .whitespaces).lowercased() } ?? ""
        guard media == expected || !hasBody else {
            throw Refusal(error: .unsupportedMediaType(type, expected: expected))
        }
    }

    /// The key of `Authorization: Bearer <key>` (scheme case-insensitive).
    static func bearer(_ header: String) -> String? {
        let parts = header.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: true)
        guard parts.count == 2, parts[0].lowercased() == "bearer" else { return nil }
        let key = parts[1].trimmingCharacters(in: .whitespaces)
        return key.isEmpty ? nil : key
    }
}

/// Thrown by `withDeadline` when the time ran out.
struct DeadlinePassed: Error {}

/// Runs `work`, cancelling it and throwing `DeadlinePassed` after `seconds`.
func withDeadline<T: Sendable>(seconds: Double, _ work: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask { try await work() }
        group.addTask {
            try await Task.sleep(for: .seconds(seconds))
            return nil
        }
        defer { group.cancelAll() }
        guard let first = try await group.next(), let value = first else { throw DeadlinePassed() }
        return value
    }
}
