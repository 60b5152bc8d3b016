// BatchEngine: continuous batching. One thread runs the backbone; every loop
// iteration is one LlamaModel.forward over all sequences in flight, of any
// users (new sequences prefill their prompt, the others decode one token),
// each with its own KV cache and its user's memory levels. Sequences join
// and leave between iterations. Prefill is chunked: one step reads at most
// `prefillChunk` prompt tokens in all (the oldest prompts first), so a long
// prompt does not stall the tokens of users already decoding. The thread lives from `run()` (the
// application's service starts it) until `shutdown()`: sequences still
// waiting or running then end with `ShutDown`.
import Foundation
import Model
import Tensor

/// What a submitted generation produces, in order: tokens, then the result.
public enum GenerationEvent: Sendable {
    case token(GeneratedToken)
    case finished(GenerationResult)
}

/// Runs many users' generations through one backbone together.
public final class BatchEngine: @unchecked Sendable {
    public let model: LlamaModel
    /// Most sequences stepped together.
    public let maxBatch: Int
    /// Most sequences admitted (running + waiting); beyond it `submit` refuses.
    public let maxQueued: Int
    /// Most prompt tokens read in one step, over all sequences prefilling.
    public let prefillChunk: Int

    final class Entry: @unchecked Sendable {
        var sequence: GenerationSequence
        let continuation: AsyncThrowingStream<GenerationEvent, Error>.Continuation
        var cancelled = false   // guarded by the engine's lock
        init(_ s: GenerationSequence, _ c: AsyncThrowingStream<GenerationEvent, Error>.Continuation) {
            sequence = s
            continuation = c
        }
    }

    private let condition = NSCondition()
    private var waiting: [Entry] = []
    private var running: [Entry] = []
    private var stopping = false   // guarded by `condition`
    private var stepsRun = 0, largestPrefill = 0   // guarded by `condition`

    public struct Overloaded: Error, CustomStringConvertible {
        public let description = "the server has too many generations in flight; retry later"
    }

    /// The engine stopped before the sequence ended.
    public struct ShutDown: Error, CustomStringConvertible {
        public let description = "the server is shutting down"
    }

    public init(model: LlamaModel, maxBatch: Int = 16, maxQueued: Int = 64, prefillChunk: Int = 256) {
        self.model = model
        self.maxBatch = maxBatch
        self.maxQueued = maxQueued
        self.prefillChunk = max(1, prefillChunk)
    }

    /// Runs the engine's thread until `shutdown()`; returns when it has ended.
    public func run() async {
        await ServiceThreads.run(named: "continuum.batch") { [self] in loop() }
    }

    /// Stops the engine: its thread ends after the step in progress; sequences left end with `ShutDown`.
    public func shutdown() {
        condition.lock()
        stopping = true
        condition.signal()
        condition.unlock()
    }

    /// Starts a generation. Throws at once for invalid parameters or prompts
    /// (the model's errors) and `Overloaded` when `maxQueued` are in flight.
    /// Cancelling the consumer of the stream ends the sequence.
    public func submit(prompt: [Int], parameters: SamplingParameters, adapter: (any LayerAdapter)? = nil) throws
        -> AsyncThrowingStream<GenerationEvent, Error> {
        let sequence = try GenerationSequence(model: model, prompt: prompt, parameters: parameters, adapter: adapter)
        let (stream, continuation) = AsyncThrowingStream<GenerationEvent, Error>.makeStream()
        let entry = Entry(sequence, continuation)
        condition.lock()
        defer { condition.unlock() }
        guard !stopping else { throw ShutDown() }
        guard waiting.count + running.count < maxQueued else { throw Overloaded() }
        if sequence.isFinished {   // max_tokens 0
            continuation.yield(.finished(sequence.result))
            continuation.finish()
            return stream
        }
        continuation.onTermination = { [weak self, weak entry] reason in
            guard case .cancelled = reason, let self, let entry else { return }
            self.condition.lock()
            entry.cancelled = true
            self.condition.unlock()
        }
        waiting.append(entry)
        condition.signal()
        return stream
    }

    /// Steps run so far, and the most prompt tokens one step has read.
    public var stats: (steps: Int, largestPrefill: Int) {
        condition.lock()
        defer { condition.unlock() }
        return (stepsRun, largestPrefill)
    }

    /// Sequences stepping and waiting for a slot, now.
    public var load: (running: Int, waiting: Int) {
        condition.lock()
        defer { condition.unlock() }
        return (running.count, waiting.count)
    }

    private func loop() {
        while true {
            condition.lock()
            while waiting.isEmpty && running.isEmpty && !stopping { condition.wait() }
            if stopping {
                let left = waiting + running
                waiting = []
                running = []
                condition.unlock()
                for e in left { e.continuation.finish(throwing: ShutDown()) }
                return
            }
            let room = max(0, maxBatch - running.count)
            running += waiting.prefix(room)
            waiting.removeFirst(min(room, waiting.count))
            let cancelled = running.filter(\.cancelled)
            running.removeAll(where: \.cancelled)
            let batch = running
            condition.unlock()
            for e in cancelled { e.continuation.finish() }
            guard !batch.isEmpty else { continue }
            // Decoding sequences step one token each; prefilling ones share the prompt budget, oldest first.
            var budget = prefillChunk
            var stepping: [Entry] = [], steps: [LlamaModel.Step] = []
            for e in batch {
                let left = e.sequence.promptLeft
                guard left == 0 || budget > 0 else { continue }
                let n = left == 0 ? 1 : min(left, budget)
                if left > 0 { budget -= n }
                stepping.append(e)
                steps.append(e.sequence.step(prefilling: n))
            }
            do {
                let logits = try Parallel.foreground { try model.forward(steps) }
                for (e, l) in zip(stepping, logits) {
                    guard e.sequence.promptLeft == 0 else { continue }   // a chunk of a longer prompt: nothing to sample yet
                    for t in e.sequence.accept(logits: l) { e.continuation.yield(.token(t)) }
                    if e.sequence.isFinished {
                        e.continuation.yield(.finished(e.sequence.result))
                        e.continuation.finish()
                    }
                }
            } catch {
                for e in stepping {
                    e.continuation.finish(throwing: error)
                    _ = e.sequence.cancel()
                }
            }
            condition.lock()
            running.removeAll { $0.sequence.isFinished }
            stepsRun += 1
            largestPrefill = max(largestPrefill, prefillChunk - budget)
            condition.unlock()
        }
    }
}
