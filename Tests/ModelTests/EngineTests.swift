// Engine behaviour: batching independent sequences, sampling, generation limits.
// On the tiny Llama (TestSupport's `Fixtures.tinyLlama()`), since none of
// these assertions depends on the model; one batching test also runs on the
// backbone, for its quantised kernels (see `batchQuantised`).
import Digest
import Foundation
import Testing
import TestSupport
import Tensor
@testable import Model

@Suite("Engine")
struct EngineTests {
    /// Runs `prompts` alone and as one batch (prefill, then one decode step
    /// for all with each its own next token) and expects every sequence's
    /// logits from the batch to be the bits it gets alone.
    static func expectBatchEqualsAlone(_ model: LlamaModel, _ prompts: [[Int]]) throws {
        // Alone.
        var alone: [[Float]] = []
        var aloneCaches: [KVCache] = []
        for p in prompts {
            let c = model.makeCache()
            alone.append(try model.forward(tokens: p, cache: c))
            aloneCaches.append(c)
        }
        // Together: all prefills in one step.
        let caches = prompts.map { _ in model.makeCache() }
        let together = try model.forward(zip(prompts, caches).map { LlamaModel.Step(tokens: $0, cache: $1) })
        for i in prompts.indices {
            #expect(together[i] == alone[i], "prefill of sequence \(i) (\(prompts[i].count) tokens): max |Δ| \(maxAbsDiff(together[i][...], alone[i][...]))")
            #expect(caches[i].count == prompts[i].count)
        }
        // Then one decode step for all at once (each with its own next token)
        // equals the separate decode steps, bit for bit.
        let next = alone.map { Sampler.argmax($0) }
        let stepped = try model.forward(zip(next, caches).map { LlamaModel.Step(tokens: [$0], cache: $1) })
        for i in prompts.indices {
            let single = try model.forward(tokens: [next[i]], cache: aloneCaches[i])
            #expect(stepped[i] == single, "decode of sequence \(i): max |Δ| \(maxAbsDiff(stepped[i][...], single[...]))")
        }
    }

    /// Prompts of fewer and of more than `Fixtures.prefillRows` tokens (the
    /// sgemm products' and blocked attention's thresholds), so one batch
    /// mixes both paths; the last is repeated in `mixedBatch` until it
    /// reaches them (the products' threshold depends on the CPU).
    static let batchPrompts = ["The capital of France is", "def add(a, b):", "Once upon a time, in a land far away,",
                               "A quick brown fox jumps over the lazy dog and keeps running until the sun sets behind the hills"]

