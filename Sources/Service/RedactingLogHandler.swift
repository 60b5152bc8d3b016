// RedactingLogHandler: a last line of defence for secrets in logs. The
// service never logs a key or an Authorization header (the pipeline logs
// only route patterns and error descriptions, and the tests check it at
// trace level); this handler, which `continuum serve` installs around its
// output, also masks anything shaped like an API key (`ck-` and base-62
// characters: kept as the 11-character prefix listings show) or a bearer
// credential, in messages and metadata, should a library ever print one.
import Logging

public struct RedactingLogHandler: LogHandler {
    var inner: any LogHandler

    public init(_ inner: any LogHandler) { self.inner = inner }

    public var logLevel: Logger.Level {
        get { inner.logLevel }
        set { inner.logLevel = newValue }
    }

    public var metadata: Logger.Metadata {
        get { inner.metadata }
        set { inner.metadata = newValue }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { inner[metadataKey: key] }
        set { inner[metadataKey: key] = newValue }
    }

    public var metadataProvider: Logger.MetadataProvider? {
        get { inner.metadataProvider }
        set { inner.metadataProvider = newValue }
    }

    public func log(event: LogEvent) {
        var e = event
        e.message = "\(Self.redact(event.message.description))"
        e.metadata = event.metadata.map(Self.redact)
        inner.log(event: e)
    }

    /// `text` with key-shaped words cut to their listed prefix and bearer credentials masked.
    public static func redact(_ text: String) -> String {
        guard text.contains("ck-") || text.localizedCaseInsensitiveContains("bearer") else { return text }
        var out = text.replacing(/ck-([A-Za-z0-9]{8})[A-Za-z0-9]+/) { "ck-\($0.output.1)…" }
        out = out.replacing(/(?i)(bearer)\s+\S+/) { "\($0.output.1) [redacted]" }
        return out
    }

    static func redact(_ metadata: Logger.Metadata) -> Logger.Metadata {
        metadata.mapValues(redact)
    }

    static func redact(_ value: Logger.MetadataValue) -> Logger.MetadataValue {
        switch value {
        case .string(let s): .string(redact(s))
        case .stringConvertible(let c): .string(redact(c.description))
        case .array(let a): .array(a.map(redact))
        case .dictionary(let d): .dictionary(d.mapValues(redact))
        }
    }
}
