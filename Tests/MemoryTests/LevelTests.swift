// Continuum memory levels: configuration, and the forward pass with levels.
import Foundation
import Testing
import TestSupport
import Tensor
@testable import Memory
@testable import Model

/// Fills a state's output projections with small seeded values (a user who
/// has learned something).
func perturb(_ s: LevelState, seed: UInt64, scale: Float = 0.02) {
    var rng = SeededGenerator(seed: seed)
    for l in s.blocks.indices {
        for i in s.blocks[l].indices {
            s.blocks[l][i].down = s.blocks[l][i].down.map { _ in (Float(rng.next() % 2001) / 1000 - 1) * scale }
        }
    }
}

@Suite("Level configuration")
struct LevelConfigurationTests {
    @Test("decodes with defaults for optional keys")
    func defaults() throws {
        let json = #"{"levels": [{"name": "fast", "chunk_size": 64, "layers": [10, 11]}]}"#
        let c = try JSONDecoder().decode(LevelConfiguration.self, from: Data(json.utf8))
        let l = try #require(c.levels.first)
        #expect(l.width == 32 && l.learningRate == 1e-3 && l.retention == 1 && l.optimizer.kind == .adamw)
        #expect(l.optimizer.beta2 == 0.999)
        let m3 = try JSONDecoder().decode(LevelConfiguration.self, from: Data(
            #"{"levels": [{"name": "m", "chunk_size": 8, "layers": [0], "optimizer": {"kind": "m3", "slow_period": 3}}]}"#.utf8))
        #expect(m3.levels[0].optimizer.kind == .m3 && m3.levels[0].optimizer.slowPeriod == 3)
    }

    @Test("invalid configurations say what is wrong", arguments: [
        (#"{"levels": []}"#, "at least one level"),
        (#"{"levels": [{"name": "a", "chunk_size": 0, "layers": [1]}]}"#, "chunk_size"),
        (#"{"levels": [{"name": "a", "chunk_size": 4, "layers": []}]}"#, "layers"),
        (#"{"levels": [{"name": "a", "chunk_size": 4, "layers": [1, 1]}]}"#, "twice"),
        (#"{"levels": [{"name": "a", "chunk_size": 4, "layers": [1]}, {"name": "a", "chunk_size": 8, "layers": [2]}]}"#, "two levels"),
        (#"{"levels": [{"name": "a", "chunk_size": 4, "layers": [1], "retention": 1.5}]}"#, "retention"),
        (#"{"levels": [{"name": "a", "chunk_size": 4, "layers": [1], "learning_rate": -1}]}"#, "learning_rate"),
        (#"{"levels": [{"name": "a", "chunk_size": 4, "layers": [1], "optimizer": {"kind": "m3", "beta1": 1.0}}]}"#, "betas"),
        // Upper bounds: a configuration from a file cannot size gigabytes or overflow a counter.
        (#"{"levels": [{"name": "a", "chunk_size": 16777217, "layers": [1]}]}"#, "chunk_size must be in 1...16777216"),
        (#"{"levels": [{"name": "a", "chunk_size": 4, "width": 4097, "layers": [1]}]}"#, "width must be in 1...4096"),
        ("{\"levels\": [" + (0..<17).map { #"{"name": "l\#($0)", "chunk_size": 4, "layers": [1]}"# }.joined(separator: ", ") + "]}",
         "at most 16 levels"),
        (#"{"levels": [{"name": "\#(String(repeating: "é", count: 33))", "chunk_size": 4, "layers": [1]}]}"#, "at most 64 bytes"),
    ])
    func invalid(json: String, mentions: String) {
        let error = #expect(throws: LevelConfiguration.Invalid.self) {
            try JSONDecoder().decode(LevelConfiguration.self, from: Data(json.utf8))
        }
        #expect(error?.description.contains(mentions) == true, "\(String(describing: error))")
    }

    @Test("layers beyond the backbone are refused")
    func layersOutOfRange() throws {
        let c = LevelConfiguration.defaults(layers: 30)
        try c.validate(layers: 30)
        #expect(throws: LevelConfiguration.Invalid.self) { try c.validate(layers: 12) }
        let model = try LlamaConfiguration(hiddenSize: 8, intermediateSize: 16, numHiddenLayers: 4, numAttentionHeads: 2,
                                           numKeyValueHeads: 1, vocabSize: 10)
        #expect(throws: LevelConfiguration.Invalid.self) { try LevelState(configuration: c, model: model) }
    }

    @Test("levels holding more than maxParameters weights over a backbone are refused before anything is allocated")
    func parameterBound() throws {
        // D(1 + 3R) per block: D = 576, R = 4096, 16 levels of 1 layer is 113 M weights.
        let c = try LevelConfiguration(levels: (0..<16).map {
            .init(name: "l\($0)", chunkSize: 4, width: 4096, layers: [0], learningRate: 1e-3)
        })
        try c.validate(layers: 30)
        let error = #expect(throws: LevelConfiguration.Invalid.self) { try c.validate(layers: 30, hiddenSize: 576) }
        #expect(error?.description.contains("more than \(LevelConfiguration.maxParameters)") == true)
        try LevelConfiguration.defaults(layers: 30).validate(layers: 30, hiddenSize: 576)
    }

    @Test("YAML and JSON files with the same keys load the same configuration")
    func yaml() throws {
        let dir = NSTemporaryDirectory() + "levels-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let yaml = """
            # a user's levels
            levels:
              - name: mid
                chunk_size: 256
                layers: [14, 15]
                learning_rate: 0.001
                optimizer: {kind: m3, slow_period: 3}
              - name: fast
                chunk_size: 32
                width: 16
                layers: [15]
                learning_rate: 0.01
                retention: 0.99
            """
        let json = #"""
            {"levels": [{"name": "mid", "chunk_size": 256, "layers": [14, 15], "learning_rate": 0.001,
                         "optimizer": {"kind": "m3", "slow_period": 3}},
                        {"name": "fast", "chunk_size": 32, "width": 16, "layers": [15], "learning_rate": 0.01, "retention": 0.99}]}
            """#
        try Data(yaml.utf8).write(to: URL(fileURLWithPath: dir + "/levels.yaml"))
        try Data(json.utf8).write(to: URL(fileURLWithPath: dir + "/levels.json"))
        let fromYAML = try LevelConfiguration.load(path: dir + "/levels.yaml")
        #expect(fromYAML == (try LevelConfiguration.load(path: dir + "/levels.json")))
        #expect(fromYAML.levels[0].optimizer.kind == .m3 && fromYAML.levels[1].width == 16)
        // Validation applies to YAML too.
        try Data("levels:\n  - {name: a, chunk_size: 0, layers: [1]}\n".utf8).write(to: URL(fileURLWithPath: dir + "/bad.yml"))
        let error = #expect(throws: LevelConfiguration.Invalid.self) { try LevelConfiguration.load(path: dir + "/bad.yml") }
        #expect(error?.description.contains("chunk_size") == true && error?.description.hasPrefix(dir + "/bad.yml") == true)
    }

    @Test("a configuration file that does not parse names the file")
    func loadErrors() throws {
        let path = NSTemporaryDirectory() + "levels-\(UUID().uuidString).json"
        try Data(#"{"levels": 3}"#.utf8).write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let error = #expect(throws: LevelConfiguration.Invalid.self) { try LevelConfiguration.load(path: path) }
        #expect(error?.description.hasPrefix(path) == true)
    }
}

@Suite("Forward with levels")
struct LevelForwardTests {
    @Test("a block computes h + down(silu(gate·u) ⊙ up·u), u = RMSNorm(h)·gain")
    func blockNumerics() throws {
        let model = try LlamaConfiguration(hiddenSize: 16, intermediateSize: 32, numHiddenLayers: 2, numAttentionHeads: 2,
                                           numKeyValueHeads: 1, rmsNormEps: 1e-5, vocabSize: 10)
        let config = try LevelConfiguration(levels: [.init(name: "fast", chunkSize: 4, width: 4, layers: [1], learningRate: 1e-3)])
        let s = try LevelState(configuration: config, model: model)
        perturb(s, seed: 3, scale: 0.5)
        s.blocks[0][0].gain = (0..<16).map { 0.5 + Float($0) / 16 }
        var rng = SeededGenerator(seed: 9)
        let h0 = (0..<(3 * 16)).map { _ in Float(rng.next() % 2001) / 1000 - 1 }
        var h = h0
        #expect(!s.adapts(layer: 0) && s.adapts(layer: 1))
        s.apply(layer: 1, hidden: &h, rows: 3)
        let b = s.blocks[0][0]
        for t in 0..<3 {
            let row = (0..<16).map { Double(h0[t * 16 + $0]) }
            let rms = (row.map { $0 * $0 }.reduce(0, +) / 16 + 1e-5).squareRoot()
            let u = (0..<16).map { row[$0] / rms * Double(b.gain[$0]) }
            let hidden = (0..<4).map { r -> Double in
                let a = (0..<16).reduce(0.0) { $0 + Double(b.gate[r * 16 + $1]) * u[$1] }
                let g = (0..<16).reduce(0.0) { $0 + Double(b.up[r * 16 + $1]) * u[$1] }
                return a / (1 + exp(-a)) * g
            }
            for i in 0..<16 {
                let expected = row[i] + (0..<4).reduce(0.0) { $0 + Double(b.down[i * 4 + $1]) * hidden[$1] }
                #expect(abs(Double(h[t * 16 + i]) - expected) < 1e-5)
            }
        }
    }

    @Test("all-zero levels give the backbone's logits bit for bit, next to another user's levels in one batch")
    func isolation() throws {
        let model = try Fixtures.tinyLlama()
        let config = LevelConfiguration.defaults(layers: model.configuration.numHiddenLayers)
        let fresh = try LevelState(configuration: config, model: model.configuration)
        let learned = try LevelState(configuration: config, model: model.configuration)
        perturb(learned, seed: 7)
        let a = model.tokenizer.encode("My name is")
        let b = model.tokenizer.encode("The weather today")
        // Prefill and three decode steps, batched: A with fresh levels or none,
        // B with learned levels or none.
        func run(_ adapterA: LevelState?, _ adapterB: LevelState?) throws -> [[Float]] {
            let ca = model.makeCache(), cb = model.makeCache()
            var steps = [LlamaModel.Step(tokens: a, cache: ca, adapter: adapterA),
                         LlamaModel.Step(tokens: b, cache: cb, adapter: adapterB)]
            var outputs: [[Float]] = []
            for _ in 0..<4 {
                let logits = try model.forward(steps)
                outputs += logits
                for i in steps.indices { steps[i].tokens = [Sampler.argmax(logits[i])] }
            }
            return outputs
        }
        let withFresh = try run(fresh, learned)
        let bare = try run(nil, learned)
        for i in stride(from: 0, to: withFresh.count, by: 2) {
            #expect(withFresh[i] == bare[i], "user A's logits at step \(i / 2) differ from the backbone's")
            #expect(withFresh[i + 1] == bare[i + 1])
        }
        // B's learned levels do change B's model.
        let bBare = try run(nil, nil)
        #expect(withFresh[1] != bBare[1])
        #expect(withFresh[0] == bBare[0])
    }

    // On the tiny Llama, whose F32 products run each sequence on its own:
    // what is checked here is that levels, caches and attention keep users
    // apart. That the backbone's Q4_1 kernels give a vector the same bits in
    // any batch is EngineTests' `batchQuantised`, on the real backbone.
    @Test("a user's logits batched with another user's are the logits it gets alone, bit for bit (short and long prompts)")
    func isolationAlone() throws {
        let model = try Fixtures.tinyLlama()
        let config = LevelConfiguration.defaults(layers: model.configuration.numHiddenLayers)
        let fresh = try LevelState(configuration: config, model: model.configuration)
        let learned = try LevelState(configuration: config, model: model.configuration)
        perturb(learned, seed: 11)
        // The long prompt: a question repeated past the prefill paths' thresholds (they depend on the CPU).
        let question = "What is the name of the dog that I walked by the river this morning, and where did it go?"
        var longQuestion = question
        while model.tokenizer.encode(longQuestion).count < Fixtures.prefillRows(model) { longQuestion += " " + question }
        for (text, long) in [("What is", false), (longQuestion, true)] {
            let q = model.tokenizer.encode(text)
            // One prompt below the prefill paths' threshold, one above it.
            #expect((q.count >= Fixtures.prefillRows(model)) == long, "\(q.count) tokens")
            let both = try model.forward([LlamaModel.Step(tokens: q, cache: model.makeCache(), adapter: learned),
                                          LlamaModel.Step(tokens: q, cache: model.makeCache(), adapter: fresh)])
            let alone = try model.forward(tokens: q, cache: model.makeCache())
            let aloneFresh = try model.forward([LlamaModel.Step(tokens: q, cache: model.makeCache(), adapter: fresh)])
            #expect(aloneFresh[0] == alone, "fresh levels alone differ from the backbone (\(q.count) tokens)")
            #expect(both[1] == alone, "batched with another user: max |Δ| \(zip(both[1], alone).map { abs($0 - $1) }.max() ?? 0) (\(q.count) tokens)")
        }
        // Decoding after a long context (attention split into parts): alone or batched, the same bits.
        let long = Array(model.tokenizer.encode(String(repeating: "The river runs past the old mill and on to the sea. ", count: 40))
            .prefix(model.configuration.maxPositionEmbeddings - 1))
        #expect(long.count + 1 >= 2 * 128, "the decode step sees enough positions for attention in parts")
        let cTaught = model.makeCache(), cFresh = model.makeCache(), cAlone = model.makeCache()
        _ = try model.forward([LlamaModel.Step(tokens: long, cache: cTaught, adapter: learned)])
        _ = try model.forward([LlamaModel.Step(tokens: long, cache: cFresh, adapter: fresh)])
        _ = try model.forward(tokens: long, cache: cAlone)
        let next = [long[1]]
        let both = try model.forward([LlamaModel.Step(tokens: next, cache: cTaught, adapter: learned),
                                      LlamaModel.Step(tokens: next, cache: cFresh, adapter: fresh)])
        let alone = try model.forward(tokens: next, cache: cAlone)
        #expect(both[1] == alone, "decode after \(long.count) tokens, batched: max |Δ| \(zip(both[1], alone).map { abs($0 - $1) }.max() ?? 0)")
    }
}

@Suite("Level backward")
struct LevelBackwardTests {
    /// A block's parameters in Double.
    struct DoubleBlock {
        var gain, gate, up, down: [Double]
        init(_ b: LevelState.Block) {
            gain = b.gain.map(Double.init)
            gate = b.gate.map(Double.init)
            up = b.up.map(Double.init)
            down = b.down.map(Double.init)
        }
    }

    /// Σ c ⊙ (the chained blocks' output for input h), all in Double.
    static func loss(_ blocks: [DoubleBlock], widths: [Int], h: [Double], c: [Float], rows t: Int, d: Int) -> Double {
        var h = h
        for (b, r) in zip(blocks, widths) {
            var out = h
            for row in 0..<t {
                let x = Array(h[(row * d)..<((row + 1) * d)])
                let rms = (x.map { $0 * $0 }.reduce(0, +) / Double(d) + 1e-5).squareRoot()
                let u = (0..<d).map { x[$0] / rms * b.gain[$0] }
                let s = (0..<r).map { j -> Double in
                    let a = (0..<d).reduce(0.0) { $0 + b.gate[j * d + $1] * u[$1] }
                    let g = (0..<d).reduce(0.0) { $0 + b.up[j * d + $1] * u[$1] }
                    return a / (1 + exp(-a)) * g
                }
                for i in 0..<d { out[row * d + i] += (0..<r).reduce(0.0) { $0 + b.down[i * r + $1] * s[$1] } }
            }
            h = out
        }
        return zip(h, c).reduce(0.0) { $0 + $1.0 * Double($1.1) }
    }

    @Test("gradients of two chained levels match finite differences in Float64")
    func finiteDifferences() throws {
        let d = 8, t = 3
        let model = try LlamaConfiguration(hiddenSize: d, intermediateSize: 16, numHiddenLayers: 2, numAttentionHeads: 2,
                                           numKeyValueHeads: 1, rmsNormEps: 1e-5, vocabSize: 10)
        let config = try LevelConfiguration(levels: [
            .init(name: "mid", chunkSize: 8, width: 3, layers: [1], learningRate: 1e-3),
            .init(name: "fast", chunkSize: 2, width: 2, layers: [0, 1], learningRate: 1e-3),
        ])
        let s = try LevelState(configuration: config, model: model)
        perturb(s, seed: 5, scale: 0.5)
        s.blocks[0][0].gain = (0..<d).map { 0.8 + Float($0) / 20 }
        var rng = SeededGenerator(seed: 6)
        func draw(_ n: Int) -> [Float] { (0..<n).map { _ in Float(rng.next() % 2001) / 1000 - 1 } }
        let hin = draw(t * d), c = draw(t * d)    // loss = Σ c ⊙ h_out
        var dh = c
        var grads = s.zeroGradients()
        s.backward(layer: 1, hiddenIn: hin, rows: t, dHidden: &dh, gradients: &grads)

        // Layer 1 holds mid's only block and fast's second one, in that order.
        let chain = [DoubleBlock(s.blocks[0][0]), DoubleBlock(s.blocks[1][1])], widths = [3, 2]
        let hd = hin.map(Double.init)
        #expect(maxRelativeError(dh, numericGradient(hd) { Self.loss(chain, widths: widths, h: $0, c: c, rows: t, d: d) }) < 1e-4,
                "dL/dh_in")
        typealias Path = WritableKeyPath<DoubleBlock, [Double]>
        let tensors: [(String, Path, WritableKeyPath<LevelState.Block, [Float]>)] = [
            ("gain", \.gain, \.gain), ("gate", \.gate, \.gate), ("up", \.up, \.up), ("down", \.down, \.down)]
        for (k, (li, bi)) in [(0, 0), (1, 1)].enumerated() {
            for (name, path, ours) in tensors {
                let numeric = numericGradient(chain[k][keyPath: path]) { values in
                    var blocks = chain
                    blocks[k][keyPath: path] = values
                    return Self.loss(blocks, widths: widths, h: hd, c: c, rows: t, d: d)
                }
                #expect(maxRelativeError(grads[li][bi][keyPath: ours], numeric) < 1e-4, "\(config.levels[li].name).\(name)")
            }
        }
        // The fast level's block at layer 0 is untouched by layer 1's backward.
        #expect(grads[1][0].down.allSatisfy { $0 == 0 })
    }
}

@Suite("Level gradients through the backbone")
struct LevelAutogradTests {
    @Test("loss and every level gradient match PyTorch autograd on a tiny Llama")
    func autograd() throws {
        let fixture = try Fixtures.json("MemoryTests/Fixtures/level-gradients.json")
        let model = try Fixtures.tinyLlama()
        let levels = try #require(fixture["levels"] as? [[String: Any]]).map {
            LevelConfiguration.Level(name: $0["name"] as! String, chunkSize: $0["chunk_size"] as! Int,
                                     width: $0["width"] as! Int, layers: $0["layers"] as! [Int], learningRate: 1e-3)
        }
        let state = try LevelState(configuration: try LevelConfiguration(levels: levels), model: model.configuration)
        let params = try #require(fixture["params"] as? [[[String: [Double]]]])
        let expected = try #require(fixture["gradients"] as? [[[String: [Double]]]])
        for (li, blocks) in params.enumerated() {
            for (bi, p) in blocks.enumerated() {
                state.blocks[li][bi] = LevelState.Block(gain: p["gain"]!.map(Float.init), gate: p["gate"]!.map(Float.init),
                                                        up: p["up"]!.map(Float.init), down: p["down"]!.map(Float.init))
            }
        }
        let tokens = try #require(fixture["tokens"] as? [Int])
        let learnable = try #require(fixture["learnable"] as? [Bool])
        let result = try LevelTrainer(model: model).lossAndGradients(tokens: tokens, learnable: learnable, state: state)
        #expect(result.count == fixture["count"] as! Int)
        let loss = fixture["loss"] as! Double
        #expect(abs(result.totalLoss / Double(result.count) - loss) < 1e-5 * loss, "ours \(result.totalLoss / Double(result.count)), PyTorch \(loss)")
        typealias Path = KeyPath<LevelState.Block, [Float]>
        for (li, blocks) in expected.enumerated() {
            for (bi, g) in blocks.enumerated() {
                for (name, path) in [("gain", \LevelState.Block.gain), ("gate", \.gate), ("up", \.up), ("down", \.down)] as [(String, Path)] {
                    let err = maxRelativeError(result.gradients[li][bi][keyPath: path], g[name]!)
                    print("level gradient \(levels[li].name)[\(bi)].\(name): max |Δ| / max |g| = \(err)")
                    #expect(err < 1e-4, "\(levels[li].name) block \(bi) \(name)")
                }
            }
        }
    }
}

@Suite("Learning through the backbone")
struct LevelLearningTests {
    @Test("a gradient step on a user's text lowers that text's loss, starting from the backbone")
    func gradientStepLowersLoss() throws {
        let model = try Fixtures.tinyLlama()
        let state = try LevelState(configuration: LevelConfiguration.defaults(layers: model.configuration.numHiddenLayers),
                                   model: model.configuration)
        let tokens = model.tokenizer.encode("My sister Ottilie Brannagh lives in Quarrendon and keeps eleven ferrets named after rivers.")
        let learnable = [Bool](repeating: true, count: tokens.count)
        let trainer = LevelTrainer(model: model)
        let before = try trainer.lossAndGradients(tokens: tokens, learnable: learnable, state: state)
        // A fresh state is the backbone: its loss is the backbone's.
        let bare = try model.perplexity(tokens: tokens)
        #expect(abs(before.totalLoss - bare.totalNLL) < 1e-3 * bare.totalNLL)
        // Output projections start at zero, and still get gradients.
        #expect(before.gradients.joined().contains { $0.down.contains { $0 != 0 } })
        #expect(before.gradients.joined().allSatisfy { $0.down.allSatisfy(\.isFinite) && $0.gate.allSatisfy(\.isFinite) })
        for li in state.blocks.indices {
            for bi in state.blocks[li].indices {
                let g = before.gradients[li][bi]
                state.blocks[li][bi].down = zip(state.blocks[li][bi].down, g.down).map { $0 - 0.5 * $1 }
            }
        }
        let after = try trainer.lossAndGradients(tokens: tokens, learnable: learnable, state: state)
        print("mean loss before \(before.totalLoss / Double(before.count)), after one step \(after.totalLoss / Double(after.count))")
        #expect(after.totalLoss < before.totalLoss)
    }
}

@Suite("Consolidation")
struct ConsolidationTests {
    @Test("a budget beyond the model's positions, or negative, is refused instead of trapping")
    func budgetBounds() throws {
        let learner = try Tiny.learner([.init(name: "mid", chunkSize: 8, width: 2, layers: [1], learningRate: 1e-2),
                                        .init(name: "fast", chunkSize: 4, width: 2, layers: [1], learningRate: 1e-2)])
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(1..<6))
        for budget in [ConsolidationBudget(steps: 1, generatedTokens: 255), ConsolidationBudget(steps: -1, generatedTokens: 1),
                       ConsolidationBudget(steps: 1, generatedTokens: -1)] {
            #expect(throws: LevelConfiguration.Invalid.self) { try learner.consolidate(contexts: learner.recentTokens, budget: budget) }
        }
        let report = try learner.consolidate(contexts: learner.recentTokens, budget: ConsolidationBudget(steps: 1, generatedTokens: 254))
        // The longest texts (the recent context's last token and up to 254 generated ones) fit the model's 256 positions.
        #expect(report.steps == 1 && report.positions > 0 && report.positions <= 255)
    }

    @Test("transplant: into an unused mid the write is exact (same logits without fast); fast cleared; written units' moments zero")
    func transplantExact() throws {
        // mid never updates (its chunk is never reached): the write lands in unused units with gains 1.
        let learner = try Tiny.learner([.init(name: "mid", chunkSize: 1_000_000, width: 4, layers: [0, 1], learningRate: 1e-2),
                                        .init(name: "fast", chunkSize: 4, width: 2, layers: [0, 1], learningRate: 3e-2)])
        for _ in 0..<3 { try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(1..<30)) }
        #expect(learner.updatesApplied[0] == 0 && learner.updatesApplied[1] > 0)
        let model = learner.trainer.model
        let before = try model.forward([LlamaModel.Step(tokens: Tiny.tokens, cache: model.makeCache(), adapter: learner.state)])[0]
        let fastBlocks = learner.state.blocks[1]
        let report = try learner.consolidate(contexts: learner.recentTokens, level: 1, into: 0,
                                             budget: ConsolidationBudget(steps: 0, generatedTokens: 0), transplant: true)
        print("transplant into an unused mid: KL \(report.klBefore) → \(report.klAfter)")
        #expect(report.steps == 0 && report.klBefore > 0, "the fast level held something")
        #expect(report.klAfter <= 1e-3 * report.klBefore, "KL after the write \(report.klAfter)")
        #expect(learner.state.blocks[1].allSatisfy { $0.down.allSatisfy { $0 == 0 } }, "fast is cleared")
        let after = try model.forward([LlamaModel.Step(tokens: Tiny.tokens, cache: model.makeCache(), adapter: learner.state)])[0]
        let scale = before.map(abs).max()!
        #expect(zip(before, after).map { abs($0 - $1) }.max()! <= 1e-4 * scale)
        // Fast's two units sit in two of mid's four, in every layer; mid's other units are untouched (still unused).
        for (b, fast) in fastBlocks.enumerated() {
            let mid = learner.state.blocks[0][b], d = learner.state.hiddenSize
            let used = (0..<4).filter { j in (0..<d).contains { mid.down[$0 * 4 + j] != 0 } }
            #expect(used.count == 2)
            for j in 0..<2 {
                let column = (0..<d).map { fast.down[$0 * 2 + j] }
                #expect(used.contains { u in (0..<d).map { mid.down[$0 * 4 + u] } == column })
            }
            // Adam's moments of the written rows start at zero (mid had none: still zero everywhere).
            #expect(learner.moments[0][b].allSatisfy { $0.first.allSatisfy { $0 == 0 } })
        }
        #expect(learner.consolidations == 1 && learner.accumulatedTokens[1] == 0)
    }

    @Test("transplant: into a used mid, fast's unit replaces mid's weakest one, its inputs rescaled to mid's gains, its moments zeroed")
    func transplantReplacesWeakest() throws {
        let learner = try Tiny.learner([.init(name: "mid", chunkSize: 4, width: 2, layers: [1], learningRate: 1e-2),
                                        .init(name: "fast", chunkSize: 4, width: 1, layers: [1], learningRate: 3e-2)])
        for _ in 0..<2 { try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(1..<30)) }
        #expect(learner.updatesApplied[0] > 0 && learner.updatesApplied[1] > 0)
        let source = learner.state, d = source.hiddenSize
        // Make mid's unit 1 clearly the weaker one.
        source.blocks[0][0].down = source.blocks[0][0].down.enumerated().map { $0.offset % 2 == 1 ? $0.element * 1e-3 : $0.element }
        let mid = source.blocks[0][0], fast = source.blocks[1][0]
        var moments = learner.moments[0]
        #expect(moments[0][3].first.contains { $0 != 0 }, "mid has moments to clear")
        let student = try LevelState(configuration: source.configuration, model: learner.trainer.model.configuration)
        student.blocks = source.blocks
        #expect(LevelLearner.transplant(source, from: 1, into: student, level: 0, moments: &moments) == 1)
        let written = student.blocks[0][0]
        for i in 0..<d {
            #expect(written.down[i * 2] == mid.down[i * 2], "the stronger unit is kept")
            #expect(written.down[i * 2 + 1] == fast.down[i], "fast's unit is written over the weaker one")
            let gate = fast.gate[i] * fast.gain[i] / mid.gain[i], up = fast.up[i] * fast.gain[i] / mid.gain[i]
            #expect(abs(written.gate[d + i] - gate) <= 1e-6 * max(1, abs(gate)) && abs(written.up[d + i] - up) <= 1e-6 * max(1, abs(up)))
            #expect(written.gate[i] == mid.gate[i] && written.up[i] == mid.up[i])
        }
        // [gain, gate, up, down]: the written row of gate and up, and column of down, have zero moments; the rest are kept.
        for t in [1, 2] {
            #expect(moments[0][t].first[d..<(2 * d)].allSatisfy { $0 == 0 } && moments[0][t].second[d..<(2 * d)].allSatisfy { $0 == 0 })
            #expect(Array(moments[0][t].first[0..<d]) == Array(learner.moments[0][0][t].first[0..<d]))
        }
        #expect((0..<d).allSatisfy { moments[0][3].first[$0 * 2 + 1] == 0 && moments[0][3].first[$0 * 2] == learner.moments[0][0][3].first[$0 * 2] })
        #expect(moments[0][0] == learner.moments[0][0][0], "the gain's moments are kept")
    }

    @Test("transplant: mid keeps the strongest units of both; a fast unit weaker than mid's weakest is not written")
    func transplantKeepsStronger() throws {
        let learner = try Tiny.learner([.init(name: "mid", chunkSize: 4, width: 2, layers: [1], learningRate: 1e-2),
                                        .init(name: "fast", chunkSize: 4, width: 2, layers: [1], learningRate: 3e-2)])
        for _ in 0..<2 { try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(1..<30)) }
        let source = learner.state, d = source.hiddenSize
        func strength(_ b: LevelState.Block, _ j: Int, gains: [Float]) -> Float {
            let down = (0..<d).reduce(Float(0)) { $0 + b.down[$1 * 2 + j] * b.down[$1 * 2 + j] }
            let up = (0..<d).reduce(Float(0)) { $0 + pow(b.up[j * d + $1] * gains[$1], 2) }
            return (down * up).squareRoot()
        }
        let mid = source.blocks[0][0], ones = [Float](repeating: 1, count: d)
        let ratio = (0..<d).map { source.blocks[1][0].gain[$0] / mid.gain[$0] }
        let midWeakest = min(strength(mid, 0, gains: ones), strength(mid, 1, gains: ones))
        // Fast's unit 0 ten times mid's weakest, unit 1 a thousandth of it (down columns rescaled to set the strengths).
        for (j, target) in [(0, 10 * midWeakest), (1, 1e-3 * midWeakest)] {
            let s = target / strength(source.blocks[1][0], j, gains: ratio)
            for i in 0..<d { source.blocks[1][0].down[i * 2 + j] *= s }
        }
        let fast = source.blocks[1][0]
        let student = try LevelState(configuration: source.configuration, model: learner.trainer.model.configuration)
        student.blocks = source.blocks
        var moments = learner.moments[0]
        #expect(LevelLearner.transplant(source, from: 1, into: student, level: 0, moments: &moments) == 1)
        let written = student.blocks[0][0]
        let weak = strength(mid, 0, gains: ones) < strength(mid, 1, gains: ones) ? 0 : 1
        for i in 0..<d {
            #expect(written.down[i * 2 + weak] == fast.down[i * 2], "the strong fast unit replaces mid's weaker one")
            #expect(written.down[i * 2 + (1 - weak)] == mid.down[i * 2 + (1 - weak)], "mid's stronger unit is kept over the weak fast one")
        }
        // Nothing stronger than mid's units: nothing written, mid unchanged.
        for i in 0..<d { source.blocks[1][0].down[i * 2] *= 1e-6 }
        let again = try LevelState(configuration: source.configuration, model: learner.trainer.model.configuration)
        again.blocks = learner.state.blocks
        again.blocks[0] = [mid]
        #expect(LevelLearner.transplant(source, from: 1, into: again, level: 0, moments: &moments) == 0)
        #expect(again.blocks[0][0] == mid)
    }

    @Test("sleep moves a fact from the fast level into mid and clears fast")
    func consolidate() throws {
        let model = try Fixtures.backbone()
        let upper = Array(15..<30)
        let config = try LevelConfiguration(levels: [
            .init(name: "mid", chunkSize: 1_000_000, width: 32, layers: upper, learningRate: 1e-3),
            .init(name: "fast", chunkSize: 16, width: 32, layers: upper, learningRate: 3e-3),
        ])
        let learner = try LevelLearner(state: try LevelState(configuration: config, model: model.configuration), model: model)
        let fact = model.tokenizer.encode("My sister's name is Ottilie Brannagh. Ottilie Brannagh lives in Quarrendon.")
        var mask = [Bool](repeating: true, count: fact.count)
        mask[0] = false
        for _ in 0..<3 { try learner.learn(tokens: fact, learnable: mask) }
        #expect(learner.updatesApplied[0] == 0 && learner.updatesApplied[1] > 0)
        let trainer = learner.trainer
        let bare = try trainer.loss(tokens: fact, learnable: mask, state: nil).total
        let taught = try trainer.loss(tokens: fact, learnable: mask, state: learner.state).total
        #expect(taught < bare)
        let report = try learner.consolidate(contexts: [fact], budget: ConsolidationBudget(steps: 12, generatedTokens: 16))
        print("consolidation: KL \(report.klBefore) → \(report.klAfter); loss bare \(bare), taught \(taught), consolidated \(try trainer.loss(tokens: fact, learnable: mask, state: learner.state).total)")
        #expect(report.klAfter < report.klBefore)
        #expect(learner.state.blocks[1].allSatisfy { $0.down.allSatisfy { $0 == 0 } }, "fast is cleared")
        #expect(learner.accumulatedTokens[1] == 0 && learner.consolidations == 1)
        let consolidated = try trainer.loss(tokens: fact, learnable: mask, state: learner.state).total
        #expect(consolidated < bare, "mid now holds part of the fact")
        let restored = try LevelStateFile.decode(try LevelStateFile.encode(learner, backbone: model.fingerprint), model: model)
        #expect(restored.consolidations == 1 && restored.state.blocks == learner.state.blocks)
    }
}