    /// `batchPrompts` in `model`'s tokens, plus the last one repeated to at
    /// least `Fixtures.prefillRows(model)` tokens; checked to mix both paths.
    static func mixedBatch(_ model: LlamaModel) -> [[Int]] {
        var prompts = batchPrompts.map { model.tokenizer.encode($0) }
        prompts.append(longPrompt(model, batchPrompts.last!))
        #expect(prompts.contains { $0.count < min(WeightMatrix.gemmThreshold, Attention.prefillTokens) }
                && prompts.contains { $0.count >= Fixtures.prefillRows(model) })
        return prompts
    }

    /// `sentence` repeated until it is at least as long as the prefill
    /// paths' thresholds (sgemm products, blocked attention), in tokens.
    static func longPrompt(_ model: LlamaModel, _ sentence: String) -> [Int] {
        var text = sentence
        while model.tokenizer.encode(text).count < Fixtures.prefillRows(model) { text += " " + sentence }
        return model.tokenizer.encode(text)
    }

    @Test("a batch of sequences gives each sequence's own logits, bit for bit")
    func batch() throws {
        let model = try Fixtures.tinyLlama()
        try Self.expectBatchEqualsAlone(model, Self.mixedBatch(model))
    }

    // The one Engine test on the real backbone, on purpose: the tiny Llama's
    // weights are F32, whose products run one sequence at a time through
    // sgemm. Only a block format (the backbone's Q4_1 layers and Q8_0 head,
    // with their packed 32-block SIMD kernels) multiplies a batch's short
    // sequences together, and only there does "every sequence gets the bits
    // it gets alone" depend on those kernels treating each vector
    // independently of its batch. (LevelTests rely on this test for that.)
    @Test("a batch of sequences gives each sequence's own logits, bit for bit, through the backbone's Q4_1 kernels")
    func batchQuantised() throws {
        let model = try Fixtures.backbone()
        #expect(model.weights.matmulWeights.allSatisfy { $0.type.blockSize == 32 }, "the backbone's matrices are in 32-block formats")
        try Self.expectBatchEqualsAlone(model, Self.mixedBatch(model))
    }

    @Test("prefill in one step equals token-by-token decode")
    func prefillVersusDecode() throws {
        let model = try Fixtures.tinyLlama()
        // Long enough for the prefill paths (sgemm products, blocked attention).
        let ids = Self.longPrompt(model, "A quick brown fox jumps over the lazy dog and keeps running")
        try #require(ids.count >= Fixtures.prefillRows(model))
        let whole = try model.forward(tokens: ids, cache: model.makeCache())
        let cache = model.makeCache()
        var last: [Float] = []
        for id in ids { last = try model.forward(tokens: [id], cache: cache) }
        let scale = whole.map(abs).max()!
        #expect(maxAbsDiff(whole[...], last[...]) <= 1e-3 * scale)
        #expect(Sampler.argmax(whole) == Sampler.argmax(last))
    }

    @Test("a stream split at a layer (frozen layers batched once, the rest in pieces over a cache) equals one pass")
    func splitStream() throws {
        let model = try Fixtures.tinyLlama()
        let ids = model.tokenizer.encode("A quick brown fox jumps over the lazy dog and keeps running until the sun sets")
        try #require(ids.count > 6)
        let whole = try model.hiddenStates([LlamaModel.Step(tokens: ids, cache: model.makeCache())])
        let d = model.configuration.hiddenSize, layers = model.configuration.numHiddenLayers, split = layers / 2
        #expect(split > 0 && split < layers)
        let lower = model.makeCache(layers: 0..<split), upper = model.makeCache(layers: split..<layers)
        let residuals = try model.residualStream(tokens: ids, cache: lower, below: split)
        #expect(lower.count == ids.count)
        var pieces: [Float] = []
        for (from, to) in [(0, 5), (5, 6), (6, ids.count)] {
            pieces += try model.hiddenStates(from: split, residuals: Array(residuals[(from * d)..<(to * d)]),
                                             LlamaModel.Step(tokens: Array(ids[from..<to]), cache: upper), tape: nil)
            #expect(upper.count == to)
        }
        let scale = whole.map(abs).max()!
        #expect(maxAbsDiff(pieces[...], whole[...]) <= 1e-4 * scale)
    }

    /// A prompt after which the tiny (random, flat) Llama's greedy text
    /// varies (after most prompts it soon repeats one token) and whose top
    /// two tokens stay apart: along its first 30 greedy tokens the runner-up
    /// has at most 0.9987 times the top token's probability (0.9904 in the
    /// first 12), so min-p 0.999 keeps the top token alone.
    static let variedPrompt = "Licensed under the Apache License"

    @Test("bad input is rejected with a clear error")
    func badInput() throws {
        let model = try Fixtures.tinyLlama()
        let vocabulary = model.configuration.vocabSize
        #expect(throws: ModelInputError.tokenOutOfRange(vocabulary, vocabulary: vocabulary)) {
            try model.forward(tokens: [1, vocabulary], cache: model.makeCache())
        }
        #expect(throws: ModelInputError.tokenOutOfRange(-1, vocabulary: vocabulary)) {
            try model.forward(tokens: [-1], cache: model.makeCache())
        }
        #expect(throws: ModelInputError.empty) { try model.forward(tokens: [], cache: model.makeCache()) }
        let small = KVCache(layers: model.configuration.numHiddenLayers, kvDim: model.configuration.keyValueDim, maxLength: 4)
        #expect(throws: ModelInputError.contextOverflow(needed: 5, limit: 4)) {
            try model.forward(tokens: [1, 2, 3, 4, 5], cache: small)
        }
    }

    @Test("same seed gives the same text; different seeds differ")
    func seeds() throws {
        let model = try Fixtures.tinyLlama()
        let prompt = model.tokenizer.encode("Write a short poem about the sea:")
        var p = SamplingParameters()
        p.temperature = 1.0
        p.topK = 0
        p.topP = 1
        p.minP = 0
        p.maxTokens = 24
        p.seed = 42
        let g = Generator(model: model)
        let a = try g.generate(prompt: prompt, parameters: p)
        let b = try g.generate(prompt: prompt, parameters: p)
        #expect(a.tokens.count == 24, "a sampled run long enough to compare")
        #expect(a.tokens == b.tokens)
        p.seed = 43
        let c = try g.generate(prompt: prompt, parameters: p)
        #expect(c.tokens != a.tokens)
    }

    @Test("top-k 1 and min-p near 1 are greedy")
    func truncationIsGreedy() throws {
        let model = try Fixtures.tinyLlama()
        let prompt = model.tokenizer.encode(Self.variedPrompt)
        var greedy = SamplingParameters()
        greedy.temperature = 0
        greedy.maxTokens = 12
        let g = Generator(model: model)
        let reference = try g.generate(prompt: prompt, parameters: greedy).tokens
        #expect(reference.count == 12 && Set(reference).count > 3, "\(reference)")
        var k1 = greedy
        k1.temperature = 1.5
        k1.topK = 1
        k1.seed = 7
        #expect(try g.generate(prompt: prompt, parameters: k1).tokens == reference)
        var mp = greedy
        mp.temperature = 1.0
        mp.topK = 0
        mp.minP = 0.999
        mp.seed = 7
        #expect(try g.generate(prompt: prompt, parameters: mp).tokens == reference)
    }

    @Test("max tokens, stop strings and streaming agree")
    func limitsAndStops() throws {
        let model = try Fixtures.tinyLlama()
        let prompt = model.tokenizer.encode(Self.variedPrompt)
        var p = SamplingParameters()
        p.temperature = 0
        p.maxTokens = 5
        let g = Generator(model: model)
        let five = try g.generate(prompt: prompt, parameters: p)
        #expect(five.tokens.count == 5)
        #expect(five.finishReason == .length)
        // The greedy continuation without stops, token by token.
        p.maxTokens = 30
        var pieces: [GeneratedToken] = []
        let full = try g.generate(prompt: prompt, parameters: p) { pieces.append($0); return true }
        try #require(full.finishReason == .length && full.tokens.count == 30, "\(full)")
        #expect(Array(full.tokens.prefix(5)) == five.tokens)
        #expect(pieces.map(\.text).joined() == full.text)
        let texts = pieces.filter { $0.id >= 0 }.map(\.text)
        try #require(texts.count == 30)
        // A stop string that begins with the last character of token k − 1's
        // text and ends inside token k's, found nowhere earlier: generation
        // stops at token k, the streamed text held that character back, and
        // the text ends just before it.
        var chosen: (stop: String, text: String, tokens: Int)?
        for k in 3..<texts.count where texts[k - 1].count >= 1 && texts[k].count >= 2 {
            let before = texts[0..<(k - 1)].joined() + String(texts[k - 1].dropLast())
            let stop = String(texts[k - 1].suffix(1)) + String(texts[k].prefix(2))
            if let r = full.text.range(of: stop), String(full.text[..<r.lowerBound]) == before {
                chosen = (stop, before, k + 1)
                break
            }
        }
        let (stop, expected, tokens) = try #require(chosen, "no stop string straddling two tokens in \(full.text.debugDescription)")
        p.stop = [stop]
        var streamed = ""
        let stopped = try g.generate(prompt: prompt, parameters: p) { tok in
            streamed += tok.text
            return true
        }
        #expect(stopped.finishReason == .stop)
        #expect(stopped.text == expected, "stop \(stop.debugDescription)")
        #expect(stopped.tokens == Array(full.tokens.prefix(tokens)))
        #expect(streamed == stopped.text)
        // The callback can stop generation.
        var count = 0
        let early = try g.generate(prompt: prompt, parameters: p) { _ in
            count += 1
            return count < 2
        }
        #expect(early.tokens.count == 2)
    }

    @Test("the AsyncSequence streams the same tokens as the callback")
    func asyncStream() async throws {
        let model = try Fixtures.tinyLlama()
        // Its greedy text mixes tokens that complete text with bytes held back (not UTF-8 on their own).
        let prompt = model.tokenizer.encode("Once upon a time")
        var p = SamplingParameters()
        p.temperature = 0
        p.maxTokens = 10
        let direct = try Generator(model: model).generate(prompt: prompt, parameters: p)
        #expect(direct.tokens.count == 10)
        var ids: [Int] = []
        var text = ""
        for try await tok in Generator(model: model).stream(prompt: prompt, parameters: p) {
            if tok.id >= 0 { ids.append(tok.id) }
            text += tok.text
        }
        #expect(ids == direct.tokens)
        #expect(text == direct.text)
    }

    @Test("invalid sampling parameters are rejected")
    func invalidParameters() throws {
        for json in [#"{"temperature": -1}"#, #"{"top_p": 0}"#, #"{"min_p": 1.5}"#, #"{"max_tokens": -3}"#, #"{"stop": [""]}"#] {
            #expect(throws: SamplingParameters.Invalid.self) {
                try JSONDecoder().decode(SamplingParameters.self, from: Data(json.utf8))
            }
        }
        let ok = try JSONDecoder().decode(SamplingParameters.self, from: Data(#"{"temperature": 0, "seed": 5}"#.utf8))
        #expect(ok.temperature == 0 && ok.seed == 5 && ok.maxTokens == 256)
    }

    @Test("SHA-256 matches the FIPS test vectors")
    func sha256() {
        var a = SHA256()
        a.update(Array("abc".utf8))
        #expect(a.finalizeHex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        var e = SHA256()
        #expect(e.finalizeHex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        var long = SHA256()
        let chunk = Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)
        long.update(chunk.prefix(10))
        long.update(chunk.dropFirst(10))
        #expect(long.finalizeHex() == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
    }
}

