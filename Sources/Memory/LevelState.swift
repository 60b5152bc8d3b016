// LevelState: one user's continuum memory level weights and their forward
// pass on top of the frozen backbone.
//
// Shape letters: T rows (tokens), D hidden size, R a level's width.
import Foundation
import Model
import Tensor

/// A user's level weights: for each level, one SwiGLU block per adapted
/// layer. A new state's output projections are zero, so its model is the
/// backbone, bit for bit.
public final class LevelState: LayerAdapter, @unchecked Sendable {
    /// One block: h ← h + down(silu(gate·u) ⊙ up·u), u = RMSNorm(h) ⊙ gain.
    public struct Block: Sendable, Equatable {
        public var gain: [Float]   // [D]
        public var gate: [Float]   // [R, D]
        public var up: [Float]     // [R, D]
        public var down: [Float]   // [D, R], zero at creation

        /// The four tensors in a fixed order: gain, gate, up, down.
        public var tensors: [[Float]] { [gain, gate, up, down] }

        public init(gain: [Float], gate: [Float], up: [Float], down: [Float]) {
            self.gain = gain
            self.gate = gate
            self.up = up
            self.down = down
        }

        /// From `tensors`' order.
        public init(tensors t: [[Float]]) {
            self.init(gain: t[0], gate: t[1], up: t[2], down: t[3])
        }

        /// Zeros of this block's shapes.
        public var zeros: Block { Block(tensors: tensors.map { [Float](repeating: 0, count: $0.count) }) }

        public var isFinite: Bool { tensors.allSatisfy { $0.allSatisfy(\.isFinite) } }
    }

    public let configuration: LevelConfiguration
    public let hiddenSize: Int

    /// The [rows, cols] of each tensor of level l's blocks, in `Block.tensors`
    /// order (the gain vector is one row).
    public func tensorShapes(level l: Int) -> [(rows: Int, cols: Int)] {
        let d = hiddenSize, r = configuration.levels[l].width
        return [(1, d), (r, d), (r, d), (d, r)]
    }
    public let epsilon: Float
    /// blocks[level][i] adapts layer configuration.levels[level].layers[i].
    public var blocks: [[Block]]

    /// A fresh state for a backbone of `model`'s shape. Gate and up
    /// projections start from the same seeded N(0, 1/D) draw for every user.
    public init(configuration: LevelConfiguration, model: LlamaConfiguration, seed: UInt64 = 0x434F4E54) throws {
        try configuration.validate(layers: model.numHiddenLayers, hiddenSize: model.hiddenSize)
        self.configuration = configuration
        hiddenSize = model.hiddenSize
        epsilon = model.rmsNormEps
        let d = model.hiddenSize
        var rng = SeededGenerator(seed: seed)
        func normal(_ n: Int, std: Float) -> [Float] {
            (0..<n).map { _ in
                // Box–Muller.
                let u1 = max(Double(rng.next() >> 11) / Double(1 << 53), 1e-300), u2 = Double(rng.next() >> 11) / Double(1 << 53)
                return Float((-2 * log(u1)).squareRoot() * cos(2 * .pi * u2)) * std
            }
        }
        blocks = configuration.levels.map { level in
            level.layers.map { _ in
                Block(gain: [Float](repeating: 1, count: d),
                      gate: normal(level.width * d, std: 1 / Float(d).squareRoot()),
                      up: normal(level.width * d, std: 1 / Float(d).squareRoot()),
                      down: [Float](repeating: 0, count: d * level.width))
            }
        }
    }

    /// The block of `level` at backbone layer `layer`, if it adapts it.
    func blockIndex(level: Int, layer: Int) -> Int? {
        configuration.levels[level].layers.firstIndex(of: layer)
    }

    public func adapts(layer: Int) -> Bool {
        for (li, level) in blocks.enumerated() {
            if let i = blockIndex(level: li, layer: layer), level[i].down.contains(where: { $0 != 0 }) { return true }
        }
        return false
    }

    /// Applies every level's block at `layer`, slowest level first.
    ///   hidden: [T, D] (in place)
    public func apply(layer: Int, hidden: UnsafeMutablePointer<Float>, rows t: Int) {
        for (li, level) in blocks.enumerated() {
            guard let i = blockIndex(level: li, layer: layer) else { continue }
            let b = level[i]
            // A block whose output projection is zero adds exactly nothing.
            guard b.down.contains(where: { $0 != 0 }) else { continue }
            applyBlock(b, width: configuration.levels[li].width, hidden: hidden, rows: t)
        }
    }
}

extension LevelState {
    /// Gradients with the shapes of `blocks`, zero.
    public func zeroGradients() -> [[Block]] {
        blocks.map { $0.map(\.zeros) }
    }

