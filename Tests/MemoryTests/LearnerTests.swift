// The CMS update rule: counters, chunk boundaries, chunk-start gradients,
// optimizers and guards, on the tiny Llama fixture.
import Foundation
import Testing
import TestSupport
import Tensor
@testable import Memory
@testable import Model

/// Tokens, masks and learners on the tiny Llama (loaded by TestSupport's `Fixtures`).
enum Tiny {
    static let tokens = Array(0..<40).map { ($0 * 37 + 11) % 400 }

    static func learner(_ levels: [LevelConfiguration.Level]) throws -> LevelLearner {
        let m = try Fixtures.tinyLlama()
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
        let p = adam.step(params: [1, -2], gradient: [0.5, -0.25], rows: 1, cols: 2, learningRate: 0.01, moments: &m)
        // First step: m̂ = g, v̂ = g², so the step is lr·(sign(g)·g/(|g|+ε) + wd·p).
        #expect(abs(p[0] - (1 - 0.01 * (0.5 / (0.5 + 1e-8) + 0.1 * 1))) < 1e-6)
        #expect(abs(p[1] - (-2 - 0.01 * (-0.25 / (0.25 + 1e-8) + 0.1 * -2))) < 1e-6)
        var sgd = LevelConfiguration.Optimizer(kind: .sgd)
        sgd.beta1 = 0.5
        var ms = OptimizerMoments(count: 1)
        let s1 = sgd.step(params: [1], gradient: [2], rows: 1, cols: 1, learningRate: 0.1, moments: &ms)   // m = 2
        let s2 = sgd.step(params: s1, gradient: [2], rows: 1, cols: 1, learningRate: 0.1, moments: &ms)    // m = 3
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
        // An empty request changes nothing, and is not kept among the recent contexts.
        let recent = learner.recentTokens
        try learner.learn(tokens: [], learnable: [])
        #expect(learner.recentTokens == recent && recent.count == 4 && learner.tokenCounters == [16, 16])
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
            let expected = level.optimizer.step(params: start[0][bi].down, gradient: g, rows: start[0][bi].down.count / level.width, cols: level.width, learningRate: 1e-2, moments: &m)
            let err = zip(expected, learner.state.blocks[0][bi].down).map { abs($0 - $1) }.max()!
            #expect(err < 1e-6, "block \(bi): max |Δ| \(err)")
        }
    }

    @Test("streaming: a request's pieces equal the trainer's stream, piece by piece, with updates in between")
    func streamingPieces() throws {
        let levels: [LevelConfiguration.Level] = [
            .init(name: "mid", chunkSize: 100, width: 4, layers: [1], learningRate: 1e-2),
            .init(name: "fast", chunkSize: 5, width: 4, layers: [0, 1], learningRate: 1e-2, gradientClip: 0),
        ]
        let learner = try Tiny.learner(levels)
        let mask = Tiny.mask(3..<15)   // 12 targets: pieces of 5, 5 and 2
        try learner.learn(tokens: Tiny.tokens, learnable: mask)
        #expect(learner.updatesApplied == [0, 2] && learner.accumulatedTokens == [12, 2])
        // By hand: one stream, fast's update applied between the pieces.
        let byHand = try Tiny.learner(levels)
        let stream = try byHand.trainer.stream(tokens: Tiny.tokens, rows: 14, state: byHand.state)
        var mid = byHand.state.zeroGradients()[0]
        for piece in [Array(3..<8), Array(8..<13), [13, 14]] {
            let r = try byHand.trainer.lossAndGradients(stream, through: piece.last!, targets: piece, state: byHand.state,
                                                        minSurprise: 0, gradientContext: 512)
            #expect(stream.processed == piece.last!)
            mid = zip(mid, r.gradients[0]).map { a, g in
                LevelState.Block(tensors: zip(a.tensors, g.tensors).map { zip($0, $1).map { $0 + Float(piece.count) * $1 } })
            }
            byHand.setAccumulator(level: 1, to: r.gradients[1].map { g in LevelState.Block(tensors: g.tensors.map { $0.map { Float(piece.count) * $0 } }) },
                                  tokens: piece.count)
            if piece.count == 5 { byHand.applyUpdate(level: 1) }
        }
        #expect(byHand.state.blocks == learner.state.blocks)
        for (a, b) in zip(mid, learner.accumulators[0]) {
            for (x, y) in zip(a.tensors, b.tensors) {
                #expect(zip(x, y).allSatisfy { abs($0 - $1) <= 1e-6 * max(1, abs($0)) })
            }
        }
    }

    @Test("streaming: a request longer than contextWindow is learned as windows that share one token, each with its own cache")
    func streamingWindows() throws {
        let levels: [LevelConfiguration.Level] = [.init(name: "fast", chunkSize: 7, width: 4, layers: [1], learningRate: 1e-2)]
        let long = try Tiny.learner(levels)
        long.contextWindow = 12
        let mask = (0..<30).map { $0 % 5 != 0 }
        try long.learn(tokens: Array(Tiny.tokens.prefix(30)), learnable: mask)
        // The same as three requests: tokens 0..<12, 11..<23 and 22..<30.
        let parts = try Tiny.learner(levels)
        for (from, to) in [(0, 12), (11, 23), (22, 30)] {
            var m = Array(mask[from..<to])
            m[0] = false
            try parts.learn(tokens: Array(Tiny.tokens[from..<to]), learnable: m)
        }
        #expect(long.tokenCounters == parts.tokenCounters && long.updatesApplied == parts.updatesApplied)
        #expect(long.state.blocks == parts.state.blocks && long.accumulators == parts.accumulators)
        #expect(long.tokenCounters == [mask.dropFirst().filter { $0 }.count])
    }

    @Test("the recomputed-prefix semantics (kept for benchmarks) re-runs each piece's context from scratch")
    func recomputedPrefix() throws {
        let levels: [LevelConfiguration.Level] = [.init(name: "fast", chunkSize: 4, width: 4, layers: [0, 1], learningRate: 1e-2)]
        let learner = try Tiny.learner(levels)
        learner.semantics = .recomputedPrefix(context: 3)
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(5..<11))   // pieces 5..<9, 9..<11
        #expect(learner.updatesApplied == [1] && learner.accumulatedTokens == [2])
        // By hand: the first piece sees tokens 2..<9, the second (after the update) 6..<11.
        let byHand = try Tiny.learner(levels)
        let a = try byHand.trainer.lossAndGradients(tokens: Array(Tiny.tokens[2..<9]),
                                                    learnable: (2..<9).map { (5..<9).contains($0) }, state: byHand.state)
        byHand.setAccumulator(level: 0, to: a.gradients[0].map { LevelState.Block(tensors: $0.tensors.map { $0.map { 4 * $0 } }) }, tokens: 4)
        byHand.applyUpdate(level: 0)
        let b = try byHand.trainer.lossAndGradients(tokens: Array(Tiny.tokens[6..<11]),
                                                    learnable: (6..<11).map { (9..<11).contains($0) }, state: byHand.state)
        #expect(byHand.state.blocks == learner.state.blocks)
        for (x, y) in zip(b.gradients[0], learner.accumulators[0]) {
            for (p, q) in zip(x.tensors, y.tensors) { #expect(zip(p, q).allSatisfy { abs(2 * $0 - $1) <= 1e-6 * max(1, abs($1)) }) }
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
        #expect(learner.rejectedNonFinite == [1] && learner.rejectedNorm == [0])
        // Learning goes on afterwards.
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(5..<9))
        #expect(learner.updatesApplied == [2] && learner.state.blocks != good)
    }

    @Test("a non-finite gradient mid-chunk is not accumulated: the state stays storable and the chunk's update is rejected")
    func nonFiniteGradient() throws {
        let learner = try Tiny.learner([.init(name: "fast", chunkSize: 8, width: 4, layers: [1], learningRate: 1e-2)])
        // Gains and output projections so large that the level's forward overflows: its gradient is non-finite.
        let sane = learner.state.blocks
        learner.state.blocks[0][0].gain = learner.state.blocks[0][0].gain.map { _ in 1e38 }
        learner.state.blocks[0][0].down = learner.state.blocks[0][0].down.map { _ in 1e38 }
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(1..<4))   // 3 of 8: mid-chunk
        #expect(learner.nonFiniteChunk == [true] && learner.accumulatedTokens == [3])
        let finite = learner.accumulators.allSatisfy { level in level.allSatisfy { $0.isFinite } }
        #expect(finite)
        // Stored and read back mid-chunk: nothing refused, the mark kept.
        let model = try Fixtures.tinyLlama()
        let part = try LevelStateFile.encodeLearner(learner, backbone: model.fingerprint)
        let level = try LevelStateFile.encodeLevel(learner, level: 0, backbone: model.fingerprint)
        let back = try LevelStateFile.decode(levels: ["fast": level], learner: part, model: model,
                                             configuration: learner.state.configuration)
        #expect(back.nonFiniteChunk == [true])
        // The boundary rejects the chunk's update; the next chunk learns again.
        back.state.blocks = sane
        try back.learn(tokens: Tiny.tokens, learnable: Tiny.mask(4..<9))
        #expect(back.updatesRejected == [1] && back.rejectedNonFinite == [1] && back.updatesApplied == [0])
        #expect(back.nonFiniteChunk == [false] && back.accumulatedTokens == [0])
        try back.learn(tokens: Tiny.tokens, learnable: Tiny.mask(9..<17))
        #expect(back.updatesApplied == [1] && back.state.blocks != sane)
    }

    @Test("the norm bound rejects a step; clipping bounds the gradient")
    func normGuards() throws {
        var bounded = LevelConfiguration.Level(name: "fast", chunkSize: 4, width: 4, layers: [1], learningRate: 1e-2)
        bounded.maxNorm = 1e-6
        let learner = try Tiny.learner([bounded])
        let start = learner.state.blocks
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(1..<5))
        #expect(learner.state.blocks == start && learner.updatesRejected == [1])
        #expect(learner.rejectedNorm == [1] && learner.rejectedNonFinite == [0])
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

    @Test("M3 follows Nested Learning Alg. 1: accumulating momenta, Newton–Schulz directions, slow refresh every period")
    func m3Steps() {
        var m3 = LevelConfiguration.Optimizer(kind: .m3)
        m3.beta1 = 0.8
        m3.beta2 = 0.5
        m3.beta3 = 0.7
        m3.alpha = 0.3
        m3.slowPeriod = 2
        m3.epsilon = 1e-3
        let rows = 3, cols = 5, lr = 0.01
        var rng = SeededGenerator(seed: 5)
        func unit() -> Double { Double(rng.next() % 1_000_001) / 1_000_000 }
        var params = (0..<(rows * cols)).map { _ in Float(unit() - 0.5) }
        var moments = OptimizerMoments(count: params.count, kind: .m3)
        // The algorithm written out in Double.
        var theta = params.map(Double.init)
        var m1 = [Double](repeating: 0, count: theta.count), v = m1, m2 = m1, o2 = m1, sum = m1
        for t in 1...5 {
            let g = (0..<theta.count).map { _ in unit() - 0.5 }
            params = m3.step(params: params, gradient: g.map(Float.init), rows: rows, cols: cols, learningRate: lr,
                             moments: &moments)
            for i in g.indices { m1[i] += 0.8 * g[i]; v[i] += 0.5 * g[i] * g[i]; sum[i] += g[i] }
            let o1 = Reference.newtonSchulz(m1, rows: rows, cols: cols)
            for i in theta.indices { theta[i] -= lr * (o1[i] + 0.3 * o2[i]) / (v[i].squareRoot() + 1e-3) }
            if t % 2 == 0 {   // the next period uses the refreshed slow direction
                for i in m2.indices { m2[i] += 0.7 * sum[i] }
                sum = sum.map { _ in 0 }
                o2 = Reference.newtonSchulz(m2, rows: rows, cols: cols)
            }
            #expect(maxRelativeError(params, theta) < 1e-5, "step \(t)")
        }
        #expect(moments.steps == 5)
    }

    @Test("an M3 learner lowers the loss it learns from, and its state round-trips")
    func m3Learns() throws {
        var level = LevelConfiguration.Level(name: "m", chunkSize: 8, width: 4, layers: [0, 1], learningRate: 1e-2)
        level.optimizer = .init(kind: .m3)
        level.optimizer.slowPeriod = 2
        let learner = try Tiny.learner([level])
        let mask = Tiny.mask(1..<9)
        let before = try learner.trainer.loss(tokens: Tiny.tokens, learnable: mask, state: learner.state)
        for _ in 0..<10 { try learner.learn(tokens: Tiny.tokens, learnable: mask) }
        let after = try learner.trainer.loss(tokens: Tiny.tokens, learnable: mask, state: learner.state)
        #expect(learner.updatesApplied == [10] && learner.updatesRejected == [0])
        #expect(after.total < 0.9 * before.total, "loss \(before.total) → \(after.total)")
        #expect(learner.moments[0][0][1].slowDirection.contains { $0 != 0 })
        let model = try Fixtures.tinyLlama()
        let copy = try LevelStateFile.decode(try LevelStateFile.encode(learner, backbone: model.fingerprint), model: model)
        #expect(copy.moments == learner.moments && copy.state.blocks == learner.state.blocks)
    }
}

