// Attention: causal grouped-query attention of new tokens over a KV cache.
import CKernels
import Foundation

public enum Attention {
    /// A sequence with at least this many new tokens attends through sgemm.
    public static let prefillTokens = 16

    /// Causal attention for one sequence: T new tokens at positions
    /// start..<start+T attend to cache positions 0...start+t.
    ///   q:   [T, H*HS]      queries of the new tokens (after RoPE)
    ///   k,v: [L, KVH*HS]    the sequence's cache, L = start + T
    ///   out: [T, H*HS]      (overwritten)
    /// Query head h reads key/value head h / (H / KVH). Sixteen or more tokens
    /// go through sgemm (`.best`); fewer, or a lower `kernels` path, through
    /// `decode`.
    public static func causal(q: UnsafePointer<Float>, k: UnsafePointer<Float>, v: UnsafePointer<Float>,
                              tokens t: Int, start: Int, heads: Int, kvHeads: Int, headSize hs: Int,
                              out: UnsafeMutablePointer<Float>, kernels: KernelPath = .best) {
        let l = start + t
        let qDim = heads * hs, kvDim = kvHeads * hs
        let group = heads / kvHeads
        let scale = 1 / Float(hs).squareRoot()
        if t >= prefillTokens && kernels == .best {
            // Prefill: per head and per block of up to 256 queries, two sgemms
            // over just the keys that block can see.
            let block = min(t, 256)
            let scores = UnsafeMutablePointer<Float>.allocate(capacity: block * l)
            defer { scores.deallocate() }
            for h in 0..<heads {
                let kvh = h / group
                for r0 in stride(from: 0, to: t, by: block) {
                    let rows = min(block, t - r0)
                    let keys = start + r0 + rows   // keys visible to the block's last row
                    Gemm.sgemm(transB: true, m: rows, n: keys, k: hs, alpha: scale, q + r0 * qDim + h * hs, lda: qDim,
                               k + kvh * hs, ldb: kvDim, scores, ldc: keys)
                    Parallel.forEachChunk(rows, minChunk: 16) { range in
                        for r in range {
                            let row = scores + r * keys
                            let visible = start + r0 + r + 1
                            Ops.softmax(row, visible)
                            for j in visible..<keys { row[j] = 0 }
                        }
                    }
                    Gemm.sgemm(m: rows, n: hs, k: keys, scores, lda: keys, v + kvh * hs, ldb: kvDim,
                               out + r0 * qDim + h * hs, ldc: qDim)
                }
            }
        } else {
            decode([Query(q: q, k: k, v: v, tokens: t, start: start, out: out)], heads: heads, kvHeads: kvHeads,
                   headSize: hs, kernels: kernels)
        }
    }

    /// One sequence's few new tokens for `decode`.
    ///   q, out: [T, H*HS]   k, v: [start + T, KVH*HS] its cache
    public struct Query {
        public let q: UnsafePointer<Float>
        public let k: UnsafePointer<Float>
        public let v: UnsafePointer<Float>
        public let tokens: Int
        public let start: Int
        public let out: UnsafeMutablePointer<Float>

        public init(q: UnsafePointer<Float>, k: UnsafePointer<Float>, v: UnsafePointer<Float>, tokens: Int, start: Int,
                    out: UnsafeMutablePointer<Float>) {
            self.q = q
            self.k = k
            self.v = v
            self.tokens = tokens
            self.start = start
            self.out = out
        }
    }