@Suite("Default model")
struct DefaultModelTests {
    @Test("fetch keeps a verified file and replaces a corrupted one")
    func fetchRepairs() throws {
        let source = Fixtures.backbonePath
        guard FileManager.default.fileExists(atPath: source) else {
            Issue.record("The default model is missing at \(source): run `continuum fetch-model` first.")
            return
        }
        let dir = NSTemporaryDirectory() + "continuum-fetch-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let target = dir + "/" + DefaultModel.fileName
        try FileManager.default.copyItem(atPath: source, toPath: target)
        var log: [String] = []
        #expect(try DefaultModel.fetch(to: target) { log.append($0) } == target)
        #expect(log.contains { $0.contains("SHA-256 matches") } && !log.contains { $0.contains("downloading") })
        // Corrupt one byte: the next fetch downloads and verifies a fresh copy.
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: target))
        try handle.seek(toOffset: 5_000_000)
        try handle.write(contentsOf: Data([0xFF, 0x00, 0xFF]))
        try handle.close()
        #expect(try SHA256.hex(ofFile: target) != DefaultModel.sha256)
        log.removeAll()
        #expect(try DefaultModel.fetch(to: target) { log.append($0) } == target)
        #expect(log.contains { $0.contains("downloading") })
        #expect(try SHA256.hex(ofFile: target) == DefaultModel.sha256)
    }
}
