// CapturedLogs: every line the service logs during a test, at any level, to
// check what logs contain (request ids) and what they never contain (keys).
import Foundation
import Logging
import Synchronization

final class CapturedLogs: Sendable {
    private let lines = Mutex<[String]>([])

    func append(_ line: String) { lines.withLock { $0.append(line) } }
    var text: String { lines.withLock { $0.joined(separator: "\n") } }

    /// A logger writing here (and nowhere else) from `level` up.
    func logger(label: String = "continuum", level: Logger.Level) -> Logger {
        var l = Logger(label: label) { label in Handler(label: label, sink: self) }
        l.logLevel = level
        return l
    }

    struct Handler: LogHandler {
        let label: String
        let sink: CapturedLogs
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            let all = metadata.merging(event.metadata ?? [:]) { $1 }
            let fields = all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
            sink.append("\(event.level) \(label) \(fields) [\(event.source)] \(event.message)\(event.error.map { " error: \($0)" } ?? "")")
        }
    }
}
