// LevelLearner: Nested Learning's Continuum Memory System update rule for one
// user's levels. Each level counts the user's learnable tokens; over each
// chunk of chunk_size tokens it accumulates the next-token-loss gradient at
// the level's weights as they were when the chunk started, and when the
// counter crosses a multiple of chunk_size it applies the summed gradient
// once (clipped, checked for NaN/Inf and the norm bound, then decayed by the
// level's retention) and restarts the accumulator.
//
// Learning semantics (streaming; ARCHITECTURE.md §1 "Learning semantics and
// cost"). A request's tokens are processed once, in order, as streaming
// inference processes them. Its targets are the tokens i ≥ 1 with
// learnable[i] (token 0 is never a target; row i − 1 predicts token i). They
// are cut into pieces at every level's chunk boundary. A piece is the rows
// from where the previous piece stopped up to its last target's row (rows
// after the request's last target are never run). It runs forward with the
// levels' weights as they are at its start — so within a chunk every
// gradient is taken at the chunk-start weights — attending to the KV cache
// of the request's earlier pieces, whose keys and values stay as they were
// computed when those pieces ran (with the weights then current). Its loss is
// the NLL of its targets (the surprise gate zeroes the gradient of targets
// already predicted within min_surprise nats); the backward runs through the
// piece's own rows only, from the loss down to the lowest adapted layer, and
// stops at the cached keys and values: they are constants, so no gradient
// reaches an earlier piece's rows. The piece's gradient, summed over its
// targets, joins each level's accumulator; a level whose counter reaches its
// chunk boundary applies its update before the next piece runs. The frozen
// layers below the lowest adapted layer do not depend on the levels: they
// run once per token, batched, when the request starts. Every request starts
// with an empty cache (an earlier request is not attended to). A piece from
// position 0 — all of a request shorter than the nearest chunk boundary —
// gets exactly the full-sequence gradient of LevelTrainer's
// lossAndGradients(tokens:…), which the PyTorch fixture checks.
//
// Bounds. A request longer than `contextWindow` tokens (default and at most
// the model's positions) is learned in windows of that many tokens, each
// starting at the previous window's last token with an empty cache (the
// windows `perplexity` scores), so each target is learned once. Rows of a
// piece that lie more than `gradientContext` (512) rows before its first
// target's row run forward only, into the cache, like an earlier piece's:
// that bounds the activations a piece keeps for its backward.
//
// Cost: one forward per token through every layer, plus the LM head and an
// activation-gradient backward through the adapted layers for the learnable
// rows (`continuum bench learn-cost`, BENCHMARKS.md).
import Foundation
import Model

/// One user's learning state: level weights, optimizer moments, gradient
/// accumulators and token counters.
public final class LevelLearner {
    public let state: LevelState
    public let trainer: LevelTrainer
    /// Learnable tokens each level has seen.
    public private(set) var tokenCounters: [Int]
    /// Σ of per-token gradients since each level's chunk started (shaped like state.blocks[level]).
    public private(set) var accumulators: [[LevelState.Block]]
    /// Tokens in each accumulator.
    public private(set) var accumulatedTokens: [Int]
    /// Moments per level, block and tensor (gain, gate, up, down).
    public private(set) var moments: [[[OptimizerMoments]]]
    /// Updates applied and rejected, per level.
    public private(set) var updatesApplied: [Int]
    public private(set) var updatesRejected: [Int]
    /// Of those, refused by the NaN/Inf guard and by the max_norm guard, per level.
    public private(set) var rejectedNonFinite: [Int]
    public private(set) var rejectedNorm: [Int]
    /// Per level: the open chunk met a non-finite gradient (or its sum
    /// overflowed), so its update will be rejected at the boundary. The
    /// accumulator then holds the finite part only, so a stored state is
    /// always finite.
    public private(set) var nonFiniteChunk: [Bool]
    /// Consolidations run.
    public private(set) var consolidations = 0
    /// The user's most recent requests' tokens (at most `recentLimit` tokens
    /// in all): the contexts consolidation distils on.
    public private(set) var recentTokens: [[Int]] = []
    public static let recentLimit = 2048
    /// How a request is cut into pieces and what each piece's gradient is.
    public enum Semantics: Sendable, Equatable {
        /// Each token once, in order; a piece attends to the cache of the
        /// request's earlier pieces, whose keys and values are constants
        /// (the file header). The default.
        case streaming
        /// The rule before streaming (issue 3), kept for benchmarks: each
        /// piece re-runs up to `context` tokens before its first target from
        /// scratch, with gradients through all of them — work that grows as
        /// tokens × context ÷ chunk.
        case recomputedPrefix(context: Int)
    }
    public var semantics = Semantics.streaming
    /// Longest stretch of a request learned with one cache (streaming): a
    /// longer request is learned in windows of this many tokens, each starting
    /// at the previous window's last token. At most the model's positions.
    public var contextWindow: Int
    /// Rows before a piece's first target row that take gradients (streaming);
    /// earlier unprocessed rows of the piece run forward only, as cache.
    public var gradientContext = 512

