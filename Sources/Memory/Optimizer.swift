// Optimizers for the memory levels: AdamW and momentum SGD, per tensor.
import Foundation

/// Moments an optimizer keeps for one parameter tensor.
public struct OptimizerMoments: Sendable, Equatable {
    public var first: [Float]
    public var second: [Float]
    /// Updates applied so far (Adam's bias correction).
    public var steps: Int

    public init(count: Int) {
        first = [Float](repeating: 0, count: count)
        second = [Float](repeating: 0, count: count)
        steps = 0
    }
}

extension LevelConfiguration.Optimizer {
    /// The new parameter values after one step with gradient `g` (not applied:
    /// the caller checks them before committing). `moments` advance.
    ///   params, g: [n]
    public func step(params: [Float], gradient g: [Float], learningRate lr: Double,
                     moments: inout OptimizerMoments) -> [Float] {
        precondition(params.count == g.count && moments.first.count == g.count)
        moments.steps += 1
        let b1 = Float(beta1), b2 = Float(beta2), eps = Float(epsilon), wd = Float(weightDecay), lr = Float(lr)
        var out = params
        switch kind {
        case .adamw:
            let c1 = 1 - powf(b1, Float(moments.steps)), c2 = 1 - powf(b2, Float(moments.steps))
            for i in out.indices {
                moments.first[i] = b1 * moments.first[i] + (1 - b1) * g[i]
                moments.second[i] = b2 * moments.second[i] + (1 - b2) * g[i] * g[i]
                let mHat = moments.first[i] / c1, vHat = moments.second[i] / c2
                out[i] -= lr * (mHat / (vHat.squareRoot() + eps) + wd * params[i])
            }
        case .sgd:
            for i in out.indices {
                moments.first[i] = b1 * moments.first[i] + g[i]
                out[i] -= lr * (moments.first[i] + wd * params[i])
            }
        case .m3:
            preconditionFailure("M3 is rejected when a LevelLearner is created")
        }
        return out
    }
}
