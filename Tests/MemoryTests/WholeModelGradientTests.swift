// Level gradients through the whole tiny Llama against central finite
// differences of an independent Float64 forward pass (written here with plain
// loops: embedding, RMSNorm, RoPE, grouped-query causal attention, SwiGLU,
// the level blocks, final norm, untied head, masked next-token loss), for one
// piece from position 0 and for a stream's second piece, whose loss holds
// the first piece's keys and values fixed (streaming learning's semantics).
import Foundation
import Testing
import TestSupport
@testable import Memory
@testable import Model
import Tensor

/// The tiny Llama's weights in Double and its loss, for finite differences.
struct DoubleLlama {
    let c: LlamaConfiguration
    let embedding: [Double]   // [V, D]
    let output: [Double]      // [V, D]
    let outputNorm: [Double]  // [D]
    /// Per layer: attention norm, q, k, v, o, MLP norm, gate, up, down.
    let layers: [[[Double]]]

    init(_ m: LlamaModel) {
        c = m.configuration
        func d(_ w: WeightMatrix) -> [Double] { w.dequantized().map(Double.init) }
        embedding = d(m.weights.tokenEmbedding)
        output = d(m.weights.output)
        outputNorm = m.weights.outputNorm.map(Double.init)
        layers = m.weights.layers.map { w in
            [w.attentionNorm.map(Double.init), d(w.wq), d(w.wk), d(w.wv), d(w.wo), w.mlpNorm.map(Double.init),
             d(w.wGate), d(w.wUp), d(w.wDown)]
        }
    }

    /// y = W x for W [out, in].
    func mul(_ w: [Double], _ x: ArraySlice<Double>, out: Int) -> [Double] {
        let n = x.count, x0 = x.startIndex
        return (0..<out).map { o in (0..<n).reduce(0.0) { $0 + w[o * n + $1] * x[x0 + $1] } }
    }

    func rmsNorm(_ x: [Double], _ w: [Double]) -> [Double] {
        let s = 1 / (x.reduce(0) { $0 + $1 * $1 } / Double(x.count) + Double(c.rmsNormEps)).squareRoot()
        return zip(x, w).map { $0 * s * $1 }
    }

    func silu(_ x: Double) -> Double { x / (1 + exp(-x)) }

    /// Rotates each head's halves (Hugging Face's rotate_half layout).
    func rope(_ x: inout [Double], position p: Int, heads: Int) {
        let hs = c.headDim, half = hs / 2
        for h in 0..<heads {
            for i in 0..<half {
                let angle = Double(p) * pow(Double(c.ropeTheta), -Double(2 * i) / Double(hs))
                let a = x[h * hs + i], b = x[h * hs + i + half]
                x[h * hs + i] = a * cos(angle) - b * sin(angle)
                x[h * hs + i + half] = b * cos(angle) + a * sin(angle)
            }
        }
    }

    /// Per layer, every row's key (after RoPE) and value: [L][T][KVH*HS] each.
    typealias KeysValues = [(k: [[Double]], v: [[Double]])]

    /// Mean −log p(target) over the learnable targets, with level blocks
    /// levels[ℓ] = (layers, per block [gain, gate, up, down]) applied in order
    /// after each adapted layer's MLP. With `fixed`, rows 0..<fixed.rows
    /// attend with, and are attended through, the given keys and values at
    /// every layer instead of their own (constants: detached).
    func loss(tokens: [Int], learnable: [Bool], levels: [([Int], [[[Double]]])],
              fixed: (rows: Int, kv: KeysValues)? = nil) -> Double {
        let (h, _) = forward(tokens: tokens, levels: levels, fixed: fixed)
        let v = c.vocabSize
        var total = 0.0, count = 0
        for i in 0..<(tokens.count - 1) where learnable[i + 1] {
            let logits = mul(output, rmsNorm(h[i], outputNorm)[...], out: v)
            let m = logits.max()!
            total += log(logits.reduce(0) { $0 + exp($1 - m) }) + m - logits[tokens[i + 1]]
            count += 1
        }
        return total / Double(count)
    }

