// Consolidation ("sleep"): moves what the fast level holds into a slower
// level by on-policy distillation, then clears the fast level.
//
// Teacher A = backbone + every level as it is. Student B = backbone + the same
// levels with the fast level's contribution removed; only B's target level
// learns. With `transplant`, B's target level starts from a closed-form
// write of the fast level's units into its least-used units (see
// `transplant(from:into:)`), so what the fast level held is kept before any
// step, and the steps only correct what the write changed. The texts are the user's recent contexts, each continued by A
// itself (on-policy); B is trained to match A's next-token distributions on
// them (KL(A ‖ B)). Afterwards the target level keeps B's weights and the fast
// level starts over (zero output projection, fresh moments, empty chunk).
import Foundation
import Model
import Tensor

/// How much work one consolidation may do.
public struct ConsolidationBudget: Sendable {
    /// Optimizer steps on the target level (one text per step, round robin).
    public var steps: Int = 16
    /// Tokens the teacher generates after each context.
    public var generatedTokens: Int = 32

    public init(steps: Int = 16, generatedTokens: Int = 32) {
        self.steps = steps
        self.generatedTokens = generatedTokens
    }
}

/// What a consolidation did.
public struct ConsolidationReport: Sendable {
    /// Mean KL(A ‖ B) per position over the texts, before and after training B.
    public let klBefore: Double
    public let klAfter: Double
    public let steps: Int
    public let positions: Int
    /// Units written by a transplant (0 without one).
    public var written = 0

    /// Whether the consolidation changed the target level.
    public var changed: Bool { steps > 0 || written > 0 }
}

extension LevelLearner {
    /// Consolidates the configuration's fastest level into the next slower
    /// one (`LevelConfiguration.consolidation`) within `budget`.
    public func consolidate(contexts: [[Int]], budget: ConsolidationBudget = ConsolidationBudget()) throws -> ConsolidationReport {
        guard let pair = state.configuration.consolidation else {
            throw LevelConfiguration.Invalid(description: "consolidation needs at least two levels")
        }
        return try consolidate(contexts: contexts, level: pair.source, into: pair.target, budget: budget)
    }

    /// Consolidates level `f` into level `m` (indices into the configuration's
    /// levels) within `budget`; with `transplant`, the student's level `m`
    /// first takes level `f`'s units (`transplant(from:into:)`).
    public func consolidate(contexts: [[Int]], level f: Int, into m: Int, budget: ConsolidationBudget,
                            transplant: Bool = false) throws -> ConsolidationReport {
        let levels = state.configuration.levels
        guard levels.indices.contains(f), levels.indices.contains(m), f != m else {
            throw LevelConfiguration.Invalid(description: "consolidation needs two different levels of the configuration")
        }
        let model = trainer.model
        let limit = model.configuration.maxPositionEmbeddings
        // A text is at least one token of context and the generated ones, within the model's positions.
        guard budget.steps >= 0, (0...(limit - 2)).contains(budget.generatedTokens) else {
            throw LevelConfiguration.Invalid(description: "consolidation needs steps ≥ 0 and generated tokens in 0...\(limit - 2), got \(budget.steps) and \(budget.generatedTokens)")
        }
        // On-policy texts: each context continued greedily by the teacher.
        var greedy = SamplingParameters()
        greedy.temperature = 0
        greedy.maxTokens = budget.generatedTokens
        var texts: [[Int]] = []
        for c in contexts where c.count >= 1 {
            let context = Array(c.suffix(limit - budget.generatedTokens - 1))
            let continuation = budget.generatedTokens > 0
                ? try Generator(model: model, adapter: state).generate(prompt: context, parameters: greedy).tokens : []
            if context.count + continuation.count >= 2 { texts.append(context + continuation) }
        }
        guard !texts.isEmpty else {
            // Nothing to distil on; a transplant needs no text (no KL to report).
            guard transplant else { return ConsolidationReport(klBefore: 0, klAfter: 0, steps: 0, positions: 0) }
            let student = try silencedStudent(level: f)
            var moments = self.moments[m]
            let written = Self.transplant(state, from: f, into: student, level: m, moments: &moments)
            if written > 0 { try commit(student, level: f, into: m, moments: moments) }
            var report = ConsolidationReport(klBefore: 0, klAfter: 0, steps: 0, positions: 0)
            report.written = written
            return report
        }
        // The teacher's distributions at every position but the last.
        let teacher = try texts.map { try distributions(tokens: $0, rows: Array(0..<($0.count - 1)), adapter: state) }
        let student = try silencedStudent(level: f)
        var moments = self.moments[m]
        func meanKL() throws -> Double {
            var total = 0.0, count = 0
            for (text, p) in zip(texts, teacher) {
                total += try trainer.distillationGradients(tokens: text, rows: Array(0..<(text.count - 1)), teacher: p,
                                                           state: student).totalLoss
                count += text.count - 1
            }
            return total / Double(count)
        }
        // KL before: the student without the fast level, as a reset would leave it.
        let before = try meanKL()
        let written = transplant ? Self.transplant(state, from: f, into: student, level: m, moments: &moments) : 0
        for step in 0..<budget.steps {
            let i = step % texts.count
            let g = try trainer.distillationGradients(tokens: texts[i], rows: Array(0..<(texts[i].count - 1)),
                                                      teacher: teacher[i], state: student).gradients[m]
            guardedStep(student, level: m, gradients: g.map(\.tensors), moments: &moments)
        }
        let after = try meanKL()
        try commit(student, level: f, into: m, moments: moments)
        var report = ConsolidationReport(klBefore: before, klAfter: after, steps: budget.steps,
                                         positions: texts.reduce(0) { $0 + $1.count - 1 })
        report.written = written
        return report
    }

