// Streamed responses whose client stops reading: the write watch ends them
// (so the generation behind them is cancelled); and a client that goes away
// mid-stream frees its batch-engine slot at once.
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import NIOCore
import Synchronization
import Testing
@testable import Service

@Suite("Streaming", .serialized)
struct StreamingTests {
    /// A writer whose writes never complete until `fail` is called (a client that reads nothing).
    final class StalledWriter: ResponseBodyWriter, @unchecked Sendable {
        struct Closed: Error {}
        let pending = Mutex<CheckedContinuation<Void, Error>?>(nil)
        let failed = Mutex(false)
        func write(_ buffer: ByteBuffer) async throws {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, Error>) in
                let already = failed.withLock { $0 }
                if already { c.resume(throwing: Closed()) } else { pending.withLock { $0 = c } }
            }
        }
        func finish(_ trailingHeaders: HTTPFields?) async throws {}
        func fail() {
            failed.withLock { $0 = true }
            pending.withLock { $0?.resume(throwing: Closed()); $0 = nil }
        }
    }

    @Test("a write the client does not take within the timeout stops the stream")
    func stalledWrite() async throws {
        let writer = StalledWriter(), watch = WriteWatch()
        let stalls = Mutex(0)
        watch.guarding(timeout: .milliseconds(200), period: .milliseconds(50)) {
            stalls.withLock { $0 += 1 }
            writer.fail()
        }
        var stream = StreamWriter(inner: writer, watch: watch)
        let start = ContinuousClock.now
        await #expect(throws: StalledWriter.Closed.self) { try await stream.write("data: x\n\n") }
        let waited = ContinuousClock.now - start
        watch.stop()
        #expect(waited >= .milliseconds(200) && waited < .seconds(5), "\(waited)")
        #expect(stalls.withLock { $0 } == 1)
        // A writer that keeps up is never stopped: 20 writes of 10 ms, 30 ms
        // apart, take longer in all than the timeout (so the watch must time
        // each write, not the stream), while each stays far inside it even
        // when the other suites load the machine.
        let quick = WriteWatch()
        quick.guarding(timeout: .milliseconds(500), period: .milliseconds(20)) { Issue.record("a prompt write was taken for a stall") }
        for _ in 0..<20 {
            quick.begin()
            try await Task.sleep(for: .milliseconds(10))
            quick.end()
            try await Task.sleep(for: .milliseconds(30))
        }
        quick.stop()
    }

    @Test("a client that disconnects mid-stream frees its engine slot before the generation would have ended")
    func disconnect() async throws {
        let (db, key) = try await Fixture.database()
        // The real model, on purpose: 2000 tokens must outlast the test by far, so that an engine slot freed
        // within 5 s of the disconnect can only be the disconnect's doing. The tiny Llama cannot: its context
        // is 256 positions (at most 255 tokens, about 8 ms of generation), so the generation would end on its
        // own before `running()` is first read, and the assertions would prove nothing.
        try await Fixture.app(db, on: .real).test(.live) { client in
            let port = try #require(client.port)
            func running() async throws -> Int {
                let text = try await client.execute(uri: "/metrics", method: .get).body.text
                let line = try #require(text.split(separator: "\n").first { $0.hasPrefix("continuum_generations_running ") })
                return Int(Double(line.split(separator: " ")[1]) ?? -1)
            }
            let body = #"{"user": "zed", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 2000, "temperature": 0, "stream": true}"#
            let c = try RawHTTP(port: port)
            try c.send("POST /v1/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(key)\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)")
            // Tokens are flowing: the generation is running.
            let status = try await RawHTTP.run { try c.headStatus() }
            #expect(status == 200)
            #expect(try await running() == 1)
            c.shutdown()
            let closed = ContinuousClock.now
            while try await running() > 0 && ContinuousClock.now - closed < .seconds(20) { try await Task.sleep(for: .milliseconds(50)) }
            #expect(try await running() == 0)
            // 2000 tokens take far longer than this on any machine the tests run on.
            #expect(ContinuousClock.now - closed < .seconds(5), "the slot was held \(ContinuousClock.now - closed) after the client left")
        }
        await db.close()
    }
}

@Suite("Lifecycle", .serialized)
struct LifecycleTests {
    @Test("the batch engine's and the compute lanes' threads live from the application's start to its shutdown, and no longer",
          arguments: [0, 2])
    func engineThread(learningWorkers: Int) async throws {
        let (db, key) = try await Fixture.database()
        // This test's applications only: the other suites' run meanwhile.
        let count = ServiceThreads.Count()
        var threads: Int { count.running.load(ordering: .relaxed) }
        for _ in 0..<2 {
            let app = try Fixture.app(db, learning: learningWorkers > 0) { $0.learningWorkers = learningWorkers }
            #expect(threads == 0, "a thread started before the application runs")
            try await ServiceThreads.$counter.withValue(count) {
                try await app.test(.live) { client in
                    _ = try await generate(client, key: key, user: "lila", prompt: "Hello", maxTokens: 2, learn: false)
                    // The engine's, and one lane per learning worker (at least one, for consolidations and audits).
                    #expect(threads == 1 + max(1, learningWorkers))
                }
            }
            // The service group has returned: every thread has ended.
            #expect(threads == 0, "a thread outlived its application")
        }
        await db.close()
    }
}
