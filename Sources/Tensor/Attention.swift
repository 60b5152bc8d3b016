// Attention: causal grouped-query attention of new tokens over a KV cache.
import CBLAS
import CKernels
import Foundation

public enum Attention {
    /// Causal attention for one sequence: T new tokens at positions
    /// start..<start+T attend to cache positions 0...start+t.
    ///   q:   [T, H*HS]      queries of the new tokens (after RoPE)
    ///   k,v: [L, KVH*HS]    the sequence's cache, L = start + T
    ///   out: [T, H*HS]      (overwritten)
    /// Query head h reads key/value head h / (H / KVH). Sixteen or more tokens
    /// go through sgemm (`.best`); fewer, or a lower `kernels` path, through
    /// the per-head decode kernel.
    public static func causal(q: UnsafePointer<Float>, k: UnsafePointer<Float>, v: UnsafePointer<Float>,
                              tokens t: Int, start: Int, heads: Int, kvHeads: Int, headSize hs: Int,
                              out: UnsafeMutablePointer<Float>, kernels: KernelPath = .best) {
        let l = start + t
        let qDim = heads * hs, kvDim = kvHeads * hs
        let group = heads / kvHeads
        let scale = 1 / Float(hs).squareRoot()
        if t >= 16 && kernels == .best {
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
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(keys), Int32(hs),
                                scale, q + r0 * qDim + h * hs, Int32(qDim), k + kvh * hs, Int32(kvDim),
                                0, scores, Int32(keys))
                    Parallel.forEachChunk(rows, minChunk: 16) { range in
                        for r in range {
                            let row = scores + r * keys
                            let visible = start + r0 + r + 1
                            Ops.softmax(row, visible)
                            for j in visible..<keys { row[j] = 0 }
                        }
                    }
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(hs), Int32(keys),
                                1, scores, Int32(keys), v + kvh * hs, Int32(kvDim), 0, out + r0 * qDim + h * hs, Int32(qDim))
                }
            }
        } else {
            // Decode: one (token, query head) pair per item, spread across
            // threads; a head's keys and values stay in cache for the heads
            // that share them.
            Parallel.forEachChunk(t * heads, minChunk: 1) { items in
                let scores = UnsafeMutablePointer<Float>.allocate(capacity: l)
                defer { scores.deallocate() }
                for item in items {
                    let r = item / heads, h = item % heads, kvh = h / group
                    let offset = r * qDim + h * hs
                    ck_attend(q + offset, k + kvh * hs, v + kvh * hs, kvDim, start + r + 1, 1, hs, scale,
                              scores, out + offset, kernels.level)
                }
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
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(t), Int32(t), Int32(hs),
                        scale, qh, Int32(qDim), kh, Int32(kvDim), 0, p, Int32(t))
            for r in 0..<t {
                Ops.softmax(p + r * t, r + 1)
                for j in (r + 1)..<t { p[r * t + j] = 0 }
            }
            // dP = dO · Vᵀ;  dV += Pᵀ · dO
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(t), Int32(t), Int32(hs),
                        1, doh, Int32(qDim), vh, Int32(kvDim), 0, dp, Int32(t))
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(t), Int32(hs), Int32(t),
                        1, p, Int32(t), doh, Int32(qDim), 1, dv + kvh * hs, Int32(kvDim))
            // dS = P ⊙ (dP − Σ_j P⊙dP), in place in dp
            for r in 0..<t {
                var s: Float = 0
                for j in 0...r { s += p[r * t + j] * dp[r * t + j] }
                for j in 0..<t { dp[r * t + j] = p[r * t + j] * (dp[r * t + j] - s) }
            }
            // dQ = dS · K · scale;  dK += dSᵀ · Q · scale
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(t), Int32(hs), Int32(t),
                        scale, dp, Int32(t), kh, Int32(kvDim), 0, dq + h * hs, Int32(qDim))
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(t), Int32(hs), Int32(t),
                        scale, dp, Int32(t), qh, Int32(qDim), 1, dk + kvh * hs, Int32(kvDim))
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
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(t), Int32(l), Int32(hs),
                        scale, qh, Int32(qDim), kh, Int32(kvDim), 0, p, Int32(l))
            for r in 0..<t {
                let visible = start + r + 1
                Ops.softmax(p + r * l, visible)
                for j in visible..<l { p[r * l + j] = 0 }
            }
            // dP = dO · Vᵀ;  dV_new += P[:, start...]ᵀ · dO
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(t), Int32(l), Int32(hs),
                        1, doh, Int32(qDim), vh, Int32(kvDim), 0, dp, Int32(l))
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(t), Int32(hs), Int32(t),
                        1, p + start, Int32(l), doh, Int32(qDim), 1, dv + kvh * hs, Int32(kvDim))
            // dS = P ⊙ (dP − Σ_j P⊙dP), in place in dp
            for r in 0..<t {
                let pr = p + r * l, dr = dp + r * l
                let s = Ops.dot(pr, dr, start + r + 1)
                for j in 0..<l { dr[j] = pr[j] * (dr[j] - s) }
            }
            // dQ = dS · K · scale;  dK_new += dS[:, start...]ᵀ · Q · scale
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(t), Int32(hs), Int32(l),
                        scale, dp, Int32(l), kh, Int32(kvDim), 0, dq + h * hs, Int32(qDim))
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(t), Int32(hs), Int32(t),
                        scale, dp + start, Int32(l), qh, Int32(qDim), 1, dk + kvh * hs, Int32(kvDim))
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