    /// Decode attention of several sequences in one parallel pass: one item
    /// per (sequence, token), all heads at once so that the cache rows are
    /// read front to back, once. A long context is split into parts of at
    /// least 128 positions (at most twice the threads) whose softmax partials
    /// are combined afterwards; how a query is split depends only on its own
    /// length, so a sequence gets the same bits alone or batched with others.
    public static func decode(_ queries: [Query], heads: Int, kvHeads: Int, headSize hs: Int,
                              kernels: KernelPath = .best) {
        let qDim = heads * hs, kvDim = kvHeads * hs
        let scale = 1 / Float(hs).squareRoot()
        var items: [(s: Int, r: Int)] = []
        for (s, query) in queries.enumerated() { for r in 0..<query.tokens { items.append((s, r)) } }
        let longest = queries.map { $0.start + $0.tokens }.max() ?? 0
        // Parts of item (s, r): a function of its visible positions alone.
        func partsOf(_ s: Int, _ r: Int) -> Int { max(1, min(2 * Parallel.threads, (queries[s].start + r + 1) / 128)) }
        let parts = items.map { partsOf($0.s, $0.r) }.max() ?? 1
        // Per (item, part): out [H, HS] unnormalised, then mz [H, 2].
        let stride = heads * (hs + 2)
        let partial = UnsafeMutablePointer<Float>.allocate(capacity: items.count * parts * stride)
        defer { partial.deallocate() }
        Parallel.forEachChunk(items.count * parts, minChunk: 1) { range in
            let scores = UnsafeMutablePointer<Float>.allocate(capacity: heads * (longest + 1))
            defer { scores.deallocate() }
            for work in range {
                let (s, r) = items[work / parts], p = work % parts, n = partsOf(s, r)
                guard p < n else { continue }
                let query = queries[s]
                let visible = query.start + r + 1
                let lo = visible * p / n, hi = visible * (p + 1) / n
                let o = partial + work * stride
                ck_attend_rows(query.q + r * qDim, query.k + lo * kvDim, query.v + lo * kvDim, kvDim, hi - lo, heads,
                               kvHeads, hs, scale, scores, o, o + heads * hs, kernels.level)
                if n == 1 {
                    let out = query.out + r * qDim
                    for h in 0..<heads {
                        let inv = 1 / o[heads * hs + 2 * h + 1]
                        for i in 0..<hs { out[h * hs + i] = o[h * hs + i] * inv }
                    }
                }
            }
        }
        guard parts > 1 else { return }
        // out = Σ_p e^(m_p − M)·out_p / Σ_p e^(m_p − M)·z_p
        for (item, (s, r)) in items.enumerated() where partsOf(s, r) > 1 {
            let n = partsOf(s, r)
            let out = queries[s].out + r * qDim
            for h in 0..<heads {
                func part(_ p: Int) -> UnsafeMutablePointer<Float> { partial + (item * parts + p) * stride }
                var m = -Float.infinity
                for p in 0..<n { m = max(m, part(p)[heads * hs + 2 * h]) }
                var z: Float = 0
                for i in 0..<hs { out[h * hs + i] = 0 }
                for p in 0..<n {
                    let o = part(p), w = expf(o[heads * hs + 2 * h] - m)
                    z += w * o[heads * hs + 2 * h + 1]
                    for i in 0..<hs { out[h * hs + i] += w * o[h * hs + i] }
                }
                let inv = 1 / z
                for i in 0..<hs { out[h * hs + i] *= inv }
            }
        }
    }

    /// Backward of `causal` for one sequence from position 0 (the training
    /// pass): given dL/d(out), accumulates dL/dq, dL/dk, dL/dv. Attention
    /// probabilities are recomputed per head.
    ///   q, dq: [T, H*HS]   k, v, dk, dv: [T, KVH*HS]   dOut: [T, H*HS]
    ///   dq is overwritten; dk and dv are accumulated.
    public static func causalBackward(q: UnsafePointer<Float>, k: UnsafePointer<Float>, v: UnsafePointer<Float>,
                                      dOut: UnsafePointer<Float>, tokens t: Int, heads: Int, kvHeads: Int,
                                      headSize hs: Int, dq: UnsafeMutablePointer<Float>,
                                      dk: UnsafeMutablePointer<Float>, dv: UnsafeMutablePointer<Float>) {
        let qDim = heads * hs, kvDim = kvHeads * hs, group = heads / kvHeads
        let scale = 1 / Float(hs).squareRoot()
        let p = UnsafeMutablePointer<Float>.allocate(capacity: t * t)    // [T, T] probabilities
        let dp = UnsafeMutablePointer<Float>.allocate(capacity: t * t)   // [T, T]
        defer {
            p.deallocate()
            dp.deallocate()
        }
        for h in 0..<heads {
            let kvh = h / group
            let qh = q + h * hs, kh = k + kvh * hs, vh = v + kvh * hs, doh = dOut + h * hs
            Gemm.sgemm(transB: true, m: t, n: t, k: hs, alpha: scale, qh, lda: qDim, kh, ldb: kvDim, p, ldc: t)
            for r in 0..<t {
                Ops.softmax(p + r * t, r + 1)
                for j in (r + 1)..<t { p[r * t + j] = 0 }
            }
            // dP = dO · Vᵀ;  dV += Pᵀ · dO
            Gemm.sgemm(transB: true, m: t, n: t, k: hs, doh, lda: qDim, vh, ldb: kvDim, dp, ldc: t)
            Gemm.sgemm(transA: true, m: t, n: hs, k: t, p, lda: t, doh, ldb: qDim, beta: 1, dv + kvh * hs, ldc: kvDim)
            // dS = P ⊙ (dP − Σ_j P⊙dP), in place in dp
            for r in 0..<t {
                var s: Float = 0
                for j in 0...r { s += p[r * t + j] * dp[r * t + j] }
                for j in 0..<t { dp[r * t + j] = p[r * t + j] * (dp[r * t + j] - s) }
            }
            // dQ = dS · K · scale;  dK += dSᵀ · Q · scale
            Gemm.sgemm(m: t, n: hs, k: t, alpha: scale, dp, lda: t, kh, ldb: kvDim, dq + h * hs, ldc: qDim)
            Gemm.sgemm(transA: true, m: t, n: hs, k: t, alpha: scale, dp, lda: t, qh, ldb: qDim, beta: 1,
                       dk + kvh * hs, ldc: kvDim)
        }
    }