    public init(state: LevelState, model: LlamaModel) throws {
        self.state = state
        trainer = LevelTrainer(model: model)
        contextWindow = model.configuration.maxPositionEmbeddings
        let n = state.configuration.levels.count
        tokenCounters = [Int](repeating: 0, count: n)
        accumulatedTokens = tokenCounters
        updatesApplied = tokenCounters
        updatesRejected = tokenCounters
        rejectedNonFinite = tokenCounters
        rejectedNorm = tokenCounters
        nonFiniteChunk = [Bool](repeating: false, count: n)
        accumulators = state.zeroGradients()
        moments = zip(state.blocks, state.configuration.levels).map { blocks, level in
            blocks.map { b in b.tensors.map { OptimizerMoments(count: $0.count, kind: level.optimizer.kind) } }
        }
    }

    /// Learns from one request's tokens. `learnable[i]` marks token i as a
    /// learnable target. The request's learnable tokens are cut at every
    /// level's chunk boundary; each piece is run with the weights current at
    /// its start, so a level's gradient within a chunk is always taken at its
    /// chunk-start weights, and a request that spans several boundaries
    /// applies several updates. What a piece's gradient is: `semantics`.
    public func learn(tokens: [Int], learnable: [Bool]) throws {
        precondition(learnable.count == tokens.count)
        remember(tokens)
        switch semantics {
        case .streaming:
            let limit = trainer.model.configuration.maxPositionEmbeddings
            let window = max(2, min(contextWindow, limit))
            var start = 0
            while start < tokens.count - 1 {   // windows sharing one token
                let end = min(start + window, tokens.count)
                try learnStreaming(Array(tokens[start..<end]), learnable: Array(learnable[start..<end]))
                start = end - 1
            }
        case .recomputedPrefix(let context):
            let targets = LearnableTokens.targets(learnable)
            try learn(targets: targets) { piece in
                // The tokens up to the piece's last target, and at most
                // `context` tokens of context before its first, from scratch.
                let from = max(0, piece[0] - context), to = piece[piece.count - 1] + 1
                var mask = [Bool](repeating: false, count: to - from)
                for i in piece { mask[i - from] = true }
                return try trainer.lossAndGradients(tokens: Array(tokens[from..<to]), learnable: mask, state: state,
                                                    minSurprise: state.configuration.minSurprise)
            }
        }
    }

    /// One window of a request as a stream (its token 0 is not a target).
    private func learnStreaming(_ tokens: [Int], learnable: [Bool]) throws {
        let targets = LearnableTokens.targets(learnable)
        guard let last = targets.last else { return }
        let stream = try trainer.stream(tokens: tokens, rows: last, state: state)
        try learn(targets: targets) { piece in
            try trainer.lossAndGradients(stream, through: piece[piece.count - 1], targets: piece, state: state,
                                         minSurprise: state.configuration.minSurprise, gradientContext: gradientContext)
        }
    }

