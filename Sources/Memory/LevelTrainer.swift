// LevelTrainer: the next-token loss over a user's learnable tokens and its
// gradients with respect to that user's level parameters only.
import Foundation
import Model
import Tensor

/// Computes losses and level gradients on the frozen backbone.
public struct LevelTrainer {
    public let model: LlamaModel

    public init(model: LlamaModel) {
        self.model = model
    }

    /// The outcome of one forward and backward pass.
    public struct Result {
        /// Σ −log p(target) over the learnable targets.
        public let totalLoss: Double
        /// Number of learnable targets.
        public let count: Int
        /// Gradients of the mean loss (totalLoss / count), shaped like `state.blocks`.
        public let gradients: [[LevelState.Block]]
    }

    /// Σ −log p over the learnable targets, and their count, without
    /// gradients (state nil: the bare backbone).
    public func loss(tokens: [Int], learnable: [Bool], state: LevelState?) throws -> (total: Double, count: Int) {
        precondition(learnable.count == tokens.count, "one learnable flag per token")
        let d = model.configuration.hiddenSize, v = model.configuration.vocabSize
        let normed = try model.hiddenStates([LlamaModel.Step(tokens: tokens, cache: model.makeCache(), adapter: state)])
        let rows = (0..<max(0, tokens.count - 1)).filter { learnable[$0 + 1] }
        var total = 0.0
        for r in rows {
            let logits = normed.withUnsafeBufferPointer { model.logits(hidden: $0.baseAddress! + r * d, count: 1) }
            total += logits.withUnsafeBufferPointer {
                LlamaModel.negativeLogLikelihood($0.baseAddress!, count: v, target: tokens[r + 1])
            }
        }
        return (total, rows.count)
    }

    /// Loss and gradients for `tokens` under `state`. `learnable[i]` says
    /// whether token i is a learnable target (predicted from tokens 0..<i);
    /// learnable[0] is ignored. Targets whose NLL is below `minSurprise`
    /// count in the loss but contribute no gradient (the gradients are those
    /// of Σ over the surprising targets / count).
    public func lossAndGradients(tokens: [Int], learnable: [Bool], state: LevelState,
                                 minSurprise: Double = 0) throws -> Result {
        precondition(learnable.count == tokens.count, "one learnable flag per token")
        let v = model.configuration.vocabSize
        let rows = (0..<max(0, tokens.count - 1)).filter { learnable[$0 + 1] }
        return try lossAndGradients(tokens: tokens, rows: rows, state: state) { i, logits in
            let target = tokens[rows[i] + 1]
            let nll = LlamaModel.negativeLogLikelihood(logits, count: v, target: target)
            if nll < minSurprise {
                for j in 0..<v { logits[j] = 0 }
            } else {
                Ops.softmax(logits, v)
                logits[target] -= 1
            }
            return nll
        }
    }

    /// Distillation: KL(teacher ‖ student) summed over `rows`, where
    /// teacher[i] is the teacher's next-token distribution at rows[i]; the
    /// gradients are the student's (`state`).
    ///   teacher: [rows.count][V]
    public func distillationGradients(tokens: [Int], rows: [Int], teacher: [[Float]], state: LevelState) throws -> Result {
        let v = model.configuration.vocabSize
        return try lossAndGradients(tokens: tokens, rows: rows, state: state) { i, logits in
            Ops.softmax(logits, v)
            var kl = 0.0
            for j in 0..<v {
                let p = Double(teacher[i][j])
                if p > 0 { kl += p * (log(p) - log(max(Double(logits[j]), 1e-30))) }
                logits[j] -= teacher[i][j]   // d KL / d logits = softmax − p
            }
            return kl
        }
    }

    /// The shared pass: forward with a tape, per-row loss and dL/dlogits from
    /// `rowLoss` (which overwrites the row's logits [V] with its gradient and
    /// returns the row's loss), mean over rows, backward into the levels.
    func lossAndGradients(tokens: [Int], rows: [Int], state: LevelState,
                          rowLoss: (Int, UnsafeMutablePointer<Float>) -> Double) throws -> Result {
        let d = model.configuration.hiddenSize, v = model.configuration.vocabSize, t = tokens.count
        let lowest = state.configuration.levels.flatMap(\.layers).min()!
        let tape = ActivationTape(fromLayer: lowest)
        let normed = try model.hiddenStates([LlamaModel.Step(tokens: tokens, cache: model.makeCache(), adapter: state)],
                                            tape: tape)
        var gradients = state.zeroGradients()
        guard !rows.isEmpty else { return Result(totalLoss: 0, count: 0, gradients: gradients) }
        let m = rows.count
        var hidden = [Float](repeating: 0, count: m * d)   // [m, D]
        for (i, r) in rows.enumerated() { for j in 0..<d { hidden[i * d + j] = normed[r * d + j] } }
        var dlogits = model.logits(hidden: hidden, count: m)   // [m, V], becomes dL/dlogits
        var total = 0.0
        dlogits.withUnsafeMutableBufferPointer { buf in
            for i in 0..<m { total += rowLoss(i, buf.baseAddress! + i * v) }
        }
        let inv = 1 / Float(m)
        for i in dlogits.indices { dlogits[i] *= inv }
        var dHidden = [Float](repeating: 0, count: m * d)
        model.weights.output.matmulBackward(dlogits, count: m, into: &dHidden)
        var dNormed = [Float](repeating: 0, count: t * d)
        for (i, r) in rows.enumerated() { for j in 0..<d { dNormed[r * d + j] = dHidden[i * d + j] } }
        model.backward(tape: tape, dNormed: dNormed) { layer, hin, dh in
            state.backward(layer: layer, hiddenIn: hin, rows: t, dHidden: dh, gradients: &gradients)
        }
        return Result(totalLoss: total, count: m, gradients: gradients)
    }
}