    /// The teacher's next-token distributions at `rows` of `tokens` under `adapter`: [rows.count][V].
    func distributions(tokens: [Int], rows: [Int], adapter: LevelState?) throws -> [[Float]] {
        let model = trainer.model, v = model.configuration.vocabSize, d = model.configuration.hiddenSize
        let normed = try model.hiddenStates([LlamaModel.Step(tokens: tokens, cache: model.makeCache(), adapter: adapter)])
        return rows.map { r in
            var p = normed.withUnsafeBufferPointer { model.logits(hidden: $0.baseAddress! + r * d, count: 1) }
            p.withUnsafeMutableBufferPointer { Ops.softmax($0.baseAddress!, v) }
            return p
        }
    }

    /// The closed-form write of a consolidation with `transplant`: in each
    /// layer both levels adapt, level `f`'s units (gate and up rows, down
    /// column), strongest first, replace `student`'s level-`m` units that
    /// contribute least (unused ones first) while they are stronger than the
    /// unit they replace: level m keeps the strongest units of both, so an
    /// earlier consolidation's units survive until stronger ones need room.
    /// A unit's strength is ‖down[:, j]‖·‖up[j, :]‖ (zero for an unused unit;
    /// a fast unit's up row as rescaled into level m);
    /// its input weights are rescaled from level f's gains to level m's
    /// (gate[j, d]·g_f[d] / g_m[d]), so the written unit computes what it did
    /// in level f, but on RMSNorm(h) rather than on RMSNorm(h + level m's
    /// output): the difference is what the distillation steps then correct.
    /// The written units' optimizer moments start at zero. Returns the units written.
    @discardableResult
    static func transplant(_ source: LevelState, from f: Int, into student: LevelState, level m: Int,
                           moments: inout [[OptimizerMoments]]) -> Int {
        let levels = source.configuration.levels, d = source.hiddenSize
        let rf = levels[f].width, rm = levels[m].width
        var written = 0
        for (bf, layer) in levels[f].layers.enumerated() {
            guard let bm = levels[m].layers.firstIndex(of: layer) else { continue }
            let fast = source.blocks[f][bf]
            var mid = student.blocks[m][bm]
            // Gains: level m's, kept away from zero so the rescaling stays finite.
            let scale = (0..<d).map { i -> Float in
                let gm = mid.gain[i], floor: Float = 1e-2
                return fast.gain[i] / (abs(gm) < floor ? (gm < 0 ? -floor : floor) : gm)
            }
            // strength[j] = ‖down[:, j]‖·‖up[j, :] ⊙ s‖, down [D, R], up [R, D]
            // (s: the input rescaling a unit gets in level m; 1 for m's own).
            func strength(_ b: LevelState.Block, _ r: Int, _ s: [Float]?) -> [Float] {
                (0..<r).map { j in
                    var dn: Float = 0, un: Float = 0
                    for i in 0..<d {
                        let u = b.up[j * d + i] * (s?[i] ?? 1)
                        dn += b.down[i * r + j] * b.down[i * r + j]
                        un += u * u
                    }
                    return (dn * un).squareRoot()
                }
            }
            let fs = strength(fast, rf, scale), ms = strength(mid, rm, nil)
            // Level m keeps its rm strongest units of both: fast's strongest
            // replace m's weakest while they are stronger (earlier nights'
            // units are kept unless something stronger needs their slot).
            let incoming = (0..<rf).filter { fs[$0] > 0 }.sorted { fs[$0] > fs[$1] }
            let weakest = (0..<rm).sorted { ms[$0] < ms[$1] }
            let pairs = zip(incoming, weakest).prefix { fs[$0.0] > ms[$0.1] }
            for (j, slot) in pairs {
                for i in 0..<d {
                    mid.gate[slot * d + i] = fast.gate[j * d + i] * scale[i]
                    mid.up[slot * d + i] = fast.up[j * d + i] * scale[i]
                    mid.down[i * rm + slot] = fast.down[i * rf + j]
                }
                // Moments of the written rows and column: [gain, gate, up, down].
                for (t, indices) in [(1, (0..<d).map { slot * d + $0 }), (2, (0..<d).map { slot * d + $0 }),
                                     (3, (0..<d).map { $0 * rm + slot })] {
                    var mo = moments[bm][t]
                    for k in indices {
                        if k < mo.first.count { mo.first[k] = 0 }
                        if k < mo.second.count { mo.second[k] = 0 }
                        if k < mo.slow.count { mo.slow[k] = 0 }
                        if k < mo.slowDirection.count { mo.slowDirection[k] = 0 }
                        if k < mo.slowSum.count { mo.slowSum[k] = 0 }
                    }
                    moments[bm][t] = mo
                }
                written += 1
            }
            student.blocks[m][bm] = mid
        }
        return written
    }

