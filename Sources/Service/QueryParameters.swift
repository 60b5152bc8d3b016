// Query parameters of the hand-routed endpoints, parsed totally: a value in a
// form the parameter does not take is a 400 that names the parameter, never
// a default silently applied and never a value that could trap further down
// (times are finite and within years 1…9999, integers within their range).
import Foundation
import Hummingbird
import Store

struct Query {
    let request: Request

    init(_ request: Request) { self.request = request }

    func string(_ name: String) -> String? { request.uri.queryParameters.get(name) }

    /// An ISO 8601 time (`2026-12-01T10:00:00Z`, fractional seconds allowed) or Unix seconds.
    func date(_ name: String) throws -> Date? {
        guard let text = string(name) else { return nil }
        func bad() -> APIError {
            APIError.invalid("\(name) must be an ISO 8601 time or Unix seconds within years 1…9999", param: name)
        }
        let date: Date
        if let seconds = Double(text) {
            guard seconds.isFinite else { throw bad() }
            date = Date(timeIntervalSince1970: seconds)
        } else if let d = Self.iso8601(text) {
            date = d
        } else {
            throw bad()
        }
        guard StoreLimits.isStorable(date) else { throw bad() }
        return date
    }

    func int(_ name: String, default value: Int, range: ClosedRange<Int>) throws -> Int {
        guard let text = string(name) else { return value }
        guard let v = Int(text), range.contains(v) else {
            throw APIError.invalid("\(name) must be an integer in \(range.lowerBound)...\(range.upperBound)", param: name)
        }
        return v
    }

    func bool(_ name: String, default value: Bool) throws -> Bool {
        switch string(name) {
        case nil: return value
        case "true": return true
        case "false": return false
        default: throw APIError.invalid("\(name) must be true or false", param: name)
        }
    }

    /// One of `values` (the first is the default).
    func oneOf(_ name: String, _ values: [String], default value: String? = nil) throws -> String {
        guard let text = string(name) else { return value ?? values[0] }
        guard values.contains(text) else { throw APIError.invalid("\(name) must be one of \(values.joined(separator: ", "))", param: name) }
        return text
    }

    /// Parses ISO 8601 with and without fractional seconds (a formatter per call: they are not Sendable).
    static func iso8601(_ text: String) -> Date? {
        let f = ISO8601DateFormatter()
        if let d = f.date(from: text) { return d }
        f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return f.date(from: text)
    }
}
