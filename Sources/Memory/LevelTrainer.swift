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
        let rows = LearnableTokens.targets(learnable).map { $0 - 1 }   // row r predicts token r + 1
        var total = 0.0
        for r in rows {
            let logits = normed.withUnsafeBufferPointer { model.logits(hidden: $0.baseAddress! + r * d, count: 1) }
            total += logits.withUnsafeBufferPointer {
                LlamaModel.negativeLogLikelihood($0.baseAddress!, count: v, target: tokens[r + 1])
            }
        }
        return (total, rows.count)
    }

    /// Loss and gradients for `tokens` under `state`, as one piece from
    /// position 0 (no cache). `learnable[i]` says whether token i is a
    /// learnable target (predicted from tokens 0..<i); learnable[0] is
    /// ignored. Targets whose NLL is below `minSurprise` count in the loss
    /// but contribute no gradient (the gradients are those of Σ over the
    /// surprising targets / count).
    public func lossAndGradients(tokens: [Int], learnable: [Bool], state: LevelState,
                                 minSurprise: Double = 0) throws -> Result {
        precondition(learnable.count == tokens.count, "one learnable flag per token")
        let targets = LearnableTokens.targets(learnable)
        let stream = try stream(tokens: tokens, rows: max(1, targets.last ?? 1), state: state)
        return try lossAndGradients(stream, through: stream.rows, targets: targets, state: state, minSurprise: minSurprise)
    }

    /// Starts learning `tokens` in order (one request, or one window of a
    /// long one): runs the frozen layers below the lowest adapted layer once
    /// over rows 0..<rows, in one batched pass (they do not depend on the
    /// levels), and opens an empty cache for the adapted layers.
    public func stream(tokens: [Int], rows: Int, state: LevelState) throws -> LearningStream {
        guard !tokens.isEmpty else { throw ModelInputError.empty }
        precondition((1...tokens.count).contains(rows), "rows must be in 1...tokens.count")
        let c = model.configuration, d = c.hiddenSize
        let split = state.configuration.levels.flatMap(\.layers).min()!
        guard rows <= c.maxPositionEmbeddings else { throw ModelInputError.contextOverflow(needed: rows, limit: c.maxPositionEmbeddings) }
        var residuals = [Float]()
        residuals.reserveCapacity(rows * d)
        // Blocks of at most 512 rows bound the pass's activations.
        let lower = model.makeCache(layers: 0..<split)
        for from in stride(from: 0, to: rows, by: 512) {
            residuals += try model.residualStream(tokens: Array(tokens[from..<min(rows, from + 512)]), cache: lower, below: split)
        }
        return LearningStream(tokens: tokens, rows: rows, split: split, residuals: residuals,
                              cache: model.makeCache(layers: split..<c.numHiddenLayers))
    }

    /// The next piece of a stream: runs rows stream.processed..<end with the
    /// levels' current weights, attending to the cache of the rows before
    /// them (their keys and values as computed when those rows ran), and
    /// returns the loss over `targets` (token indices whose rows, target − 1,
    /// lie in the piece) with its level gradients. Gradients flow through
    /// the piece's own rows only, down to the lowest adapted layer; the
    /// cached keys and values are constants. Rows more than `gradientContext`
    /// before the piece's first target row run forward only, as cache (they
    /// bound the piece's tape). Afterwards the piece's rows are in the cache.
    ///   minSurprise: as in `lossAndGradients(tokens:…)`
    public func lossAndGradients(_ stream: LearningStream, through end: Int, targets: [Int], state: LevelState,
                                 minSurprise: Double = 0, gradientContext: Int? = nil) throws -> Result {
        let v = model.configuration.vocabSize, tokens = stream.tokens
        let rows = targets.map { $0 - 1 }
        return try lossAndGradients(stream, through: end, rows: rows, state: state, gradientContext: gradientContext) { i, logits in
            let target = tokens[rows[i] + 1]
            // One pass of exponentials gives the NLL (their sum in Double) and the softmax.
            var m = -Float.infinity
            for j in 0..<v where logits[j] > m { m = logits[j] }
            let shifted = Double(logits[target] - m)
            var sum = 0.0
            for j in 0..<v {
                let e = expf(logits[j] - m)
                logits[j] = e
                sum += Double(e)
            }
            let nll = log(sum) - shifted
            if nll < minSurprise { return (nll, false) }   // gated: no gradient (a NaN loss is not gated: its gradient is caught downstream)
            let inv = Float(1 / sum)
            for j in 0..<v { logits[j] *= inv }
            logits[target] -= 1
            return (nll, true)
        }
    }

    /// Distillation: KL(teacher ‖ student) summed over `rows`, where
    /// teacher[i] is the teacher's next-token distribution at rows[i]; the
    /// gradients are the student's (`state`), as one piece from position 0.
    ///   teacher: [rows.count][V]
    public func distillationGradients(tokens: [Int], rows: [Int], teacher: [[Float]], state: LevelState) throws -> Result {
        let v = model.configuration.vocabSize
        let stream = try stream(tokens: tokens, rows: (rows.max() ?? 0) + 1, state: state)
        return try lossAndGradients(stream, through: stream.rows, rows: rows, state: state, gradientContext: nil) { i, logits in
            Ops.softmax(logits, v)
            var kl = 0.0
            for j in 0..<v {
                let p = Double(teacher[i][j])
                if p > 0 { kl += p * (log(p) - log(max(Double(logits[j]), 1e-30))) }
                logits[j] -= teacher[i][j]   // d KL / d logits = softmax − p
            }
            return (kl, true)
        }
    }

    /// The shared pass over one piece of a stream: forward with a tape over
    /// the piece's rows, per-row loss and dL/dlogits from `rowLoss` (which
    /// returns the row's loss and whether it has a gradient, and if so
    /// overwrites the row's logits [V] with it), mean over rows, backward
    /// into the levels. Rows without a gradient (the surprise gate's) add
    /// nothing: the LM head's backward runs over the others only, and a
    /// piece without any has a zero gradient.
    ///   rows: absolute row indices in stream.processed..<end
    func lossAndGradients(_ stream: LearningStream, through end: Int, rows: [Int], state: LevelState,
                          gradientContext: Int?, rowLoss: (Int, UnsafeMutablePointer<Float>) -> (loss: Double, gradient: Bool)) throws -> Result {
        let d = model.configuration.hiddenSize, v = model.configuration.vocabSize
        precondition(end <= stream.rows && end > stream.processed, "a piece runs rows after the processed ones")
        precondition(rows.allSatisfy { (stream.processed..<end).contains($0) }, "a piece's loss rows lie in the piece")
        var gradients = state.zeroGradients()
        // Context that the tape need not hold: forward only, into the cache.
        if let context = gradientContext, let first = rows.min(), first - context > stream.processed {
            _ = try stream.run(model, to: first - context, adapter: state, tape: nil)
        }
        let from = stream.processed, t = end - from
        let tape = ActivationTape(fromLayer: stream.split)
        let normed = try stream.run(model, to: end, adapter: state, tape: tape)
        guard !rows.isEmpty else { return Result(totalLoss: 0, count: 0, gradients: gradients) }
        let m = rows.count
        var hidden = [Float](repeating: 0, count: m * d)   // [m, D]
        for (i, r) in rows.enumerated() { for j in 0..<d { hidden[i * d + j] = normed[(r - from) * d + j] } }
        var dlogits = model.logits(hidden: hidden, count: m)   // [m, V], becomes dL/dlogits
        var total = 0.0, active: [Int] = []   // the rows with a gradient
        dlogits.withUnsafeMutableBufferPointer { buf in
            for i in 0..<m {
                let row = rowLoss(i, buf.baseAddress! + i * v)
                total += row.loss
                if row.gradient { active.append(i) }
            }
        }
        guard !active.isEmpty else { return Result(totalLoss: total, count: m, gradients: gradients) }
        let inv = 1 / Float(m)
        dlogits.withUnsafeMutableBufferPointer { buf in   // the active rows to the front, scaled: [active, V]
            for (k, i) in active.enumerated() { for j in 0..<v { buf[k * v + j] = buf[i * v + j] * inv } }
        }
        var dHidden = [Float](repeating: 0, count: active.count * d)
        model.weights.output.matmulBackward(dlogits, count: active.count, into: &dHidden)
        var dNormed = [Float](repeating: 0, count: t * d)
        for (k, i) in active.enumerated() { for j in 0..<d { dNormed[(rows[i] - from) * d + j] = dHidden[k * d + j] } }
        model.backward(tape: tape, dNormed: dNormed) { layer, hin, dh in
            state.backward(layer: layer, hiddenIn: hin, rows: t, dHidden: dh, gradients: &gradients)
        }
        return Result(totalLoss: total, count: m, gradients: gradients)
    }
}

