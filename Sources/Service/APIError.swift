// Errors as the OpenAI API shapes them:
// {"error": {"message", "type", "param", "code"}} with the right status.
import Foundation
import Hummingbird
import Model
import OpenAPIRuntime

/// An error answered to the client.
public struct APIError: Error, HTTPResponseError, CustomStringConvertible {
    public let status: HTTPResponse.Status
    public let type: String
    public let message: String
    public let param: String?
    public let code: String?

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
    static func notFound(_ message: String) -> APIError { APIError(.notFound, type: "not_found_error", message: message) }
    static func tooLarge(_ message: String, param: String? = nil) -> APIError {
        APIError(.contentTooLarge, type: "invalid_request_error", message: message, param: param, code: "too_large")
    }
    static let overloaded = APIError(.tooManyRequests, type: "rate_limit_error",
                                     message: "the server has too many generations in flight; retry later", code: "overloaded")

    public func response(from request: Request, context: some RequestContext) throws -> Response {
        let data = try JSONSerialization.data(withJSONObject: [
            "error": ["message": message, "type": type, "param": param as Any? ?? NSNull(), "code": code as Any? ?? NSNull()],
        ], options: [.sortedKeys])
        return Response(status: status, headers: [.contentType: "application/json"],
                        body: ResponseBody(byteBuffer: ByteBuffer(bytes: data)))
    }

    /// The API error for an error thrown while serving: the model's input
    /// errors and sampling errors are the client's (400), anything else is ours (500).
    static func from(_ error: any Error) -> APIError {
        switch error {
        case let e as APIError: return e
        case let e as ServerError: return from(e.underlyingError)
        case let e as SamplingParameters.Invalid: return .invalid(e.description, param: e.parameter)
        case let e as ModelInputError:
            if case .contextOverflow = e { return .tooLarge(e.description, param: "prompt") }
            return .invalid(e.description)
        case is BatchEngine.Overloaded: return .overloaded
        case let e as DecodingError: return .invalid("the request body does not match the API: \(Self.describe(e))")
        case let e as HTTPError:
            return APIError(e.status, type: e.status.code >= 500 ? "server_error" : "invalid_request_error",
                            message: e.body ?? e.status.reasonPhrase)
        default: return APIError(.internalServerError, type: "server_error", message: "internal error: \(error)")
        }
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

/// Turns every error into an OpenAI-style error response, and 404s for unknown routes.
struct ErrorMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch {
            let e = APIError.from(error)
            if e.status == .internalServerError { context.logger.error("\(request.method) \(request.uri.path): \(error)") }
            return try e.response(from: request, context: context)
        }
    }
}
