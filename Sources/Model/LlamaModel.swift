// LlamaModel: the Llama-family decoder forward pass over a batch of
// independent sequences, each with its own KV cache.
//
// Shape letters: T tokens in the step (all sequences), D hidden size,
// H query heads, KVH key/value heads, HS head size, F MLP width, V vocabulary.
import Digest
import Foundation
import Tensor

/// Weights of one decoder block (read-only, shared by every sequence).
public struct LlamaLayerWeights: Sendable {
    public let attentionNorm: [Float]   // [D]
    public let wq: WeightMatrix         // [H*HS, D]
    public let wk: WeightMatrix         // [KVH*HS, D]
    public let wv: WeightMatrix         // [KVH*HS, D]
    public let wo: WeightMatrix         // [D, H*HS]
    public let mlpNorm: [Float]         // [D]
    public let wGate: WeightMatrix      // [F, D]
    public let wUp: WeightMatrix        // [F, D]
    public let wDown: WeightMatrix      // [D, F]
}

/// All weights of the model.
public struct LlamaWeights: Sendable {
    public let tokenEmbedding: WeightMatrix   // [V, D]
    public let layers: [LlamaLayerWeights]
    public let outputNorm: [Float]            // [D]
    public let output: WeightMatrix           // [V, D] (the embedding when tied)

    /// Every matrix a token is multiplied with (the embedding is a lookup).
    public var matmulWeights: [WeightMatrix] {
        layers.flatMap { [$0.wq, $0.wk, $0.wv, $0.wo, $0.wGate, $0.wUp, $0.wDown] } + [output]
    }

    /// Bytes of weight data read for one decode step.
    public var bytesPerToken: Int { matmulWeights.reduce(0) { $0 + $1.byteCount } }

    /// Multiply-adds per token in the weight matrix products (FLOP/token is twice this).
    public var multiplyAddsPerToken: Int { matmulWeights.reduce(0) { $0 + $1.rows * $1.cols } }
}

/// Errors of running the model on bad input.
public enum ModelInputError: Error, CustomStringConvertible, Equatable {
    case tokenOutOfRange(Int, vocabulary: Int)
    case contextOverflow(needed: Int, limit: Int)
    case empty

    public var description: String {
        switch self {
        case .tokenOutOfRange(let t, let v): "token id \(t) is outside the vocabulary (0..<\(v))"
        case .contextOverflow(let n, let l): "sequence of \(n) tokens exceeds the model's context of \(l)"
        case .empty: "no tokens to run"
        }
    }
}

/// Blocks a sequence adds to the residual stream after a layer's frozen MLP:
/// h ← h + f(h). Continuum's memory levels implement this per user.
public protocol LayerAdapter {
    /// Whether `apply` changes layer `layer`'s output at all (false skips it,
    /// keeping the backbone's arithmetic bit for bit).
    func adapts(layer: Int) -> Bool
    /// Updates the sequence's rows in place.
    ///   hidden: [rows, D] residual stream after layer `layer`'s MLP
    func apply(layer: Int, hidden: UnsafeMutablePointer<Float>, rows: Int)
}

/// Activations of one layer kept for the backward pass (all [T, ·], row-major).
public struct LayerActivations {
    public var xIn: [Float] = []       // [T, D] residual stream entering the layer
    public var xn1: [Float] = []       // [T, D] attention RMSNorm output
    public var q: [Float] = []         // [T, H*HS] after RoPE (keys and values are in the tape's cache)
    public var att: [Float] = []       // [T, H*HS] attention output before W_o
    public var xMid: [Float] = []      // [T, D] after the attention residual
    public var xn2: [Float] = []       // [T, D] MLP RMSNorm output
    public var gate: [Float] = []      // [T, F] before SiLU
    public var up: [Float] = []        // [T, F]
    public var xPostMLP: [Float] = []  // [T, D] after the MLP residual, before any adapter
}

/// What a forward pass records for backpropagation down to layer
/// `fromLayer`'s adapter (the lowest layer whose blocks take gradients: of
/// that layer only the post-MLP stream is kept), for one sequence's new rows
/// at `positions` (from `start`, after the `start` rows already in `cache`).
public final class ActivationTape {
    public let fromLayer: Int
    public var layers: [Int: LayerActivations] = [:]
    /// [T, D] the residual stream before the final norm.
    public var finalHidden: [Float] = []
    public var positions: [Int] = []
    /// The sequence's cache after the forward: keys and values of positions
    /// 0..<start (earlier rows, constants for the backward) and of the new
    /// rows (positions start..<start+T).
    public internal(set) var cache: KVCache?
    public var start: Int { positions.first ?? 0 }

    public init(fromLayer: Int) {
        self.fromLayer = fromLayer
    }
}