    /// The student of a consolidation: the same levels, level `f` silenced (its output projection zero).
    func silencedStudent(level f: Int) throws -> LevelState {
        let student = try LevelState(configuration: state.configuration, model: trainer.model.configuration)
        student.blocks = state.blocks
        for b in student.blocks[f].indices {
            student.blocks[f][b].down = student.blocks[f][b].down.map { _ in 0 }
        }
        return student
    }

    /// One optimizer step on the student's level `m`, behind the NaN/Inf
    /// guard (weights and moments): a bad step leaves the student as it was.
    func guardedStep(_ student: LevelState, level m: Int, gradients: [[[Float]]], moments: inout [[OptimizerMoments]]) {
        var trial = moments
        let blocks = optimizerStep(level: m, blocks: student.blocks[m], gradients: gradients, moments: &trial)
        if blocks.allSatisfy(\.isFinite), trial.joined().allSatisfy(\.isFinite) {
            student.blocks[m] = blocks
            moments = trial
        }
    }

    /// Commit: level `m` keeps the student's weights and moments, level `f` starts over.
    func commit(_ student: LevelState, level f: Int, into m: Int, moments: [[OptimizerMoments]]) throws {
        let fresh = try LevelState(configuration: state.configuration, model: trainer.model.configuration)
        state.blocks[m] = student.blocks[m]
        state.blocks[f] = fresh.blocks[f]
        resetLevel(f, targetMoments: (m, moments))
    }
}
