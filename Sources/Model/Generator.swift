// Generator: prompt → tokens, with stop strings, end-of-sequence, limits and
// streaming (a callback, or an AsyncSequence).
import Foundation

/// One generated token and the text it completes (may be empty while a UTF-8
/// character or a possible stop string is incomplete). A final item with id
/// -1 carries text still held back when generation ended.
public struct GeneratedToken: Sendable, Equatable {
    /// The token id, or -1 for the final flush of held-back text.
    public let id: Int
    public let text: String
}

/// Why generation ended (OpenAI's finish_reason values).
public enum FinishReason: String, Sendable, Codable {
    /// End-of-sequence token or a stop string.
    case stop
    /// max_tokens or the context length was reached.
    case length
}

/// The outcome of a generation.
public struct GenerationResult: Sendable {
    public let promptTokens: Int
    public let tokens: [Int]
    public let text: String
    public let finishReason: FinishReason
}

/// Runs generation for one sequence.
public struct Generator {
    public let model: LlamaModel
    /// The user's levels applied on top of the backbone (nil: bare backbone).
    public let adapter: (any LayerAdapter)?

    public init(model: LlamaModel, adapter: (any LayerAdapter)? = nil) {
        self.model = model
        self.adapter = adapter
    }

    /// Generates from `prompt` tokens, calling `onToken` as text becomes
    /// final. Returns when a stop condition is met or `onToken` returns false.
    @discardableResult
    public func generate(prompt: [Int], parameters: SamplingParameters,
                         onToken: (GeneratedToken) -> Bool = { _ in true }) throws -> GenerationResult {
        var sequence = try GenerationSequence(model: model, prompt: prompt, parameters: parameters, adapter: adapter)
        while !sequence.isFinished {
            let logits = try model.forward([sequence.step])[0]
            for token in sequence.accept(logits: logits) where !onToken(token) {
                for tail in sequence.cancel() { _ = onToken(tail) }
            }
        }
        return sequence.result
    }