    /// The residual stream before the final norm, [T][D], and every layer's keys and values.
    func forward(tokens: [Int], levels: [([Int], [[[Double]]])], fixed: (rows: Int, kv: KeysValues)? = nil)
        -> ([[Double]], KeysValues) {
        let d = c.hiddenSize, hs = c.headDim, nh = c.numAttentionHeads, nkv = c.numKeyValueHeads
        var h = tokens.map { Array(embedding[($0 * d)..<($0 * d + d)]) }   // [T][D]
        let t = tokens.count
        var kvs: KeysValues = []
        for (l, w) in layers.enumerated() {
            let xn = h.map { rmsNorm($0, w[0]) }
            var q = xn.map { mul(w[1], $0[...], out: nh * hs) }, k = xn.map { mul(w[2], $0[...], out: nkv * hs) }
            var val = xn.map { mul(w[3], $0[...], out: nkv * hs) }
            for i in 0..<t {
                rope(&q[i], position: i, heads: nh)
                rope(&k[i], position: i, heads: nkv)
            }
            if let fixed {
                for j in 0..<fixed.rows {
                    k[j] = fixed.kv[l].k[j]
                    val[j] = fixed.kv[l].v[j]
                }
            }
            kvs.append((k, val))
            for i in 0..<t {
                var att = [Double](repeating: 0, count: nh * hs)
                for head in 0..<nh {
                    let kv = head / (nh / nkv)
                    let scores = (0...i).map { j in
                        (0..<hs).reduce(0.0) { $0 + q[i][head * hs + $1] * k[j][kv * hs + $1] } / Double(hs).squareRoot()
                    }
                    let m = scores.max()!, e = scores.map { exp($0 - m) }, z = e.reduce(0, +)
                    for j in 0...i { for x in 0..<hs { att[head * hs + x] += e[j] / z * val[j][kv * hs + x] } }
                }
                let o = mul(w[4], att[...], out: d)
                for x in 0..<d { h[i][x] += o[x] }
            }
            for i in 0..<t {
                let u = rmsNorm(h[i], w[5])
                let g = mul(w[6], u[...], out: c.intermediateSize), up = mul(w[7], u[...], out: c.intermediateSize)
                let o = mul(w[8], zip(g, up).map { silu($0) * $1 }[...], out: d)
                for x in 0..<d { h[i][x] += o[x] }
                for (adapted, blocks) in levels {
                    guard let b = adapted.firstIndex(of: l) else { continue }
                    let p = blocks[b], r = p[1].count / d
                    let u = rmsNorm(h[i], p[0])
                    let a = mul(p[1], u[...], out: r), bb = mul(p[2], u[...], out: r)
                    let o = mul(p[3], zip(a, bb).map { silu($0) * $1 }[...], out: d)
                    for x in 0..<d { h[i][x] += o[x] }
                }
            }
        }
        return (h, kvs)
    }
}

/// A user who has learned something: every tensor of `state` away from its start.
func scramble(_ state: LevelState, seed: UInt64) {
    var rng = SeededGenerator(seed: seed)
    func noise(_ n: Int, _ s: Float) -> [Float] { (0..<n).map { _ in (Float(rng.next() % 2001) / 1000 - 1) * s } }
    for l in state.blocks.indices {
        for b in state.blocks[l].indices {
            let blk = state.blocks[l][b]
            state.blocks[l][b] = LevelState.Block(gain: zip(blk.gain, noise(blk.gain.count, 0.3)).map { $0 + $1 },
                                                  gate: noise(blk.gate.count, 0.5), up: noise(blk.up.count, 0.5),
                                                  down: noise(blk.down.count, 0.3))
        }
    }
}

@Suite("Whole-model level gradients")
struct WholeModelGradientTests {
    @Test("every level tensor's gradient matches Float64 central differences through the tiny Llama")
    func finiteDifferences() throws {
        let model = try Fixtures.tinyLlama()
        let config = try LevelConfiguration(levels: [
            .init(name: "mid", chunkSize: 64, width: 4, layers: [0, 1], learningRate: 1e-3),
            .init(name: "fast", chunkSize: 8, width: 3, layers: [1], learningRate: 1e-3),
        ])
        let state = try LevelState(configuration: config, model: model.configuration)
        scramble(state, seed: 31)
        let tokens = Array(Tiny.tokens.prefix(12))
        let learnable = (0..<tokens.count).map { $0 != 4 && $0 != 5 }   // a masked gap
        let analytic = try LevelTrainer(model: model).lossAndGradients(tokens: tokens, learnable: learnable, state: state)

        let reference = DoubleLlama(model)
        var params = state.blocks.map { $0.map { $0.tensors.map { $0.map(Double.init) } } }
        func loss() -> Double {
            reference.loss(tokens: tokens, learnable: learnable,
                           levels: config.levels.indices.map { (config.levels[$0].layers, params[$0]) })
        }
        let base = loss()
        #expect(abs(base - analytic.totalLoss / Double(analytic.count)) < 1e-5 * base, "Float64 loss \(base)")
        var worst = 0.0, checked = 0
        for l in params.indices {
            for b in params[l].indices {
                for k in 0..<4 {
                    let g = analytic.gradients[l][b].tensors[k]
                    let scale = Double(g.map(abs).max()!)
                    #expect(scale > 0, "level \(l) block \(b) tensor \(k) has an all-zero gradient")
                    // The largest entry and five spread over the tensor.
                    let largest = g.indices.max { abs(g[$0]) < abs(g[$1]) }!
                    for i in Set([largest] + (0..<5).map { ($0 * 7919 + 13) % g.count }) {
                        let x = params[l][b][k][i], h = 1e-5
                        params[l][b][k][i] = x + h
                        let up = loss()
                        params[l][b][k][i] = x - h
                        let down = loss()
                        params[l][b][k][i] = x
                        let fd = (up - down) / (2 * h)
                        let err = abs(fd - Double(g[i])) / scale
                        worst = max(worst, err)
                        checked += 1
                        #expect(err < 1e-3, "level \(l) block \(b) tensor \(k)[\(i)]: analytic \(g[i]), finite difference \(fd)")
                    }
                }
            }
        }
        print("whole-model level gradients vs Float64 central differences: \(checked) entries, max error \(worst) × max|g| per tensor")
    }

