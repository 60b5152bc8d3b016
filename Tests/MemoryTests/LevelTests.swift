// Continuum memory levels: configuration, and the forward pass with levels.
import Foundation
import Testing
import Tensor
@testable import Memory
@testable import Model

enum Backbone {
    static let loaded: Result<LlamaModel, Error> = Result { try LlamaModel.load(path: DefaultModel.path) }

    static func get() throws -> LlamaModel {
        guard FileManager.default.fileExists(atPath: DefaultModel.path) else {
            Issue.record("The default model is missing at \(DefaultModel.path): run `continuum fetch-model` first.")
            throw CancellationError()
        }
        return try loaded.get()
    }
}

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
    ])
    func invalid(json: String, mentions: String) {
        let error = #expect(throws: LevelConfiguration.Invalid.self) {
            try JSONDecoder().decode(LevelConfiguration.self, from: Data(json.utf8))
        }
        #expect(error?.description.contains(mentions) == true, "\(String(describing: error))")
    }

    @Test("layers beyond the backbone are refused")
    func layersOutOfRange() throws {
        let c = LevelConfiguration.starting(layers: 30)
        try c.validate(layers: 30)
        #expect(throws: LevelConfiguration.Invalid.self) { try c.validate(layers: 12) }
        let model = try LlamaConfiguration(hiddenSize: 8, intermediateSize: 16, numHiddenLayers: 4, numAttentionHeads: 2,
                                           numKeyValueHeads: 1, vocabSize: 10)
        #expect(throws: LevelConfiguration.Invalid.self) { try LevelState(configuration: c, model: model) }
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
        let model = try Backbone.get()
        let config = LevelConfiguration.starting(layers: model.configuration.numHiddenLayers)
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
}
