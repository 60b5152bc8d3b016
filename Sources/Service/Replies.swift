// The replies of the hand-routed endpoints as the types generated from
// openapi.yaml: how they are written as JSON (`JSONReply`, also for stream
// events), and the drift audit's reports, rankings and events built from the
// store's records. Stored JSON (a report's metrics and flags, an event's
// detail) is read into the generated types too, so what is answered is what
// the spec describes; stored JSON that does not read is the server's fault
// (500), never the client's.
//
// The generator writes a nil optional by leaving its key out. Where the spec
// requires a key that may be null (an error's param and code, an event's
// user, versions and cause, a stream chunk's finish_reason) the type's
// encoding is written out below, so the key is always there, as null.
import Foundation
import Hummingbird
import Memory
import OpenAPIRuntime
import Store

/// How every JSON reply and stream event is written, and stored JSON read:
/// keys sorted, slashes unescaped, times as ISO 8601 (UTC, whole seconds),
/// non-finite numbers as the strings "inf", "-inf" and "nan" (as the audit stores them).
enum JSONReply {
    static let infinity = "inf", negativeInfinity = "-inf", nan = "nan"

    static func encoder() -> JSONEncoder {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        e.dateEncodingStrategy = .iso8601
        e.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: infinity, negativeInfinity: negativeInfinity, nan: nan)
        return e
    }

    static func decoder() -> JSONDecoder {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .iso8601
        d.nonConformingFloatDecodingStrategy = .convertFromString(positiveInfinity: infinity, negativeInfinity: negativeInfinity, nan: nan)
        return d
    }

    static func data(_ value: some Encodable) throws -> Data { try encoder().encode(value) }

    /// A JSON response.
    static func response(_ value: some Encodable, status: HTTPResponse.Status = .ok) throws -> Response {
        Response(status: status, headers: [.contentType: "application/json"], body: ResponseBody(byteBuffer: ByteBuffer(bytes: try data(value))))
    }

    /// Stored JSON that this server cannot read as the API type (→ 500, logged).
    struct Unreadable: Error, CustomStringConvertible {
        let what: String
        let error: any Error
        var description: String { "stored \(what) does not read as the API's type: \(error)" }
    }

    /// JSON the store holds (`what` it is, for the log), as the API type `T`.
    static func stored<T: Decodable>(_ json: String, as type: T.Type, _ what: String) throws -> T {
        do { return try decoder().decode(T.self, from: Data(json.utf8)) } catch { throw Unreadable(what: what, error: error) }
    }

    /// A domain value the spec's enum does not list (→ 500: the spec is behind the code).
    struct NotInSpec: Error, CustomStringConvertible {
        let description: String
    }

    /// The generated enum's case of a domain enum's value (the spec lists the domain's cases).
    static func same<T: RawRepresentable, V: RawRepresentable>(_ value: V, as type: T.Type = T.self) throws -> T
        where T.RawValue == String, V.RawValue == String {
        guard let v = T(rawValue: value.rawValue) else { throw NotInSpec(description: "\(T.self) has no case '\(value.rawValue)'") }
        return v
    }
}

// MARK: Required keys that may be null

extension Components.Schemas.ErrorResponse._ErrorPayload {
    /// As generated, but `param` and `code` are written as null when absent.
    func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(message, forKey: .message)
        try c.encode(_type, forKey: ._type)
        try c.encode(param, forKey: .param)
        try c.encode(code, forKey: .code)
    }
}

extension Components.Schemas.CompletionChunkChoice {
    /// As generated, but `finish_reason` is written as null until the closing chunk.
    func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(index, forKey: .index)
        try c.encode(text, forKey: .text)
        try c.encode(finishReason, forKey: .finishReason)
    }
}

extension Components.Schemas.ChatCompletionChunkChoice {
    /// As generated, but `finish_reason` is written as null until the closing chunk.
    func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(index, forKey: .index)
        try c.encode(delta, forKey: .delta)
        try c.encode(finishReason, forKey: .finishReason)
    }
}

extension Components.Schemas.AuditEvent {
    /// As generated, but `user_id`, `from_version`, `to_version` and `cause_id` are written as null when absent.
    func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(id, forKey: .id)
        try c.encode(userId, forKey: .userId)
        try c.encode(event, forKey: .event)
        try c.encode(fromVersion, forKey: .fromVersion)
        try c.encode(toVersion, forKey: .toVersion)
        try c.encode(actor, forKey: .actor)
        try c.encode(causeId, forKey: .causeId)
        try c.encode(detail, forKey: .detail)
        try c.encode(time, forKey: .time)
    }
}

// MARK: The drift audit's records as the API shows them

extension Components.Schemas.AuditEvent {
    /// A stored audit event.
    init(_ e: Store.AuditEvent) throws {
        self.init(id: e.id, userId: e.userID.map(Int.init), event: try JSONReply.same(e.event), fromVersion: e.fromVersion.map(Int.init),
                  toVersion: e.toVersion.map(Int.init), actor: e.actor, causeId: e.causeID,
                  detail: try JSONReply.stored(e.detail, as: OpenAPIObjectContainer.self, "audit event detail"), time: e.createdAt)
    }
}

extension Components.Schemas.AuditVersion {
    /// A stored drift report.
    init(_ r: DriftReport) throws {
        self.init(version: r.version, computedAt: r.computedAt, passed: r.passed,
                  flags: try JSONReply.stored(r.flags, as: [Components.Schemas.DriftFlag].self, "drift report flags"),
                  metrics: try JSONReply.stored(r.metrics, as: Components.Schemas.DriftMetrics.self, "drift report metrics"))
    }

    /// The metrics the report's flags name, in order.
    var flagged: [String] { flags.map(\.metric) }
}

extension Components.Schemas.RankedUser {
    /// A user's latest report at `rank` of a ranking.
    init(_ r: RankedDrift, rank: Int) throws {
        let report = try Components.Schemas.AuditVersion(r.report)
        self.init(rank: rank, user: r.user, version: report.version, frozen: r.frozen, passed: report.passed, flags: report.flags,
                  metrics: report.metrics, computedAt: report.computedAt)
    }
}

extension Components.Schemas.DriftMetrics {
    /// The value of one rankable metric (nil: not measured), as `Memory.DriftMetrics.value` gives it.
    func value(_ metric: DriftMetric) -> Double? {
        switch metric {
        case .klMean: klMean
        case .klMax: klMax
        case .top1Agreement: top1Agreement
        case .forgettingPPLRatio: forgettingPplRatio
        case .personalizationPPLRatio: personalizationPplRatio
        case .paramNorm: paramNorm
        case .paramChange: paramChange
        }
    }
}

extension Policy {
    /// The policy as the API shows it.
    func reply() throws -> Components.Schemas.Policy {
        .init(metric: try JSONReply.same(metric), max: max, min: min, action: try JSONReply.same(action))
    }
}
