// Consolidation ("sleep"): moves what the fast level holds into a slower
// level by on-policy distillation, then clears the fast level.
//
// Teacher A = backbone + every level as it is. Student B = backbone + the same
// levels with the fast level's contribution removed; only B's target level
// learns. The texts are the user's recent contexts, each continued by A
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

    /// Consolidates level `f` into level `m` (indices into the configuration's levels) within `budget`.
    public func consolidate(contexts: [[Int]], level f: Int, into m: Int, budget: ConsolidationBudget) throws -> ConsolidationReport {
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
        guard !texts.isEmpty else { return ConsolidationReport(klBefore: 0, klAfter: 0, steps: 0, positions: 0) }
        // The teacher's distributions at every position but the last.
        let teacher = try texts.map { try distributions(tokens: $0, rows: Array(0..<($0.count - 1)), adapter: state) }
        let student = try silencedStudent(level: f)
        func meanKL() throws -> Double {
            var total = 0.0, count = 0
            for (text, p) in zip(texts, teacher) {
                total += try trainer.distillationGradients(tokens: text, rows: Array(0..<(text.count - 1)), teacher: p,
                                                           state: student).totalLoss
                count += text.count - 1
            }
            return total / Double(count)
        }
        let before = try meanKL()
        var moments = self.moments[m]
        for step in 0..<budget.steps {
            let i = step % texts.count
            let g = try trainer.distillationGradients(tokens: texts[i], rows: Array(0..<(texts[i].count - 1)),
                                                      teacher: teacher[i], state: student).gradients[m]
            guardedStep(student, level: m, gradients: g.map(\.tensors), moments: &moments)
        }
        let after = try meanKL()
        try commit(student, level: f, into: m, moments: moments)
        return ConsolidationReport(klBefore: before, klAfter: after, steps: budget.steps,
                                   positions: texts.reduce(0) { $0 + $1.count - 1 })
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
