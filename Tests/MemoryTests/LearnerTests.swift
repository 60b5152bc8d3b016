// The CMS update rule: counters, chunk boundaries, chunk-start gradients,
// optimizers and guards, on the tiny Llama fixture.
import Foundation
import Testing
@testable import Memory
@testable import Model

enum Tiny {
    static let model: Result<LlamaModel, Error> = Result {
        try LlamaModel.load(path: URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../ModelTests/Fixtures/tiny-llama").standardized.path)
    }
    static let tokens = Array(0..<40).map { ($0 * 37 + 11) % 400 }

    static func learner(_ levels: [LevelConfiguration.Level]) throws -> LevelLearner {
        let m = try model.get()
        let state = try LevelState(configuration: try LevelConfiguration(levels: levels), model: m.configuration)
        return try LevelLearner(state: state, model: m)
    }

    static func mask(_ positions: Range<Int>) -> [Bool] {
        (0..<tokens.count).map { positions.contains($0) }
    }
}

@Suite("CMS learner")
struct LearnerTests {
    @Test("AdamW and SGD steps follow their definitions")
    func optimizerSteps() {
        var adam = LevelConfiguration.Optimizer(kind: .adamw)
        adam.weightDecay = 0.1
        var m = OptimizerMoments(count: 2)
        let p = adam.step(params: [1, -2], gradient: [0.5, -0.25], learningRate: 0.01, moments: &m)
        // First step: m̂ = g, v̂ = g², so the step is lr·(sign(g)·g/(|g|+ε) + wd·p).
        #expect(abs(p[0] - (1 - 0.01 * (0.5 / (0.5 + 1e-8) + 0.1 * 1))) < 1e-6)
        #expect(abs(p[1] - (-2 - 0.01 * (-0.25 / (0.25 + 1e-8) + 0.1 * -2))) < 1e-6)
        var sgd = LevelConfiguration.Optimizer(kind: .sgd)
        sgd.beta1 = 0.5
        var ms = OptimizerMoments(count: 1)
        let s1 = sgd.step(params: [1], gradient: [2], learningRate: 0.1, moments: &ms)   // m = 2
        let s2 = sgd.step(params: s1, gradient: [2], learningRate: 0.1, moments: &ms)    // m = 3
        #expect(abs(s1[0] - 0.8) < 1e-6 && abs(s2[0] - 0.5) < 1e-6)
    }

    @Test("counters, boundaries inside and across requests, and short requests")
    func scheduling() throws {
        let learner = try Tiny.learner([
            .init(name: "mid", chunkSize: 8, width: 4, layers: [1], learningRate: 1e-2),
            .init(name: "fast", chunkSize: 4, width: 4, layers: [0, 1], learningRate: 1e-2),
        ])
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(1..<11))   // 10 targets
        #expect(learner.tokenCounters == [10, 10])
        #expect(learner.updatesApplied == [1, 2])
        #expect(learner.accumulatedTokens == [2, 2])
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(20..<23))  // 3 more: fast crosses 12
        #expect(learner.tokenCounters == [13, 13])
        #expect(learner.updatesApplied == [1, 3])
        #expect(learner.accumulatedTokens == [5, 1])
        // Requests shorter than a chunk accumulate until the boundary.
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(5..<7))
        #expect(learner.updatesApplied == [1, 3] && learner.accumulatedTokens == [7, 3])
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(30..<31))
        #expect(learner.updatesApplied == [2, 4] && learner.accumulatedTokens == [0, 0])
        #expect(learner.updatesRejected == [0, 0])
    }

    @Test("an update applies the chunk's gradient taken at the chunk-start weights")
    func chunkStartWeights() throws {
        let level = LevelConfiguration.Level(name: "fast", chunkSize: 6, width: 4, layers: [0, 1], learningRate: 1e-2,
                                             gradientClip: 0)
        let learner = try Tiny.learner([level])
        let start = learner.state.blocks
        // Two requests, 2 + 4 targets: one update at the boundary.
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(3..<5))
        #expect(learner.state.blocks == start)
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(10..<14))
        // By hand: both pieces' gradients at the start weights, averaged, one AdamW step.
        let reference = try Tiny.learner([level])
        let a = try reference.trainer.lossAndGradients(tokens: Tiny.tokens, learnable: Tiny.mask(3..<5), state: reference.state)
        let b = try reference.trainer.lossAndGradients(tokens: Tiny.tokens, learnable: Tiny.mask(10..<14), state: reference.state)
        for bi in start[0].indices {
            var m = OptimizerMoments(count: start[0][bi].down.count)
            let g = zip(a.gradients[0][bi].down, b.gradients[0][bi].down).map { (2 * $0 + 4 * $1) / 6 }
            let expected = level.optimizer.step(params: start[0][bi].down, gradient: g, learningRate: 1e-2, moments: &m)
            let err = zip(expected, learner.state.blocks[0][bi].down).map { abs($0 - $1) }.max()!
            #expect(err < 1e-6, "block \(bi): max |Δ| \(err)")
        }
    }

    @Test("a step with a non-finite value is rejected and the last good state kept")
    func nanGuard() throws {
        let learner = try Tiny.learner([.init(name: "fast", chunkSize: 4, width: 4, layers: [1], learningRate: 1e-2)])
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(1..<5))
        let good = learner.state.blocks
        var poisoned = learner.state.zeroGradients()[0]
        poisoned[0].gate[3] = .nan
        learner.setAccumulator(level: 0, to: poisoned, tokens: 4)
        learner.applyUpdate(level: 0)
        #expect(learner.state.blocks == good)
        #expect(learner.updatesRejected == [1] && learner.updatesApplied == [1])
        // Learning goes on afterwards.
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(5..<9))
        #expect(learner.updatesApplied == [2] && learner.state.blocks != good)
    }

    @Test("the norm bound rejects a step; clipping bounds the gradient")
    func normGuards() throws {
        var bounded = LevelConfiguration.Level(name: "fast", chunkSize: 4, width: 4, layers: [1], learningRate: 1e-2)
        bounded.maxNorm = 1e-6
        let learner = try Tiny.learner([bounded])
        let start = learner.state.blocks
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(1..<5))
        #expect(learner.state.blocks == start && learner.updatesRejected == [1])
        // Plain SGD (no momentum), lr 1: the change equals the clipped gradient, of norm `gradientClip`.
        var clipped = LevelConfiguration.Level(name: "fast", chunkSize: 4, width: 4, layers: [1], learningRate: 1,
                                               gradientClip: 1e-3)
        clipped.optimizer = .init(kind: .sgd)
        clipped.optimizer.beta1 = 0
        let sgd = try Tiny.learner([clipped])
        let before = sgd.state.blocks[0][0]
        try sgd.learn(tokens: Tiny.tokens, learnable: Tiny.mask(1..<5))
        let after = sgd.state.blocks[0][0]
        let was: [Float] = before.gain + before.gate + before.up + before.down
        let now: [Float] = after.gain + after.gate + after.up + after.down
        var sum = 0.0
        for (x, y) in zip(was, now) { sum += Double(x - y) * Double(x - y) }
        let change = sum.squareRoot()
        #expect(abs(change - 1e-3) < 1e-5, "step norm \(change)")
    }

    @Test("M3 is refused until it is implemented")
    func m3Refused() throws {
        var level = LevelConfiguration.Level(name: "m", chunkSize: 4, width: 4, layers: [1], learningRate: 1e-2)
        level.optimizer = .init(kind: .m3)
        #expect(throws: LevelLearner.Unsupported.self) { try Tiny.learner([level]) }
    }
}