/// A loaded Llama-family model: configuration, weights, tokenizer.
public final class LlamaModel: Sendable {
    public let configuration: LlamaConfiguration
    public let weights: LlamaWeights
    public let tokenizer: Tokenizer
    public let chatTemplate: ChatTemplate
    public let rope: Rope
    /// Where the model was loaded from.
    public let source: String

    public init(configuration: LlamaConfiguration, weights: LlamaWeights, tokenizer: Tokenizer,
                chatTemplate: ChatTemplate, ropeLayout: Rope.Layout, source: String) {
        self.configuration = configuration
        self.weights = weights
        self.tokenizer = tokenizer
        self.chatTemplate = chatTemplate
        self.source = source
        rope = Rope(headSize: configuration.headDim, base: configuration.ropeTheta, layout: ropeLayout)
    }

    /// Identifies the backbone's weights: SHA-256 over the configuration and
    /// the first 256 bytes of every weight matrix and norm (cheap, and
    /// different for any other checkpoint or quantisation).
    public var fingerprint: String {
        var h = SHA256()
        let c = configuration
        h.update(Array("\(c.hiddenSize) \(c.intermediateSize) \(c.numHiddenLayers) \(c.numAttentionHeads) \(c.numKeyValueHeads) \(c.vocabSize) \(c.ropeTheta) \(c.rmsNormEps)".utf8))
        for w in weights.matmulWeights + [weights.tokenEmbedding] {
            h.update(Array(Array(UnsafeRawBufferPointer(start: w.data, count: min(256, w.byteCount)))))
            h.update(Array("\(w.type) \(w.rows) \(w.cols)".utf8))
        }
        for norm in weights.layers.flatMap({ [$0.attentionNorm, $0.mlpNorm] }) + [weights.outputNorm] {
            norm.withUnsafeBytes { h.update($0) }
        }
        return "sha256:" + h.finalizeHex()
    }

    /// A fresh, empty cache for one sequence.
    public func makeCache() -> KVCache {
        makeCache(layers: 0..<configuration.numHiddenLayers)
    }

    /// A fresh cache holding only `layers` (for a pass that runs just those).
    public func makeCache(layers: Range<Int>) -> KVCache {
        KVCache(layers: layers.upperBound, kvDim: configuration.keyValueDim,
                maxLength: configuration.maxPositionEmbeddings, firstLayer: layers.lowerBound)
    }

    /// One sequence's part of a batched step.
    public struct Step {
        public var tokens: [Int]
        public var cache: KVCache
        /// Per-sequence blocks applied after the frozen MLP of some layers
        /// (a user's continuum memory levels); nil runs the bare backbone.
        public var adapter: (any LayerAdapter)?
        public init(tokens: [Int], cache: KVCache, adapter: (any LayerAdapter)? = nil) {
            self.tokens = tokens
            self.cache = cache
            self.adapter = adapter
        }
    }

    /// Runs every sequence's new tokens through the model in one step (their
    /// rows share each weight matrix product), appends them to the caches, and
    /// returns the final-norm hidden states: [T, D], sequences in order.
    public func hiddenStates(_ steps: [Step]) throws -> [Float] {
        try hiddenStates(steps, tape: nil)
    }

    /// `hiddenStates`, recording into `tape` what the backward pass needs
    /// for layers from `tape.fromLayer` up (one sequence; its cache may hold
    /// earlier rows, which the tape's rows attend to).
    public func hiddenStates(_ steps: [Step], tape: ActivationTape?) throws -> [Float] {
        var x = try embed(steps)
        try run(steps, x: &x, layers: 0..<configuration.numHiddenLayers, tape: tape)
        return finalNorm(x)
    }

    /// The residual stream entering layer `layer` for one sequence's new
    /// tokens (after layers 0..<layer; the embeddings when `layer` is 0),
    /// appending those layers' keys and values to `cache`, which then
    /// advances by the tokens: [T, D]. `hiddenStates(from:…)` continues it.
    public func residualStream(tokens: [Int], cache: KVCache, below layer: Int) throws -> [Float] {
        let steps = [Step(tokens: tokens, cache: cache)]
        var x = try embed(steps)
        try run(steps, x: &x, layers: 0..<layer, tape: nil)
        return x
    }

    /// Runs layers `layer`… of one sequence from the residual stream
    /// entering `layer` ([T, D], for `step.tokens`), appending those layers'
    /// keys and values to `step.cache` (which must hold them, and advances
    /// by the tokens), recording into `tape` if given; returns the
    /// final-norm hidden states [T, D]. With `residualStream(…, below:
    /// layer)` it computes exactly what `hiddenStates` does in one pass.
    public func hiddenStates(from layer: Int, residuals: [Float], _ step: Step, tape: ActivationTape?) throws -> [Float] {
        let d = configuration.hiddenSize
        precondition(residuals.count == step.tokens.count * d, "one residual row per token")
        precondition(tape.map { $0.fromLayer >= layer } ?? true, "the tape's layers must be run")
        var x = residuals
        try run([step], x: &x, layers: layer..<configuration.numHiddenLayers, tape: tape)
        return finalNorm(x)
    }

