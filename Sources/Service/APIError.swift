// Errors as the OpenAI API shapes them:
// {"error": {"message", "type", "param", "code"}} with the right status.
// Every error a request meets becomes one of these in `APIError.from`, the
// one place domain and library errors are mapped to HTTP: the client's
// mistakes are 4xx with a message that says what to fix; anything else is a
// 500 whose body names only the request id (the error is logged under it).
import Foundation
import Hummingbird
import Logging
import Memory
import Model
import OpenAPIRuntime
import Store

/// An error answered to the client.
public struct APIError: Error, HTTPResponseError, CustomStringConvertible {
    public let status: HTTPResponse.Status
    public let type: String
    public let message: String
    public let param: String?
    public let code: String?
    /// Extra response headers (Allow, Retry-After).
    public var headers: HTTPFields = [:]

    public init(_ status: HTTPResponse.Status, type: String, message: String, param: String? = nil, code: String? = nil) {
        self.status = status
        self.type = type
        self.message = message
        self.param = param
        self.code = code
    }

    public var description: String { "\(status.code) \(type): \(message)" }

    static func invalid(_ message: String, param: String? = nil) -> APIError {
        APIError(.badRequest, type: "invalid_request_error", message: message, param: param)
    }
    static let unauthorized = APIError(.unauthorized, type: "authentication_error",
                                       message: "a valid API key is required: Authorization: Bearer <key>", code: "invalid_api_key")
    /// A browser asking for a report page without a session: 303 to the sign-in page.
    static var signInFirst: APIError {
        var e = APIError(.seeOther, type: "authentication_error", message: "sign in at /signin first", code: "sign_in")
        e.headers[.location] = "/signin"
        return e
    }
    static func forbidden(_ role: KeyRole) -> APIError {
        APIError(.forbidden, type: "permission_error", message: "this operation needs an API key with the \(role.rawValue) role",
                 code: "insufficient_role")
    }
    static func notFound(_ message: String) -> APIError { APIError(.notFound, type: "not_found_error", message: message) }
    static func noRoute(_ method: HTTPRequest.Method, _ path: String) -> APIError {
        APIError(.notFound, type: "not_found_error", message: "no route \(method.rawValue) \(path.prefix(200))", code: "unknown_route")
    }
    static func methodNotAllowed(_ method: HTTPRequest.Method, _ allowed: [HTTPRequest.Method]) -> APIError {
        var e = APIError(.methodNotAllowed, type: "invalid_request_error",
                         message: "\(method.rawValue) is not served here; use \(allowed.map(\.rawValue).joined(separator: ", "))",
                         code: "method_not_allowed")
        e.headers[.allow] = allowed.map(\.rawValue).joined(separator: ", ")
        return e
    }
    static func tooLarge(_ message: String, param: String? = nil) -> APIError {
        APIError(.contentTooLarge, type: "invalid_request_error", message: message, param: param, code: "too_large")
    }
    static func bodyTooLarge(_ limit: Int, import: Bool) -> APIError {
        tooLarge("the request body exceeds \(limit) bytes (\(`import` ? "max_import_bytes" : "max_body_bytes"))", param: "body")
    }
    static func unsupportedMediaType(_ given: String, expected: String) -> APIError {
        APIError(.unsupportedMediaType, type: "invalid_request_error",
                 message: "the body's Content-Type '\(given.prefix(100))' is not supported here; send \(expected)",
                 code: "unsupported_media_type")
    }
    static func requestTimeout(_ seconds: Double) -> APIError {
        APIError(.requestTimeout, type: "invalid_request_error",
                 message: "the request body was not received within \(seconds) seconds", code: "request_timeout")
    }
    static let overloaded = APIError(.tooManyRequests, type: "rate_limit_error",
                                     message: "the server has too many generations in flight; retry later", code: "overloaded")
    static func rateLimited(_ message: String, retryAfter seconds: Int) -> APIError {
        var e = APIError(.tooManyRequests, type: "rate_limit_error", message: message, code: "rate_limited")
        e.headers[.retryAfter] = String(max(1, seconds))
        return e
    }
    /// A fault of the server's: the body names only the request id.
    static var internalError: APIError {
        APIError(.internalServerError, type: "server_error",
                 message: "internal error; quote request id \(RequestScope.current.id) (x-request-id) when reporting it",
                 code: "internal_error")
    }
    var isInternal: Bool { status == .internalServerError }

