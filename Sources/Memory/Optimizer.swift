// Optimizers for the memory levels, per tensor: AdamW, momentum SGD, and
// M3 (Multi-scale Momentum Muon, Nested Learning Alg. 1).
import Foundation
import Tensor

/// What an optimizer keeps for one parameter tensor.
public struct OptimizerMoments: Sendable, Equatable {
    /// Adam m / SGD momentum / M3 M⁽¹⁾.
    public var first: [Float]
    /// Adam v / M3 V.
    public var second: [Float]
    /// M3 only (empty otherwise): the slow momentum M⁽²⁾, its orthogonalised
    /// form O⁽²⁾, and Σ g since the slow momentum was last refreshed.
    public var slow: [Float] = []
    public var slowDirection: [Float] = []
    public var slowSum: [Float] = []
    /// Updates applied so far (Adam's bias correction, M3's slow period).
    public var steps: Int

    public init(count: Int, kind: LevelConfiguration.Optimizer.Kind = .adamw) {
        first = [Float](repeating: 0, count: count)
        second = first
        if kind == .m3 {
            slow = first
            slowDirection = first
            slowSum = first
        }
        steps = 0
    }

    /// Whether every moment value is finite.
    public var isFinite: Bool {
        [first, second, slow, slowDirection, slowSum].allSatisfy { $0.allSatisfy(\.isFinite) }
    }
}

extension LevelConfiguration.Optimizer {
    /// The new parameter values after one step with gradient `g` (not applied:
    /// the caller checks them before committing). `moments` advance. M3 treats
    /// the tensor as a [rows, cols] matrix (a vector is one row).
    ///   params, g: [rows · cols]
    public func step(params: [Float], gradient g: [Float], rows: Int, cols: Int, learningRate lr: Double,
                     moments: inout OptimizerMoments) -> [Float] {
        precondition(params.count == g.count && moments.first.count == g.count && rows * cols == g.count)
        moments.steps += 1
        let b1 = Float(beta1), b2 = Float(beta2), eps = Float(epsilon), wd = Float(weightDecay), lr = Float(lr)
        var out = params
        switch kind {
        case .adamw:
            let c1 = 1 - powf(b1, Float(moments.steps)), c2 = 1 - powf(b2, Float(moments.steps))
            // Over raw buffers: the same arithmetic without per-element checks.
            out.withUnsafeMutableBufferPointer { o in
                moments.first.withUnsafeMutableBufferPointer { m1 in
                    moments.second.withUnsafeMutableBufferPointer { m2 in
                        g.withUnsafeBufferPointer { g in
                            for i in 0..<o.count {
                                m1[i] = b1 * m1[i] + (1 - b1) * g[i]
                                m2[i] = b2 * m2[i] + (1 - b2) * g[i] * g[i]
                                let mHat = m1[i] / c1, vHat = m2[i] / c2
                                o[i] -= lr * (mHat / (vHat.squareRoot() + eps) + wd * o[i])
                            }
                        }
                    }
                }
            }
        case .sgd:
            for i in out.indices {
                moments.first[i] = b1 * moments.first[i] + g[i]
                out[i] -= lr * (moments.first[i] + wd * params[i])
            }
        case .m3:
            // Alg. 1, one inner step t (k = the slow period's index):
            //   M⁽¹⁾ ← M⁽¹⁾ + β1 g;  V ← V + β2 g²;  O⁽¹⁾ = NS_T(M⁽¹⁾)
            //   Θ ← Θ − η (O⁽¹⁾ + α O⁽²⁾) / (√V + ε)   (+ decoupled weight decay)
            // and after every `slowPeriod` steps, for the next period:
            //   M⁽²⁾ ← M⁽²⁾ + β3 Σ g (over the period);  O⁽²⁾ = NS_T(M⁽²⁾)
            precondition(moments.slow.count == g.count, "M3 needs OptimizerMoments(count:kind: .m3)")
            let b3 = Float(beta3), a = Float(alpha)
            for i in g.indices {
                moments.first[i] += b1 * g[i]
                moments.second[i] += b2 * g[i] * g[i]
                moments.slowSum[i] += g[i]
            }
            let o1 = Ops.newtonSchulz(moments.first, rows: rows, cols: cols, steps: newtonSchulzSteps)
            for i in out.indices {
                out[i] -= lr * ((o1[i] + a * moments.slowDirection[i]) / (moments.second[i].squareRoot() + eps) + wd * params[i])
            }
            if moments.steps % slowPeriod == 0 {
                for i in g.indices { moments.slow[i] += b3 * moments.slowSum[i] }
                moments.slowSum = moments.slowSum.map { _ in 0 }
                moments.slowDirection = Ops.newtonSchulz(moments.slow, rows: rows, cols: cols, steps: newtonSchulzSteps)
            }
        }
        return out
    }
}
