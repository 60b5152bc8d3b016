// How generation and learning share the cores (issue 13.4): light memory
// work never waits behind heavy work; heavy work runs on background lanes in
// parallel; a long prompt is prefilled in chunks while other users decode.
import Foundation
import Model
import Synchronization
import Testing
import TestSupport
import Tensor
@testable import Service

/// A gate a test opens once; work spinning on it waits until then.
final class TestGate: Sendable {
    private let flag = Atomic<Bool>(false)
    private let arrivals = Atomic<Int>(0)
    func open() { flag.store(true, ordering: .relaxed) }
    /// Counts the caller as arrived and waits until the gate is open.
    func wait() {
        arrivals.add(1, ordering: .relaxed)
        while !flag.load(ordering: .relaxed) { usleep(1000) }
    }
    var arrived: Int { arrivals.load(ordering: .relaxed) }
}

@Suite("Scheduling")
struct SchedulingTests {
    @Test("light work runs while every heavy lane is busy; heavy lanes run in parallel, as background threads; after shutdown heavy work is refused",
          .timeLimit(.minutes(1)))
    func lanes() async throws {
        let lanes = ComputeLanes(lanes: 2)
        let runner = Task { await lanes.run() }
        let gate = TestGate()
        async let first = lanes.run(.heavy) { gate.wait(); return Parallel.isBackgroundThread }
        async let second = lanes.run(.heavy) { gate.wait(); return Parallel.isBackgroundThread }
        // Both heavy jobs start: two lanes, in parallel.
        let deadline = ContinuousClock.now + .seconds(30)
        while gate.arrived < 2 && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(gate.arrived == 2)
        // A third waits for a lane; light work does not.
        async let third = lanes.run(.heavy) { 3 }
        let light = try await lanes.run(.light) { Parallel.isBackgroundThread }
        #expect(light == false)
        #expect(lanes.waiting == 1)
        gate.open()
        let (f, s, t) = try await (first, second, third)
        #expect(f && s && t == 3)
        lanes.shutdown()
        await runner.value
        await #expect(throws: BatchEngine.ShutDown.self) { _ = try await lanes.run(.heavy) { 0 } }
        #expect(try await lanes.run(.light) { 4 } == 4)
    }

    @Test("a long prompt is prefilled in chunks of at most prefill_chunk tokens, giving the unchunked logits, while another sequence decodes")
    func chunkedPrefill() async throws {
        let model = try Fixtures.tinyLlama()
        let long = Array((0..<90).map { 3 + ($0 * 37) % (model.configuration.vocabSize - 3) })
        // The model: chunks of 8 over the cache give the one-shot prefill's logits.
        let whole = try model.forward(tokens: long, cache: model.makeCache())
        let cache = model.makeCache()
        var chunked: [Float] = []
        for start in stride(from: 0, to: long.count, by: 8) {
            chunked = try model.forward(tokens: Array(long[start..<min(long.count, start + 8)]), cache: cache)
        }
        let scale = whole.map(abs).max() ?? 1
        #expect(zip(whole, chunked).map { abs($0 - $1) }.max()! <= 1e-4 * scale)

        // The engine: a decoding sequence keeps stepping while the long prompt is read 8 tokens per step.
        let engine = BatchEngine(model: model, maxBatch: 4, maxQueued: 8, prefillChunk: 8)
        let runner = Task { await engine.run() }
        var p = SamplingParameters()
        p.temperature = 0
        p.maxTokens = 24
        let short = [5, 9, 14]
        let alone = try Generator(model: model).generate(prompt: short, parameters: p).tokens
        let expected = try Generator(model: model).generate(prompt: long, parameters: p).tokens
        let a = try engine.submit(prompt: short, parameters: p)
        let b = try engine.submit(prompt: long, parameters: p)
        func tokens(_ s: AsyncThrowingStream<GenerationEvent, Error>) async throws -> [Int] {
            for try await e in s { if case .finished(let r) = e { return r.tokens } }
            return []
        }
        async let ta = tokens(a)
        let tb = try await tokens(b)
        let decoded = try await ta
        #expect(decoded == alone)
        #expect(tb == expected)
        let stats = engine.stats
        #expect(stats.largestPrefill <= 8)
        #expect(stats.steps >= (long.count + 7) / 8)
        engine.shutdown()
        await runner.value
    }
}