    /// The CMS rule over a request's targets (token indices, in order): cut
    /// at the nearest boundary of any level, each piece's gradient from
    /// `piece` (the mean over its targets), summed into every level's
    /// accumulator, each level's update applied at its boundary.
    private func learn(targets: [Int], piece: ([Int]) throws -> LevelTrainer.Result) throws {
        var next = 0
        while next < targets.count {
            // Tokens until the nearest boundary of any level.
            let room = state.configuration.levels.indices.map { l -> Int in
                let c = state.configuration.levels[l].chunkSize
                return c - tokenCounters[l] % c
            }.min()!
            let targetsOfPiece = Array(targets[next..<min(targets.count, next + room)])
            let result = try piece(targetsOfPiece)
            let scale = Float(result.count)   // mean → sum over the piece's tokens
            for l in accumulators.indices {
                // A non-finite gradient dooms the chunk's update; it is not kept.
                if let sum = Self.sum(accumulators[l], result.gradients[l], scale: scale) {
                    accumulators[l] = sum
                } else {
                    nonFiniteChunk[l] = true
                }
                tokenCounters[l] += targetsOfPiece.count
                accumulatedTokens[l] += targetsOfPiece.count
                if tokenCounters[l] % state.configuration.levels[l].chunkSize == 0 { applyUpdate(level: l) }
            }
            next += targetsOfPiece.count
        }
    }

    /// acc + scale · g, tensor by tensor, or nil when any sum is not finite.
    static func sum(_ acc: [LevelState.Block], _ g: [LevelState.Block], scale: Float) -> [LevelState.Block]? {
        var finite = true
        let out = zip(acc, g).map { a, b in
            LevelState.Block(tensors: zip(a.tensors, b.tensors).map { x, y in
                [Float](unsafeUninitializedCapacity: x.count) { buf, n in
                    x.withUnsafeBufferPointer { xs in
                        y.withUnsafeBufferPointer { ys in
                            var bad = false
                            for i in 0..<xs.count {
                                let s = xs[i] + scale * ys[i]
                                buf[i] = s
                                bad = bad || !s.isFinite
                            }
                            if bad { finite = false }
                        }
                    }
                    n = x.count
                }
            })
        }
        return finite ? out : nil
    }

    /// Applies level l's accumulated gradient (mean over its chunk), or
    /// rejects the step when any value would be non-finite or the output
    /// projection would exceed max_norm; either way the accumulator restarts.
    func applyUpdate(level l: Int) {
        let cfg = state.configuration.levels[l]
        defer {
            accumulators[l] = accumulators[l].map(\.zeros)
            accumulatedTokens[l] = 0
            nonFiniteChunk[l] = false
        }
        guard !nonFiniteChunk[l] else { return reject(l, nonFinite: true) }
        let n = Float(max(1, accumulatedTokens[l]))
        var grads = accumulators[l].map { b in b.tensors.map { t in t.map { $0 / n } } }
        let norm = grads.reduce(0.0) { total, block in
            block.reduce(total) { t, tensor in
                tensor.withUnsafeBufferPointer { b in b.reduce(t) { $0 + Double($1) * Double($1) } }
            }
        }.squareRoot()
        guard norm.isFinite else { return reject(l, nonFinite: true) }
        if cfg.gradientClip > 0 && norm > cfg.gradientClip {
            let s = Float(cfg.gradientClip / norm)
            grads = grads.map { $0.map { $0.map { $0 * s } } }
        }
        var newMoments = moments[l]
        var newBlocks = optimizerStep(level: l, blocks: state.blocks[l], gradients: grads, moments: &newMoments)
        // Retention pulls the learned contribution toward the start: the
        // output projection toward zero, gains toward one.
        let keep = Float(cfg.retention)
        if keep < 1 {
            for b in newBlocks.indices {
                newBlocks[b].gain = newBlocks[b].gain.map { 1 + keep * ($0 - 1) }
                newBlocks[b].down = newBlocks[b].down.map { keep * $0 }
            }
        }
        // The moments too: a second moment that overflowed would freeze its weights and could not be stored.
        guard newBlocks.allSatisfy(\.isFinite), newMoments.joined().allSatisfy(\.isFinite) else { return reject(l, nonFinite: true) }
        if cfg.maxNorm > 0 {
            let downNorm = newBlocks.reduce(0.0) { s, b in s + b.down.reduce(0.0) { $0 + Double($1) * Double($1) } }.squareRoot()
            guard downNorm <= cfg.maxNorm else { return reject(l, nonFinite: false) }
        }
        state.blocks[l] = newBlocks
        moments[l] = newMoments
        updatesApplied[l] += 1
    }