    /// Backward of `apply` at `layer`. Recomputes the blocks' activations
    /// from the layer's input, accumulates every block's parameter gradients
    /// into `gradients`, and turns the gradient of the layer's output into
    /// the gradient of its input, in place.
    ///   hiddenIn: [T, D] the residual stream before `apply`
    ///   dHidden:  [T, D] dL/d(output) in, dL/d(input) out
    public func backward(layer: Int, hiddenIn: UnsafePointer<Float>, rows t: Int,
                         dHidden: UnsafeMutablePointer<Float>, gradients: inout [[Block]]) {
        let d = hiddenSize
        // Forward again, keeping each block's input: levels apply in order.
        var inputs: [(level: Int, block: Int, h: [Float])] = []
        var h = Array(UnsafeBufferPointer(start: hiddenIn, count: t * d))
        for li in blocks.indices {
            guard let i = blockIndex(level: li, layer: layer) else { continue }
            inputs.append((li, i, h))
            applyBlock(blocks[li][i], width: configuration.levels[li].width, hidden: &h, rows: t)
        }
        // Backward, last level first.
        for (li, i, hin) in inputs.reversed() {
            let b = blocks[li][i], r = configuration.levels[li].width
            var u = [Float](repeating: 0, count: t * d)              // [T, D]
            var a = [Float](repeating: 0, count: t * r), g = a        // [T, R]
            Ops.rmsNorm(hin, weight: b.gain, eps: epsilon, rows: t, dim: d, out: &u)
            Ops.linear(u, rows: t, b.gate, out: r, in: d, into: &a)
            Ops.linear(u, rows: t, b.up, out: r, in: d, into: &g)
            var s = a
            Ops.swiglu(gate: &s, up: g, count: t * r)                 // [T, R]
            // h_out = h_in + s · downᵀ
            var ds = [Float](repeating: 0, count: t * r)
            Ops.linearBackward(dHidden, rows: t, x: s, b.down, out: d, in: r, dx: &ds, dw: &gradients[li][i].down)
            var da = ds, dg = ds
            Ops.swigluBackward(a: a, b: g, dout: ds, count: t * r, da: &da, db: &dg)
            var du = [Float](repeating: 0, count: t * d)
            Ops.linearBackward(da, rows: t, x: u, b.gate, out: r, in: d, dx: &du, dw: &gradients[li][i].gate)
            Ops.linearBackward(dg, rows: t, x: u, b.up, out: r, in: d, dx: &du, accumulate: true, dw: &gradients[li][i].up)
            // dHidden already carries the residual path; add the block's path.
            Ops.rmsNormBackward(hin, weight: b.gain, eps: epsilon, rows: t, dim: d, dy: du, dx: dHidden,
                                dweight: &gradients[li][i].gain)
        }
    }

    /// One block's forward on rows in place (no zero-output shortcut):
    ///   hidden: [T, D] ← hidden + down(silu(gate·u) ⊙ up·u), u = RMSNorm(hidden)·gain
    func applyBlock(_ b: Block, width r: Int, hidden: UnsafeMutablePointer<Float>, rows t: Int) {
        let d = hiddenSize
        var u = [Float](repeating: 0, count: t * d)
        var a = [Float](repeating: 0, count: t * r), g = a
        Ops.rmsNorm(hidden, weight: b.gain, eps: epsilon, rows: t, dim: d, out: &u)
        Ops.linear(u, rows: t, b.gate, out: r, in: d, into: &a)
        Ops.linear(u, rows: t, b.up, out: r, in: d, into: &g)
        Ops.swiglu(gate: &a, up: g, count: t * r)
        Ops.linear(a, rows: t, b.down, out: d, in: r, into: hidden, accumulate: true)
    }
}

extension LevelState {
    /// Starts every block's keys from the frozen MLP of the layer it adapts
    /// (Nested Learning's level stacking from pretrained MLPs): gate and up
    /// take `width` of the MLP's rows, evenly spaced, and the gain the MLP's
    /// norm weights. The output projection stays zero, so the model is still
    /// the backbone's, bit for bit.
    public func initializeKeys(from weights: LlamaWeights) {
        for (li, level) in configuration.levels.enumerated() {
            for (bi, layer) in level.layers.enumerated() {
                let w = weights.layers[layer], f = w.wGate.rows, d = hiddenSize
                var gate = [Float](repeating: 0, count: level.width * d), up = gate
                for j in 0..<level.width {
                    let row = (j * f) / level.width + (f / level.width) / 2
                    gate.withUnsafeMutableBufferPointer { w.wGate.dequantizeRows(row..<(row + 1), into: $0.baseAddress! + j * d) }
                    up.withUnsafeMutableBufferPointer { w.wUp.dequantizeRows(row..<(row + 1), into: $0.baseAddress! + j * d) }
                }
                blocks[li][bi].gain = w.mlpNorm
                blocks[li][bi].gate = gate
                blocks[li][bi].up = up
            }
        }
    }
}