    /// Checks the steps' tokens and returns their embeddings [T, D].
    private func embed(_ steps: [Step]) throws -> [Float] {
        let c = configuration, d = c.hiddenSize
        let t = steps.reduce(0) { $0 + $1.tokens.count }
        guard t > 0 else { throw ModelInputError.empty }
        for s in steps {
            for tok in s.tokens where tok < 0 || tok >= c.vocabSize {
                throw ModelInputError.tokenOutOfRange(tok, vocabulary: c.vocabSize)
            }
        }
        var x = [Float](repeating: 0, count: t * d)
        x.withUnsafeMutableBufferPointer { xb in
            var row = 0
            for s in steps {
                for tok in s.tokens {
                    weights.tokenEmbedding.row(tok, into: xb.baseAddress! + row * d)
                    row += 1
                }
            }
        }
        return x
    }

    /// Final RMSNorm of the residual stream: [T, D] → [T, D].
    private func finalNorm(_ x: [Float]) -> [Float] {
        let d = configuration.hiddenSize
        var xn = [Float](repeating: 0, count: x.count)
        Ops.rmsNorm(x, weight: weights.outputNorm, eps: configuration.rmsNormEps, rows: x.count / d, dim: d, out: &xn)
        return xn
    }

    /// Runs `layers` over every step's new rows (the residual stream x,
    /// [T, D], in place), appends their keys and values to the caches at
    /// each cache's count, then advances the caches.
    private func run(_ steps: [Step], x: inout [Float], layers: Range<Int>, tape: ActivationTape?) throws {
        if tape != nil { precondition(steps.count == 1, "a tape records one sequence") }
        let c = configuration
        let d = c.hiddenSize, qDim = c.queryDim, kvDim = c.keyValueDim, f = c.intermediateSize
        let t = steps.reduce(0) { $0 + $1.tokens.count }
        guard t > 0 else { throw ModelInputError.empty }
        precondition(x.count == t * d)
        // Each sequence's rows: products give every sequence the bits it gets alone.
        let segments = steps.map(\.tokens.count)
        var positions: [Int] = []
        positions.reserveCapacity(t)
        for s in steps {
            let needed = s.cache.count + s.tokens.count
            guard needed <= s.cache.maxLength else { throw ModelInputError.contextOverflow(needed: needed, limit: s.cache.maxLength) }
            positions += (s.cache.count..<needed)
        }
        // Activations: x [T, D] residual stream; xn [T, D]; q [T, H*HS];
        // k, v [T, KVH*HS]; att [T, H*HS]; gate, up [T, F]; proj [T, D].
        var xn = [Float](repeating: 0, count: t * d), proj = xn
        var q = [Float](repeating: 0, count: t * qDim), att = q
        var k = [Float](repeating: 0, count: t * kvDim), v = k
        var gate = [Float](repeating: 0, count: t * f), up = gate
        for s in steps { s.cache.reserve(s.tokens.count) }
        for l in layers {
            let w = weights.layers[l]
            let record = tape.map { l >= $0.fromLayer } ?? false
            // The lowest taped layer's backward stops at its adapter: only its
            // post-MLP stream is needed.
            let full = record && l > tape!.fromLayer
            var acts = LayerActivations()
            if full { acts.xIn = x }
            // Attention block.
            Ops.rmsNorm(x, weight: w.attentionNorm, eps: c.rmsNormEps, rows: t, dim: d, out: &xn)
            if full { acts.xn1 = xn }
            q.withUnsafeMutableBufferPointer { qb in
                k.withUnsafeMutableBufferPointer { kb in
                    v.withUnsafeMutableBufferPointer { vb in
                        WeightMatrix.matmul([w.wq, w.wk, w.wv], xn, segments: segments, into: [qb.baseAddress!, kb.baseAddress!, vb.baseAddress!])
                    }
                }
            }
            q.withUnsafeMutableBufferPointer { rope.apply($0.baseAddress!, positions: positions, heads: c.numAttentionHeads) }
            k.withUnsafeMutableBufferPointer { rope.apply($0.baseAddress!, positions: positions, heads: c.numKeyValueHeads) }
            if full { acts.q = q }
            // Append to the caches; prompts attend one by one (sgemm), the
            // sequences' few new tokens all in one parallel pass.
            var decoding: [Attention.Query] = []
            q.withUnsafeBufferPointer { qb in
                att.withUnsafeMutableBufferPointer { ab in
                    var row = 0
                    for s in steps {
                        let n = s.tokens.count, start = s.cache.count
                        let kc = s.cache.keys(l), vc = s.cache.values(l)
                        k.withUnsafeBufferPointer { kc.advanced(by: start * kvDim).update(from: $0.baseAddress! + row * kvDim, count: n * kvDim) }
                        v.withUnsafeBufferPointer { vc.advanced(by: start * kvDim).update(from: $0.baseAddress! + row * kvDim, count: n * kvDim) }
                        if n >= Attention.prefillTokens {
                            Attention.causal(q: qb.baseAddress! + row * qDim, k: kc, v: vc, tokens: n, start: start,
                                             heads: c.numAttentionHeads, kvHeads: c.numKeyValueHeads, headSize: c.headDim,
                                             out: ab.baseAddress! + row * qDim)
                        } else {
                            decoding.append(Attention.Query(q: qb.baseAddress! + row * qDim, k: kc, v: vc, tokens: n,
                                                            start: start, out: ab.baseAddress! + row * qDim))
                        }
                        row += n
                    }
                    if !decoding.isEmpty {
                        Attention.decode(decoding, heads: c.numAttentionHeads, kvHeads: c.numKeyValueHeads, headSize: c.headDim)
                    }
                }
            }
            proj.withUnsafeMutableBufferPointer { WeightMatrix.matmul([w.wo], att, segments: segments, into: [$0.baseAddress!]) }
            Ops.add(proj, into: &x, t * d)
            if full {
                acts.att = att
                acts.xMid = x
            }
            // MLP block.
            Ops.rmsNorm(x, weight: w.mlpNorm, eps: c.rmsNormEps, rows: t, dim: d, out: &xn)
            gate.withUnsafeMutableBufferPointer { gb in
                up.withUnsafeMutableBufferPointer { ub in
                    WeightMatrix.matmul([w.wGate, w.wUp], xn, segments: segments, into: [gb.baseAddress!, ub.baseAddress!])
                }
            }
            if full {
                acts.xn2 = xn
                acts.gate = gate
                acts.up = up
            }
            Ops.swiglu(gate: &gate, up: up, count: t * f)
            proj.withUnsafeMutableBufferPointer { WeightMatrix.matmul([w.wDown], gate, segments: segments, into: [$0.baseAddress!]) }
            Ops.add(proj, into: &x, t * d)
            if record {
                acts.xPostMLP = x
                tape!.layers[l] = acts
            }
            // Each sequence's own blocks on its own rows.
            var first = 0
            for s in steps {
                if let a = s.adapter, a.adapts(layer: l) {
                    x.withUnsafeMutableBufferPointer { a.apply(layer: l, hidden: $0.baseAddress! + first * d, rows: s.tokens.count) }
                }
                first += s.tokens.count
            }
        }
        for s in steps { s.cache.advance(s.tokens.count) }
        if let tape {
            tape.finalHidden = x
            tape.positions = positions
            tape.cache = steps[0].cache
        }
    }