    @Test("a stream's second piece: the gradient of its loss with the first piece's keys and values held fixed",
          arguments: [[0, 1], [1]])
    func secondPieceDetached(midLayers: [Int]) throws {
        let model = try Fixtures.tinyLlama()
        // Levels at layers [0, 1] (nothing frozen below them) or only at layer 1 (layer 0 runs once, batched).
        let config = try LevelConfiguration(levels: [
            .init(name: "mid", chunkSize: 64, width: 4, layers: midLayers, learningRate: 1e-3),
            .init(name: "fast", chunkSize: 8, width: 3, layers: [1], learningRate: 1e-3),
        ])
        let state = try LevelState(configuration: config, model: model.configuration)
        scramble(state, seed: 41)
        let tokens = Array(Tiny.tokens.prefix(14))
        let first = Array(2...6), second = [7, 8, 10, 11, 12, 13]   // targets (token indices); 9 masked
        let trainer = LevelTrainer(model: model)
        let stream = try trainer.stream(tokens: tokens, rows: 13, state: state)
        let r1 = try trainer.lossAndGradients(stream, through: 6, targets: first, state: state)
        #expect(stream.processed == 6 && r1.count == first.count)
        let reference = DoubleLlama(model)
        func levels(_ s: LevelState) -> [([Int], [[[Double]]])] {
            config.levels.indices.map { l in (config.levels[l].layers, s.blocks[l].map { $0.tensors.map { $0.map(Double.init) } }) }
        }
        func mask(_ targets: [Int]) -> [Bool] { tokens.indices.map { targets.contains($0) } }
        // The first piece's keys and values, as computed with the weights of its time.
        let (_, kv1) = reference.forward(tokens: tokens, levels: levels(state))
        let l1 = reference.loss(tokens: tokens, learnable: mask(first), levels: levels(state))
        #expect(abs(l1 - r1.totalLoss / Double(r1.count)) < 1e-5 * l1)
        // An update between the pieces: the second runs with other weights.
        scramble(state, seed: 42)
        let r2 = try trainer.lossAndGradients(stream, through: 13, targets: second, state: state)
        #expect(stream.processed == 13 && r2.count == second.count)
        var params = state.blocks.map { $0.map { $0.tensors.map { $0.map(Double.init) } } }
        func loss(detached: Bool) -> Double {
            reference.loss(tokens: tokens, learnable: mask(second),
                           levels: config.levels.indices.map { (config.levels[$0].layers, params[$0]) },
                           fixed: detached ? (rows: 6, kv: kv1) : nil)
        }
        let base = loss(detached: true)
        #expect(abs(base - r2.totalLoss / Double(r2.count)) < 1e-5 * base, "Float64 loss \(base)")
        var worst = 0.0, checked = 0, attached = 0.0
        for l in params.indices {
            for b in params[l].indices {
                for k in 0..<4 {
                    let g = r2.gradients[l][b].tensors[k]
                    let scale = Double(g.map(abs).max()!)
                    #expect(scale > 0, "level \(l) block \(b) tensor \(k) has an all-zero gradient")
                    let largest = g.indices.max { abs(g[$0]) < abs(g[$1]) }!
                    for i in Set([largest] + (0..<4).map { ($0 * 7919 + 13) % g.count }) {
                        let x = params[l][b][k][i], h = 1e-5
                        func difference(detached: Bool) -> Double {
                            params[l][b][k][i] = x + h
                            let up = loss(detached: detached)
                            params[l][b][k][i] = x - h
                            let down = loss(detached: detached)
                            params[l][b][k][i] = x
                            return (up - down) / (2 * h)
                        }
                        let err = abs(difference(detached: true) - Double(g[i])) / scale
                        worst = max(worst, err)
                        checked += 1
                        #expect(err < 1e-3, "level \(l) block \(b) tensor \(k)[\(i)]: analytic \(g[i])")
                        // The gradient through the first piece's keys and values (not ours) differs.
                        if i == largest { attached = max(attached, abs(difference(detached: false) - Double(g[i])) / scale) }
                    }
                }
            }
        }
        // Levels only at the last layer cannot change any layer's keys and values.
        if midLayers.contains(0) { #expect(attached > 1e-2, "the test tells detached from attached prefixes") }
        print("second piece's level gradients vs Float64 central differences (prefix K/V fixed), levels at \(midLayers): \(checked) entries, max error \(worst) × max|g|; the attached gradient differs by up to \(attached)")
    }
}