    /// One optimizer step of level l's optimizer on `blocks` (not committed).
    ///   gradients: per block, the tensors in `Block.tensors` order
    func optimizerStep(level l: Int, blocks: [LevelState.Block], gradients: [[[Float]]],
                       moments: inout [[OptimizerMoments]]) -> [LevelState.Block] {
        let cfg = state.configuration.levels[l]
        let shapes = state.tensorShapes(level: l)
        return blocks.indices.map { b in
            LevelState.Block(tensors: blocks[b].tensors.enumerated().map { k, p in
                cfg.optimizer.step(params: p, gradient: gradients[b][k], rows: shapes[k].rows, cols: shapes[k].cols,
                                   learningRate: cfg.learningRate, moments: &moments[b][k])
            })
        }
    }

    private func reject(_ l: Int, nonFinite: Bool) {
        updatesRejected[l] += 1
        if nonFinite { rejectedNonFinite[l] += 1 } else { rejectedNorm[l] += 1 }
    }

    /// Restores counters, accumulators and moments read from a saved state.
    func restore(tokenCounters: [Int], accumulators: [[LevelState.Block]], accumulatedTokens: [Int],
                 moments: [[[OptimizerMoments]]], updatesApplied: [Int], updatesRejected: [Int], consolidations: Int,
                 rejectedNonFinite: [Int]? = nil, rejectedNorm: [Int]? = nil, nonFiniteChunk: [Bool]? = nil) {
        self.nonFiniteChunk = nonFiniteChunk ?? tokenCounters.map { _ in false }
        self.tokenCounters = tokenCounters
        self.accumulators = accumulators
        self.accumulatedTokens = accumulatedTokens
        self.moments = moments
        self.updatesApplied = updatesApplied
        self.updatesRejected = updatesRejected
        // States written before the reasons were counted: all of a level's rejections under unknown.
        self.rejectedNonFinite = rejectedNonFinite ?? updatesRejected.map { _ in 0 }
        self.rejectedNorm = rejectedNorm ?? updatesRejected.map { _ in 0 }
        self.consolidations = consolidations
    }

    /// Restores the recent contexts read from a saved state.
    func restore(recentTokens: [[Int]]) {
        self.recentTokens = recentTokens
    }

    /// Keeps `tokens` among the recent contexts, dropping the oldest beyond
    /// the limit (an empty request is not kept, so there are never more than
    /// `recentLimit` contexts).
    func remember(_ tokens: [Int]) {
        guard !tokens.isEmpty else { return }
        recentTokens.append(Array(tokens.suffix(Self.recentLimit)))
        var total = recentTokens.reduce(0) { $0 + $1.count }
        while total > Self.recentLimit, recentTokens.count > 1 {
            total -= recentTokens.removeFirst().count
        }
    }

    /// After consolidation: level f starts over (empty chunk, fresh moments),
    /// the target level keeps the moments its distillation steps produced.
    func resetLevel(_ f: Int, targetMoments: (Int, [[OptimizerMoments]])) {
        accumulators[f] = accumulators[f].map(\.zeros)
        accumulatedTokens[f] = 0
        nonFiniteChunk[f] = false
        let kind = state.configuration.levels[f].optimizer.kind
        moments[f] = moments[f].map { $0.map { OptimizerMoments(count: $0.first.count, kind: kind) } }
        moments[targetMoments.0] = targetMoments.1
        consolidations += 1
    }

    /// Returns level l to how a new user's level starts: its initial weights
    /// (down projection zero, so it changes no output), fresh moments, an
    /// empty chunk and its counters at zero.
    public func reset(level l: Int) throws {
        let fresh = try LevelState(configuration: state.configuration, model: trainer.model.configuration)
        state.blocks[l] = fresh.blocks[l]
        accumulators[l] = accumulators[l].map(\.zeros)
        accumulatedTokens[l] = 0
        nonFiniteChunk[l] = false
        tokenCounters[l] = 0
        updatesApplied[l] = 0
        updatesRejected[l] = 0
        rejectedNonFinite[l] = 0
        rejectedNorm[l] = 0
        let kind = state.configuration.levels[l].optimizer.kind
        moments[l] = moments[l].map { $0.map { OptimizerMoments(count: $0.first.count, kind: kind) } }
    }

    /// For tests: replaces level l's accumulated gradient.
    func setAccumulator(level l: Int, to blocks: [LevelState.Block], tokens: Int) {
        accumulators[l] = blocks
        accumulatedTokens[l] = tokens
    }
}
