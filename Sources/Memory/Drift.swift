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

/// The drift metrics a report ranks by and a policy can bound.
public enum DriftMetric: String, Sendable, CaseIterable, Codable {
    case klMean = "kl_mean", klMax = "kl_max", top1Agreement = "top1_agreement"
    case forgettingPPLRatio = "forgetting_ppl_ratio", personalizationPPLRatio = "personalization_ppl_ratio"
    case paramNorm = "param_norm", paramChange = "param_change"

    /// Whether lower is the more drifted end (rankings put the most drifted first).
    public var lowIsDrift: Bool { self == .top1Agreement }
}

/// One memory version measured against the backbone (the JSON `metrics` object of a drift report).
public struct DriftMetrics: Codable, Sendable, Equatable {
    public var version: Int64
    public var klMean: Double
    public var klMax: Double
    public var top1Agreement: Double
    public var probePositions: Int
    public var forgettingPPL: Double
    public var backboneForgettingPPL: Double
    public var forgettingPPLRatio: Double
    public var personalizationPPL: Double?
    public var backbonePersonalizationPPL: Double?
    public var personalizationPPLRatio: Double?
    /// Σ over levels of the norms of what they add (see Drift.norms), and per level and layer.
    public var paramNorm: Double
    public var levelNorms: [String: [Double]]
    /// Norm of the change since the previous kept version (nil: none kept).
    public var paramChange: Double?
    public var levelChanges: [String: [Double]]?
    public var tokensLearned: [String: Int]
    public var updatesApplied: [String: Int]
    public var updatesRejected: [String: Int]
    /// Of the rejected steps, those refused by the NaN/Inf guard and by the max_norm guard.
    public var rejectedNonFinite: [String: Int]
    public var rejectedNorm: [String: Int]
    public var consolidations: Int
    public var jobsApplied: Int64
    /// Compute time of the measurement.
    public var seconds: Double

    enum CodingKeys: String, CodingKey {
        case version, klMean = "kl_mean", klMax = "kl_max", top1Agreement = "top1_agreement", probePositions = "probe_positions"
        case forgettingPPL = "forgetting_ppl", backboneForgettingPPL = "backbone_forgetting_ppl"
        case forgettingPPLRatio = "forgetting_ppl_ratio", personalizationPPL = "personalization_ppl"
        case backbonePersonalizationPPL = "backbone_personalization_ppl", personalizationPPLRatio = "personalization_ppl_ratio"
        case paramNorm = "param_norm", levelNorms = "level_norms", paramChange = "param_change", levelChanges = "level_changes"
        case tokensLearned = "tokens_learned", updatesApplied = "updates_applied", updatesRejected = "updates_rejected"
        case rejectedNonFinite = "rejected_non_finite", rejectedNorm = "rejected_norm"
        case consolidations, jobsApplied = "jobs_applied", seconds
    }

    /// The value of one rankable metric (nil: not measured, e.g. no recent text to personalise on).
    public func value(_ metric: DriftMetric) -> Double? {
        switch metric {
        case .klMean: klMean
        case .klMax: klMax
        case .top1Agreement: top1Agreement
        case .forgettingPPLRatio: forgettingPPLRatio
        case .personalizationPPLRatio: personalizationPPLRatio
        case .paramNorm: paramNorm
        case .paramChange: paramChange
        }
    }
}

extension Drift {
    /// Measures a user's memory version (`learner`; `hasLevels` false: it
    /// stores no level, so the backbone itself runs) against the backbone:
    /// behaviour on `probes`, forgetting on `reference` (given the backbone's
    /// perplexity on it, which callers cache), personalisation on the last
    /// `personalTokens` of the user's recent text, parameter norms and their
    /// change from `previous`, and the learner's activity counters. What the
    /// service's audit stores and the audit benchmark times.
    public static func measure(model: LlamaModel, learner: LevelLearner, hasLevels: Bool, previous: LevelLearner?,
                               probes: [[Int]], reference: [Int], backboneReferencePerplexity: Double, personalTokens: Int,
                               version: Int64, jobsApplied: Int64) throws -> DriftMetrics {
        let start = ContinuousClock.now
        let state: LevelState? = hasLevels ? learner.state : nil
        let b = try behaviour(model: model, probes: probes, state: state)
        let forgetting = try model.perplexity(tokens: reference, adapter: state).perplexity
        let personal = Array(learner.recentTokens.joined().suffix(personalTokens))
        var userPersonal: Double?, basePersonal: Double?
        if personal.count >= 2 {
            userPersonal = try model.perplexity(tokens: personal, adapter: state).perplexity
            basePersonal = try model.perplexity(tokens: personal).perplexity
        }
        let names = learner.state.configuration.levels.map(\.name)
        let levelNorms = norms(learner.state)
        let changes = previous.map { change(learner.state, from: $0.state) }
        func total(_ x: [[Double]]) -> Double { x.joined().reduce(0) { $0 + $1 * $1 }.squareRoot() }
        func byLevel<T>(_ x: [T]) -> [String: T] { Dictionary(uniqueKeysWithValues: zip(names, x)) }
        let elapsed = ContinuousClock.now - start
        return DriftMetrics(
            version: version, klMean: b.klMean, klMax: b.klMax, top1Agreement: b.top1Agreement, probePositions: b.positions,
            forgettingPPL: forgetting, backboneForgettingPPL: backboneReferencePerplexity,
            forgettingPPLRatio: forgetting / backboneReferencePerplexity, personalizationPPL: userPersonal,
            backbonePersonalizationPPL: basePersonal, personalizationPPLRatio: userPersonal.flatMap { u in basePersonal.map { u / $0 } },
            paramNorm: total(levelNorms), levelNorms: byLevel(levelNorms), paramChange: changes.map(total),
            levelChanges: changes.map(byLevel), tokensLearned: byLevel(learner.tokenCounters),
            updatesApplied: byLevel(learner.updatesApplied), updatesRejected: byLevel(learner.updatesRejected),
            rejectedNonFinite: byLevel(learner.rejectedNonFinite), rejectedNorm: byLevel(learner.rejectedNorm),
            consolidations: learner.consolidations, jobsApplied: jobsApplied,
            seconds: Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) * 1e-18)
    }
}