    /// Logits for rows of final hidden states.
    ///   hidden: [n, D]  →  [n, V]
    public func logits(hidden: UnsafePointer<Float>, count n: Int) -> [Float] {
        var out = [Float](repeating: 0, count: n * configuration.vocabSize)
        weights.output.matmul(hidden, count: n, into: &out)
        return out
    }

    /// Runs the steps and returns each sequence's logits for its last new
    /// token: one [V] array per step.
    public func forward(_ steps: [Step]) throws -> [[Float]] {
        let h = try hiddenStates(steps)
        let d = configuration.hiddenSize
        // Gather the last row of each sequence: [S, D].
        var last = [Float](repeating: 0, count: steps.count * d)
        var row = 0
        for (i, s) in steps.enumerated() {
            row += s.tokens.count
            for j in 0..<d { last[i * d + j] = h[(row - 1) * d + j] }
        }
        // One row per sequence: each sequence's logits are those it gets alone.
        var all = [Float](repeating: 0, count: steps.count * configuration.vocabSize)
        all.withUnsafeMutableBufferPointer {
            WeightMatrix.matmul([weights.output], last, segments: steps.map { _ in 1 }, into: [$0.baseAddress!])
        }
        let v = configuration.vocabSize
        return (0..<steps.count).map { Array(all[($0 * v)..<(($0 + 1) * v)]) }
    }

    /// Logits of the last token after appending `tokens` to `cache`: [V].
    public func forward(tokens: [Int], cache: KVCache) throws -> [Float] {
        try forward([Step(tokens: tokens, cache: cache)])[0]
    }
}