    /// Backward of `causal` for T new rows after `start` cached positions
    /// (a piece of a stream): given dL/d(out) of the new rows, dL/dq of the
    /// new queries and dL/dk, dL/dv of the new rows' keys and values only.
    /// The cached keys and values (positions 0..<start) are constants: the
    /// new rows attend to them, and they receive no gradient. With start 0
    /// this is `causalBackward`. Probabilities are recomputed per head.
    ///   q, dq: [T, H*HS]   k, v: [L, KVH*HS], L = start + T (the cache,
    ///   the new rows last)   dOut: [T, H*HS]   dk, dv: [T, KVH*HS]
    ///   dq is overwritten; dk and dv are accumulated.
    public static func cachedBackward(q: UnsafePointer<Float>, k: UnsafePointer<Float>, v: UnsafePointer<Float>,
                                      dOut: UnsafePointer<Float>, tokens t: Int, start: Int, heads: Int, kvHeads: Int,
                                      headSize hs: Int, dq: UnsafeMutablePointer<Float>,
                                      dk: UnsafeMutablePointer<Float>, dv: UnsafeMutablePointer<Float>) {
        let l = start + t
        let qDim = heads * hs, kvDim = kvHeads * hs, group = heads / kvHeads
        let scale = 1 / Float(hs).squareRoot()
        let p = UnsafeMutablePointer<Float>.allocate(capacity: t * l)    // [T, L] probabilities
        let dp = UnsafeMutablePointer<Float>.allocate(capacity: t * l)   // [T, L]
        defer {
            p.deallocate()
            dp.deallocate()
        }
        for h in 0..<heads {
            let kvh = h / group
            let qh = q + h * hs, kh = k + kvh * hs, vh = v + kvh * hs, doh = dOut + h * hs
            // S = scale · Q Kᵀ over every position; row r sees start + r + 1 of them.
            Gemm.sgemm(transB: true, m: t, n: l, k: hs, alpha: scale, qh, lda: qDim, kh, ldb: kvDim, p, ldc: l)
            for r in 0..<t {
                let visible = start + r + 1
                Ops.softmax(p + r * l, visible)
                for j in visible..<l { p[r * l + j] = 0 }
            }
            // dP = dO · Vᵀ;  dV_new += P[:, start...]ᵀ · dO
            Gemm.sgemm(transB: true, m: t, n: l, k: hs, doh, lda: qDim, vh, ldb: kvDim, dp, ldc: l)
            Gemm.sgemm(transA: true, m: t, n: hs, k: t, p + start, lda: l, doh, ldb: qDim, beta: 1, dv + kvh * hs, ldc: kvDim)
            // dS = P ⊙ (dP − Σ_j P⊙dP), in place in dp
            for r in 0..<t {
                let pr = p + r * l, dr = dp + r * l
                let s = Ops.dot(pr, dr, start + r + 1)
                for j in 0..<l { dr[j] = pr[j] * (dr[j] - s) }
            }
            // dQ = dS · K · scale;  dK_new += dS[:, start...]ᵀ · Q · scale
            Gemm.sgemm(m: t, n: hs, k: l, alpha: scale, dp, lda: l, kh, ldb: kvDim, dq + h * hs, ldc: qDim)
            Gemm.sgemm(transA: true, m: t, n: hs, k: t, alpha: scale, dp + start, lda: l, qh, ldb: qDim, beta: 1,
                       dk + kvh * hs, ldc: kvDim)
        }
    }

    /// The textbook definition, in Double, for tests.
    public static func reference(q: [Float], k: [Float], v: [Float], tokens t: Int, start: Int,
                                 heads: Int, kvHeads: Int, headSize hs: Int) -> [Float] {
        let l = start + t, qDim = heads * hs, kvDim = kvHeads * hs
        var out = [Float](repeating: 0, count: t * qDim)
        for r in 0..<t {
            for h in 0..<heads {
                let kvh = h / (heads / kvHeads)
                var s = [Double](repeating: -.infinity, count: l)
                for j in 0...(start + r) {
                    var d = 0.0
                    for i in 0..<hs { d += Double(q[r * qDim + h * hs + i]) * Double(k[j * kvDim + kvh * hs + i]) }
                    s[j] = d / Double(hs).squareRoot()
                }
                let m = s.max()!
                let e = s.map { exp($0 - m) }
                let z = e.reduce(0, +)
                for i in 0..<hs {
                    var acc = 0.0
                    for j in 0..<l { acc += e[j] / z * Double(v[j * kvDim + kvh * hs + i]) }
                    out[r * qDim + h * hs + i] = Float(acc)
                }
            }
        }
        return out
    }
}