    /// The same generation as an AsyncSequence of tokens, run off the caller's
    /// task; cancelling the consumer stops generation.
    public func stream(prompt: [Int], parameters: SamplingParameters) -> AsyncThrowingStream<GeneratedToken, Error> {
        let model = self.model
        let adapter = UncheckedAdapter(adapter)
        return AsyncThrowingStream { continuation in
            let task = Task.detached {
                do {
                    try Generator(model: model, adapter: adapter.value).generate(prompt: prompt, parameters: parameters) { tok in
                        if Task.isCancelled { return false }
                        if case .terminated = continuation.yield(tok) { return false }
                        return true
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }
}

/// One sequence's generation state, stepped by whoever runs the model: the
/// `Generator` for one sequence, a server's batch loop for many (each step
/// feeds `step` to `LlamaModel.forward` together with other sequences' steps
/// and hands the sequence its logits).
public struct GenerationSequence {
    public let prompt: [Int]
    public let parameters: SamplingParameters
    public let cache: KVCache
    public let adapter: (any LayerAdapter)?
    /// Tokens generated so far (no end-of-sequence token).
    public private(set) var generated: [Int] = []
    /// Final text so far (stop strings cut, held-back text not yet included).
    public private(set) var text = ""
    /// Set when generation has ended.
    public private(set) var finishReason: FinishReason?
    var sampler: Sampler
    var stream: StopStringFilter
    var detok: StreamingDetokenizer
    var history: [Int]
    let limit: Int
    let eos: Set<Int>

    /// Validates the parameters and the prompt against the model's context.
    public init(model: LlamaModel, prompt: [Int], parameters: SamplingParameters, adapter: (any LayerAdapter)? = nil) throws {
        try parameters.validate()
        guard !prompt.isEmpty else { throw ModelInputError.empty }
        limit = model.configuration.maxPositionEmbeddings
        guard prompt.count < limit else { throw ModelInputError.contextOverflow(needed: prompt.count + 1, limit: limit) }
        self.prompt = prompt
        self.parameters = parameters
        self.adapter = adapter
        cache = model.makeCache()
        sampler = Sampler(parameters)
        stream = StopStringFilter(stops: parameters.stop)
        detok = StreamingDetokenizer(tokenizer: model.tokenizer)
        history = prompt
        eos = Set(model.tokenizer.eosIDs)
        if parameters.maxTokens == 0 { finishReason = .length }
    }

    public var isFinished: Bool { finishReason != nil }

    /// The next forward step: the prompt first, then the last generated token.
    public var step: LlamaModel.Step { step(prefilling: prompt.count) }

    /// Prompt tokens not yet run (chunked prefill: the prompt may be read over several steps).
    public var promptLeft: Int { max(0, prompt.count - cache.count) }

    /// The next forward step, reading at most `limit` (≥ 1) of the prompt's
    /// remaining tokens; once the prompt is read, the last generated token.
    /// After a step that leaves `promptLeft` above 0, the logits are not
    /// sampled (`accept` is for the step that finishes the prompt and after).
    public func step(prefilling limit: Int) -> LlamaModel.Step {
        let tokens = promptLeft > 0 ? Array(prompt[cache.count..<min(prompt.count, cache.count + max(1, limit))])
                                    : [generated[generated.count - 1]]
        return LlamaModel.Step(tokens: tokens, cache: cache, adapter: adapter)
    }

    /// Samples from the logits after `step`; returns the text that became
    /// final (the token's, and when this ends the sequence, any held-back text).
    public mutating func accept(logits: [Float]) -> [GeneratedToken] {
        precondition(!isFinished, "the sequence has finished")
        let next = sampler.sample(logits, history: history)
        if eos.contains(next) { return finish(.stop) }
        generated.append(next)
        history.append(next)
        let (out, stopped) = stream.push(detok.append(next))
        text += out
        var tokens = [GeneratedToken(id: next, text: out)]
        if stopped {
            tokens += finish(.stop)
        } else if generated.count >= parameters.maxTokens || cache.count + 1 > limit {
            tokens += finish(.length)
        }
        return tokens
    }

    /// Ends the sequence now (the consumer went away or asked to stop);
    /// returns held-back text, if any.
    public mutating func cancel() -> [GeneratedToken] {
        isFinished ? [] : finish(.stop)
    }

    mutating func finish(_ reason: FinishReason) -> [GeneratedToken] {
        finishReason = reason
        guard !stream.stopped else { return [] }
        let (tail, _) = stream.push(detok.flush(), final: true)
        text += tail
        return tail.isEmpty ? [] : [GeneratedToken(id: -1, text: tail)]
    }

    public var result: GenerationResult {
        GenerationResult(promptTokens: prompt.count, tokens: generated, text: text, finishReason: finishReason ?? .length)
    }
}

/// Holds back streamed text that might be the start of a stop string, and
/// cuts the text at the first complete stop string.
struct StopStringFilter {
    let stops: [String]
    private var held = ""
    private(set) var stopped = false

    init(stops: [String]) {
        self.stops = stops
    }

    /// Adds text; returns what can be released and whether a stop string
    /// was found (the text before it is released, the rest dropped).
    mutating func push(_ text: String, final: Bool = false) -> (String, Bool) {
        guard !stopped else { return ("", true) }
        held += text
        if stops.isEmpty { defer { held = "" }; return (held, false) }
        var first: Range<String.Index>?
        for s in stops {
            if let r = held.range(of: s), first == nil || r.lowerBound < first!.lowerBound { first = r }
        }
        if let r = first {
            stopped = true
            let out = String(held[..<r.lowerBound])
            held = ""
            return (out, true)
        }
        if final { defer { held = "" }; return (held, false) }
        // Keep the longest suffix that is a prefix of some stop string.
        var keep = 0
        for s in stops {
            for n in stride(from: min(s.count - 1, held.count), to: 0, by: -1) where n > keep {
                if held.hasSuffix(s.prefix(n)) { keep = n; break }
            }
        }
        let cut = held.index(held.endIndex, offsetBy: -keep)
        let out = String(held[..<cut])
        held = String(held[cut...])
        return (out, false)
    }
}

/// Carries an adapter into the generation task; the caller must not mutate
/// it while the stream runs.
struct UncheckedAdapter: @unchecked Sendable {
    let value: (any LayerAdapter)?
    init(_ value: (any LayerAdapter)?) { self.value = value }
}
