// LevelLearner: Nested Learning's Continuum Memory System update rule for one
// user's levels. Each level counts the user's learnable tokens; over each
// chunk of chunk_size tokens it accumulates the next-token-loss gradient at
// the level's weights as they were when the chunk started, and when the
// counter crosses a multiple of chunk_size it applies the summed gradient
// once (clipped, checked for NaN/Inf and the norm bound, then decayed by the
// level's retention) and restarts the accumulator.
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
    /// Tokens of context kept before each piece of a request when learning
    /// (a request is learned piece by piece between chunk boundaries, each
    /// piece with the weights current at its start).
    public var contextWindow = 512

    public init(state: LevelState, model: LlamaModel) throws {
        self.state = state
        trainer = LevelTrainer(model: model)
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
    /// applies several updates.
    public func learn(tokens: [Int], learnable: [Bool]) throws {
        precondition(learnable.count == tokens.count)
        remember(tokens)
        let targets = (1..<max(1, tokens.count)).filter { learnable[$0] }
        var next = 0
        while next < targets.count {
            // Tokens until the nearest boundary of any level.
            let room = state.configuration.levels.indices.map { l -> Int in
                let c = state.configuration.levels[l].chunkSize
                return c - tokenCounters[l] % c
            }.min()!
            let piece = Array(targets[next..<min(targets.count, next + room)])
            // Causality: the piece needs the tokens up to its last target,
            // and at most `contextWindow` tokens of context before its first.
            let from = max(0, piece[0] - contextWindow), to = piece[piece.count - 1] + 1
            var mask = [Bool](repeating: false, count: to - from)
            for i in piece { mask[i - from] = true }
            let result = try trainer.lossAndGradients(tokens: Array(tokens[from..<to]), learnable: mask, state: state,
                                                      minSurprise: state.configuration.minSurprise)
            let scale = Float(result.count)   // mean → sum over the piece's tokens
            for l in accumulators.indices {
                let sum = accumulators[l].indices.map { b in
                    LevelState.Block(tensors: zip(accumulators[l][b].tensors, result.gradients[l][b].tensors)
                        .map { acc, g in zip(acc, g).map { $0 + scale * $1 } })
                }
                // A non-finite gradient dooms the chunk's update; it is not kept.
                if sum.allSatisfy(\.isFinite) { accumulators[l] = sum } else { nonFiniteChunk[l] = true }
                tokenCounters[l] += piece.count
                accumulatedTokens[l] += piece.count
                if tokenCounters[l] % state.configuration.levels[l].chunkSize == 0 { applyUpdate(level: l) }
            }
            next += piece.count
        }
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
        let norm = grads.joined().joined().reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot()
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