    public func response(from request: Request, context: some RequestContext) throws -> Response {
        var headers = headers
        headers[.contentType] = "application/json"
        return Response(status: status, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: Data(json.utf8))))
    }

    /// The body: `{"error": {"message", "type", "param", "code"}}` (param and code null when absent).
    var body: Components.Schemas.ErrorResponse {
        .init(error: .init(message: message, _type: type, param: param, code: code))
    }

    /// The body as JSON.
    var json: String { String(decoding: (try? JSONReply.data(body)) ?? Data(), as: UTF8.self) }

    /// The API error for an error thrown while serving: the model's input
    /// errors, sampling errors, decoding errors, the domain's refusals and
    /// the generated layer's 4xx are the client's; anything else is ours
    /// (500, without its text). Controllers throw domain errors as they
    /// come (wrapped in `FieldError` to name the request field they concern);
    /// this is the one place they become statuses and codes.
    static func from(_ error: any Error) -> APIError {
        switch error {
        case let e as APIError: return e
        case let e as AccessMiddleware.Refusal: return e.error
        case let e as FieldError:
            let inner = from(e.error)
            guard !inner.isInternal else { return inner }
            var named = APIError(inner.status, type: inner.type, message: inner.message, param: e.param, code: inner.code)
            named.headers = inner.headers
            return named
        case let e as ServerError:
            // The generated layer: the handler's own error, or the status it computed for bad input.
            let inner = from(e.underlyingError)
            if !inner.isInternal { return inner }
            guard (400..<500).contains(e.httpStatus.code) else { return inner }
            return APIError(e.httpStatus, type: "invalid_request_error",
                            message: "the request does not match the API: \(e.underlyingError)".prefix(1000).description,
                            code: e.httpStatus == .unsupportedMediaType ? "unsupported_media_type" : nil)
        case let e as SamplingParameters.Invalid: return .invalid(e.description, param: e.parameter)
        case let e as Policy.Invalid: return .invalid(e.description, param: e.parameter)
        case let e as ModelInputError:
            if case .contextOverflow = e { return .tooLarge(e.description, param: "prompt") }
            return .invalid(e.description)
        case let e as UserName.Invalid: return .invalid(e.description, param: "user")
        case let e as UserMemory.Unreadable:
            return APIError(.conflict, type: "invalid_request_error", message: e.description, code: "memory_unreadable")
        case let e as UserMemory.NotConsolidable: return .invalid(e.description)
        // A state file the request sent (the import's body); a stored state that does not read is UserMemory.Unreadable.
        case let e as LevelStateFile.Incompatible: return .invalid(e.description, param: "body")
        case let e as NotFound: return .notFound(e.description)
        case let e as Auditor.NoMemory: return .notFound(e.description)
        // The only rows a request creates under a name it gives are users (fork's `to`).
        case let e as Conflict: return APIError(.conflict, type: "invalid_request_error", message: e.description, code: "user_exists")
        case is BatchEngine.Overloaded: return .overloaded
        case let e as BatchEngine.ShutDown: return APIError(.serviceUnavailable, type: "server_error", message: e.description, code: "shutting_down")
        case let e as DecodingError: return .invalid("the request body does not match the API: \(Self.describe(e))")
        case let e as any HTTPResponseError where e.status.code < 500:   // HTTPError, NIOTooManyBytesError
            return APIError(e.status, type: "invalid_request_error", message: (e as? HTTPError)?.body ?? e.status.reasonPhrase)
        default: return .internalError
        }
    }

    /// Maps `error` as `from` does, and logs it (under the request id that
    /// `logger` carries, and the route pattern, never the path or a header)
    /// when it is the server's fault.
    static func reported(_ error: any Error, logger: Logger, route: String?) -> APIError {
        let e = from(error)
        if e.isInternal { logger.error("internal error on \(route ?? "unmatched route"): \(logDescription(error))") }
        return e
    }

    /// What to log of an error: the generated layer's errors print the whole
    /// request (headers with the API key, the body with the user's text), so
    /// only their underlying error is described.
    static func logDescription(_ error: any Error) -> String {
        if let e = error as? ServerError { return "operation \(e.operationID): \(logDescription(e.underlyingError))" }
        return String(describing: error)
    }

    static func describe(_ e: DecodingError) -> String {
        func path(_ c: [any CodingKey]) -> String { c.map(\.stringValue).joined(separator: ".") }
        switch e {
        case .keyNotFound(let k, let c): return "missing field '\(path(c.codingPath + [k]))'"
        case .typeMismatch(_, let c): return "wrong type at '\(path(c.codingPath))': \(c.debugDescription)"
        case .valueNotFound(_, let c): return "missing value at '\(path(c.codingPath))'"
        case .dataCorrupted(let c): return c.codingPath.isEmpty ? "not valid JSON" : "invalid value at '\(path(c.codingPath))': \(c.debugDescription)"
        @unknown default: return "\(e)"
        }
    }
}

/// A domain error about one field of the request: `APIError.from` maps
/// `error` as it would alone and names `param` as the field at fault (fork's
/// `to`: not a valid user id, or a user that exists already).
struct FieldError: Error, CustomStringConvertible {
    let param: String
    let error: any Error
    var description: String { "\(param): \(error)" }
}