/// One request (or one window of a long request) being learned in order, as
/// streaming inference runs it: each row through the frozen layers below the
/// lowest adapted layer once (batched when the stream starts), and through
/// the adapted layers piece by piece, each piece attending to the cache of
/// the rows before it.
public final class LearningStream {
    public let tokens: [Int]
    /// Rows the stream will run (0..<rows; the last target is token `rows`).
    public let rows: Int
    /// The lowest adapted layer: the first layer run per piece.
    public let split: Int
    /// Rows run through the adapted layers so far (their keys and values are in `cache`).
    public private(set) var processed = 0
    /// [rows, D] the residual stream entering layer `split`.
    let residuals: [Float]
    /// Keys and values of layers split… for the processed rows.
    let cache: KVCache

    init(tokens: [Int], rows: Int, split: Int, residuals: [Float], cache: KVCache) {
        self.tokens = tokens
        self.rows = rows
        self.split = split
        self.residuals = residuals
        self.cache = cache
    }

    /// Runs rows processed..<end through the adapted layers with `adapter`,
    /// into the cache; returns their final-norm hidden states [end − processed, D].
    func run(_ model: LlamaModel, to end: Int, adapter: LevelState, tape: ActivationTape?) throws -> [Float] {
        let d = model.configuration.hiddenSize
        let out = try model.hiddenStates(from: split, residuals: Array(residuals[(processed * d)..<(end * d)]),
                                         LlamaModel.Step(tokens: Array(tokens[processed..<end]), cache: cache, adapter: adapter),
                                         tape: tape)
        processed = end
        return out
    }
}