@Suite("Surprise gate")
struct SurpriseGateTests {
    @Test("targets below min_surprise give no gradient; the rest give the gradient of their sum over all targets")
    func gate() throws {
        let model = try Fixtures.tinyLlama()
        let config = try LevelConfiguration(levels: [.init(name: "fast", chunkSize: 8, width: 4, layers: [0, 1], learningRate: 1e-3)])
        let state = try LevelState(configuration: config, model: model.configuration)
        perturb(state, seed: 3, scale: 0.2)
        let trainer = LevelTrainer(model: model)
        let mask = Tiny.mask(1..<12)
        let all = try trainer.lossAndGradients(tokens: Tiny.tokens, learnable: mask, state: state)
        // Per-target NLLs, to put the threshold between them.
        var nll: [Int: Double] = [:]
        for i in 1..<12 {
            nll[i] = try trainer.loss(tokens: Tiny.tokens, learnable: Tiny.mask(i..<(i + 1)), state: state).total
        }
        // Halfway between two targets' NLLs: the gated pass runs only the rows up to its
        // last target, so its NLLs may differ from these in the last bits.
        let sorted = nll.values.sorted(), threshold = (sorted[4] + sorted[5]) / 2
        let surprising = nll.filter { $0.value >= threshold }.map(\.key)
        let gated = try trainer.lossAndGradients(tokens: Tiny.tokens, learnable: mask, state: state, minSurprise: threshold)
        #expect(gated.count == all.count && abs(gated.totalLoss - all.totalLoss) < 1e-9 * all.totalLoss)
        let only = try trainer.lossAndGradients(tokens: Tiny.tokens, learnable: (0..<Tiny.tokens.count).map { surprising.contains($0) },
                                                state: state)
        let scale = Float(surprising.count) / Float(all.count)   // their mean, re-weighted to a mean over all targets
        for (g, o) in zip(gated.gradients[0], only.gradients[0]) {
            for (a, b) in zip(g.tensors, o.tensors) {
                let err = zip(a, b).map { abs($0 - scale * $1) }.max()!, mag = b.map(abs).max()!
                #expect(err <= 1e-5 * max(mag, 1e-12))
            }
        }
        let none = try trainer.lossAndGradients(tokens: Tiny.tokens, learnable: mask, state: state, minSurprise: 1e9)
        #expect(none.gradients.allSatisfy { $0.allSatisfy { $0 == $0.zeros } })
    }
}
