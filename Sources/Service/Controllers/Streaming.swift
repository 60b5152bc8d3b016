// Server-sent events whose client must keep reading. Every write of a
// streamed response is watched: when one has not been taken by the client
// within stream_write_timeout_seconds, the connection is closed, the write
// fails, the response's producer stops, and the generation it was reading
// is cancelled in the batch engine (its slot freed). A generation that was
// not delivered is not recorded and learns nothing. Every event is written
// as a StreamEvent: a name, when it has one, and a generated type's JSON.
import Foundation
import Hummingbird
import NIOCore
import Synchronization

/// The watch on a streamed response's writes: when a write started and is not yet done.
final class WriteWatch: Sendable {
    private let pendingSince = Mutex<ContinuousClock.Instant?>(nil)
    private let stopped = Mutex(false)

    func begin() { pendingSince.withLock { $0 = .now } }
    func end() { pendingSince.withLock { $0 = nil } }
    func stop() { stopped.withLock { $0 = true } }
    var isStopped: Bool { stopped.withLock { $0 } }

    /// Whether a write has been pending for longer than `timeout`.
    func stalled(after timeout: Duration) -> Bool {
        pendingSince.withLock { since in since.map { ContinuousClock.now - $0 > timeout } ?? false }
    }

    /// Checks every `period` until stopped; calls `onStall` (once) when a write has stalled.
    func guarding(timeout: Duration, period: Duration, onStall: @escaping @Sendable () -> Void) {
        Task { [self] in
            while !isStopped {
                try? await Task.sleep(for: period)
                if !isStopped && stalled(after: timeout) {
                    onStall()
                    return
                }
            }
        }
    }
}

/// One server-sent event as this server writes it: an `event:` line when it
/// has a name, one `data:` line, a blank line. The data is a payload's JSON
/// (written as every reply is, by JSONReply: one line, JSON has no raw
/// newlines), or the OpenAI streams' closing `[DONE]`.
struct StreamEvent {
    let event: String?
    let data: String

    private init(event: String?, data: String) {
        self.event = event
        self.data = data
    }

    /// An event whose data is `payload` as JSON.
    init(event: String? = nil, _ payload: some Encodable) throws {
        self.init(event: event, data: String(decoding: try JSONReply.data(payload), as: UTF8.self))
    }

    /// `data: [DONE]`, the last event of an OpenAI stream.
    static let done = StreamEvent(event: nil, data: "[DONE]")

    /// The event's bytes on the wire.
    var bytes: ByteBuffer { ByteBuffer(string: (event.map { "event: \($0)\n" } ?? "") + "data: \(data)\n\n") }
}

/// A streamed response's writer: each write watched.
struct StreamWriter {
    var inner: any ResponseBodyWriter
    let watch: WriteWatch

    mutating func write(_ buffer: ByteBuffer) async throws {
        watch.begin()
        defer { watch.end() }
        try await inner.write(buffer)
    }

    mutating func write(_ text: String) async throws { try await write(ByteBuffer(string: text)) }

    /// Writes one server-sent event.
    mutating func send(_ event: StreamEvent) async throws { try await write(event.bytes) }
}

extension GenerationController {
    /// A server-sent-events response whose events `produce` writes.
    func eventStream(_ context: AppContext, _ produce: @escaping @Sendable (inout StreamWriter) async throws -> Void) -> Response {
        let channel = context.channel, timeout = Duration.seconds(configuration.streamWriteTimeoutSeconds)
        // The body is written after the pipeline has returned: it takes the request's scope (its id) along.
        let scope = RequestScope.current
        return Response(status: .ok,
                        headers: [.contentType: "text/event-stream", .cacheControl: "no-cache"],
                        body: ResponseBody { writer in
                            let watch = WriteWatch()
                            defer { watch.stop() }
                            // Closing the connection fails the pending write, which ends `produce`.
                            watch.guarding(timeout: timeout, period: min(timeout / 4, .seconds(1))) { channel.close(promise: nil) }
                            var stream = StreamWriter(inner: writer, watch: watch)
                            try await RequestScope.$current.withValue(scope) { try await produce(&stream) }
                            try await stream.inner.finish(nil)
                        })
    }
}
