// Drift: how far a user's levels have moved the model, measured against the
// frozen backbone (Nested Learning's slow level), for the drift audit.
//
//   behavioural  KL(user ‖ backbone) of the next-token distributions at every
//                position of every probe prompt (mean and max), and the share
//                of positions whose most likely token is the same (top-1
//                agreement). A user with no stored level runs the backbone
//                itself, so KL is exactly 0 and agreement exactly 1.
//   forgetting   perplexity of held-out reference text with the user's levels
//                over the backbone's (ratio > 1: general ability lost).
//   personal     perplexity of the user's own recent text, user over backbone
//                (ratio < 1: the levels learned the user).
//   parameters   per level and adapted layer, the norm of what the level adds
//                to the backbone (‖down‖ and ‖gain − 1‖; both zero when fresh)
//                and of the change from another state.
import Foundation
import Model
import Tensor

/// Behavioural drift over a probe set.
public struct BehaviouralDrift: Sendable, Equatable {
    public let klMean: Double
    public let klMax: Double
    public let top1Agreement: Double
    /// Next-token distributions compared.
    public let positions: Int
}

public enum Drift {
    /// KL(user ‖ backbone) and top-1 agreement at every position of every
    /// probe (each probe's tokens after its first predict the next one; the
    /// last position, predicting what follows the probe, counts too).
    /// `state` nil: the backbone itself.
    public static func behaviour(model: LlamaModel, probes: [[Int]], state: (any LayerAdapter)?) throws -> BehaviouralDrift {
        let probes = probes.filter { !$0.isEmpty }
        guard !probes.isEmpty else { return BehaviouralDrift(klMean: 0, klMax: 0, top1Agreement: 1, positions: 0) }
        let d = model.configuration.hiddenSize, v = model.configuration.vocabSize
        // One batched forward per side: [Σ tokens, D] each.
        let base = try model.hiddenStates(probes.map { LlamaModel.Step(tokens: $0, cache: model.makeCache()) })
        let user = state == nil ? base
            : try model.hiddenStates(probes.map { LlamaModel.Step(tokens: $0, cache: model.makeCache(), adapter: state) })
        var klSum = 0.0, klMax = 0.0, agree = 0, n = 0
        var row = 0
        let total = probes.reduce(0) { $0 + $1.count }
        while row < total {
            let count = min(64, total - row)
            let lb = base.withUnsafeBufferPointer { model.logits(hidden: $0.baseAddress! + row * d, count: count) }   // [count, V]
            let lu = state == nil ? lb : user.withUnsafeBufferPointer { model.logits(hidden: $0.baseAddress! + row * d, count: count) }
            for i in 0..<count {
                let (kl, same) = lu.withUnsafeBufferPointer { u in
                    lb.withUnsafeBufferPointer { b in
                        klAndAgreement(user: u.baseAddress! + i * v, backbone: b.baseAddress! + i * v, count: v)
                    }
                }
                klSum += kl
                klMax = max(klMax, kl)
                agree += same ? 1 : 0
                n += 1
            }
            row += count
        }
        return BehaviouralDrift(klMean: klSum / Double(n), klMax: klMax, top1Agreement: Double(agree) / Double(n), positions: n)
    }

    /// KL(p_u ‖ p_b) in nats (Double accumulation) for one position's logits,
    /// and whether both put their maximum on the same token. Exactly 0 and
    /// true when the logits are identical.
    static func klAndAgreement(user u: UnsafePointer<Float>, backbone b: UnsafePointer<Float>, count v: Int) -> (Double, Bool) {
        func logSumExp(_ x: UnsafePointer<Float>) -> (Double, Int) {
            var m = x[0], arg = 0
            for j in 1..<v where x[j] > m { m = x[j]; arg = j }
            var s = 0.0
            for j in 0..<v { s += exp(Double(x[j] - m)) }
            return (Double(m) + log(s), arg)
        }
        let (zu, au) = logSumExp(u), (zb, ab) = logSumExp(b)
        var kl = 0.0
        for j in 0..<v {
            let lu = Double(u[j]) - zu, lb = Double(b[j]) - zb
            kl += exp(lu) * (lu - lb)
        }
        return (max(0, kl), au == ab)
    }

    /// Per level and adapted layer, ‖what the level adds‖: sqrt(‖down‖² + ‖gain − 1‖²).
    public static func norms(_ state: LevelState) -> [[Double]] {
        state.blocks.map { blocks in
            blocks.map { b in
                (b.down.reduce(0.0) { $0 + Double($1) * Double($1) }
                    + b.gain.reduce(0.0) { $0 + Double($1 - 1) * Double($1 - 1) }).squareRoot()
            }
        }
    }

    /// Per level and adapted layer, the norm of the change of all its tensors from `other`.
    public static func change(_ state: LevelState, from other: LevelState) -> [[Double]] {
        zip(state.blocks, other.blocks).map { a, b in
            zip(a, b).map { x, y in
                zip(x.tensors, y.tensors).reduce(0.0) { s, t in
                    s + zip(t.0, t.1).reduce(0.0) { $0 + Double($1.0 - $1.1) * Double($1.0 - $1.1) }
                }.squareRoot()
            }
        }
    }
}
