// Reference: the naive, obviously-correct dequantisation of every block
// format, straight from ggml's definitions. Tests check the fast kernels
// against it; nothing on a hot path uses it.
import Foundation

public enum Reference {
    /// IEEE half → Float, bit by bit.
    public static func halfToFloat(_ h: UInt16) -> Float {
        Float(Float16(bitPattern: h))
    }

    /// bfloat16 → Float.
    public static func bfloat16ToFloat(_ h: UInt16) -> Float {
        Float(bitPattern: UInt32(h) << 16)
    }

    /// Dequantises `count` elements starting at `bytes` (must be whole blocks).
    public static func dequantize(_ type: WeightType, _ bytes: UnsafeRawPointer, count: Int) -> [Float] {
        var out = [Float](repeating: 0, count: count)
        func u16(_ o: Int) -> UInt16 { bytes.loadUnaligned(fromByteOffset: o, as: UInt16.self) }
        func u8(_ o: Int) -> UInt8 { bytes.load(fromByteOffset: o, as: UInt8.self) }
        switch type {
        case .f32:
            for i in 0..<count { out[i] = bytes.loadUnaligned(fromByteOffset: 4 * i, as: Float.self) }
        case .f16:
            for i in 0..<count { out[i] = halfToFloat(u16(2 * i)) }
        case .bf16:
            for i in 0..<count { out[i] = bfloat16ToFloat(u16(2 * i)) }
        case .q4_0:
            for b in 0..<(count / 32) {
                let o = b * 18
                let d = halfToFloat(u16(o))
                for j in 0..<16 {
                    let q = u8(o + 2 + j)
                    out[b * 32 + j] = Float(Int(q & 15) - 8) * d
                    out[b * 32 + j + 16] = Float(Int(q >> 4) - 8) * d
                }
            }
        case .q4_1:
            for b in 0..<(count / 32) {
                let o = b * 20
                let d = halfToFloat(u16(o))
                let m = halfToFloat(u16(o + 2))
                for j in 0..<16 {
                    let q = u8(o + 4 + j)
                    out[b * 32 + j] = Float(q & 15) * d + m
                    out[b * 32 + j + 16] = Float(q >> 4) * d + m
                }
            }
        case .q8_0:
            for b in 0..<(count / 32) {
                let o = b * 34
                let d = halfToFloat(u16(o))
                for j in 0..<32 {
                    out[b * 32 + j] = Float(Int8(bitPattern: u8(o + 2 + j))) * d
                }
            }
        }
        return out
    }

    /// y = x · Wᵀ with every weight dequantised first, accumulating in Double.
    ///   x: [n, cols]   y: [n, rows]
    public static func matmul(_ w: WeightMatrix, _ x: [Float], count n: Int) -> [Float] {
        var y = [Float](repeating: 0, count: n * w.rows)
        for r in 0..<w.rows {
            let row = dequantize(w.type, w.data + r * w.rowBytes, count: w.cols)
            for j in 0..<n {
                var s = 0.0
                for c in 0..<w.cols { s += Double(row[c]) * Double(x[j * w.cols + c]) }
                y[j * w.rows + r] = Float(s)
            }
        }
        return y
    }
}

extension Reference {
    /// Muon's quintic Newton–Schulz iteration in Double with plain loops (the
    /// reference for `Ops.newtonSchulz`).
    ///   m: [rows, cols] → [rows, cols]
    public static func newtonSchulz(_ m: [Double], rows: Int, cols: Int, steps: Int = 5) -> [Double] {
        let norm = m.reduce(0) { $0 + $1 * $1 }.squareRoot()
        guard norm > 0 else { return m }
        let (a, b, c) = (3.4445, -4.7750, 2.0315)
        // Work on the wide orientation.
        let wide = rows <= cols
        let r = wide ? rows : cols, k = wide ? cols : rows
        var x = [[Double]](repeating: [Double](repeating: 0, count: k), count: r)
        for i in 0..<rows { for j in 0..<cols { if wide { x[i][j] = m[i * cols + j] / (norm + 1e-7) } else { x[j][i] = m[i * cols + j] / (norm + 1e-7) } } }
        for _ in 0..<steps {
            var g = [[Double]](repeating: [Double](repeating: 0, count: r), count: r)
            for i in 0..<r { for j in 0..<r { for t in 0..<k { g[i][j] += x[i][t] * x[j][t] } } }
            var g2 = [[Double]](repeating: [Double](repeating: 0, count: r), count: r)
            for i in 0..<r { for j in 0..<r { for t in 0..<r { g2[i][j] += g[i][t] * g[t][j] } } }
            var y = x
            for i in 0..<r {
                for j in 0..<k {
                    var s = a * x[i][j]
                    for t in 0..<r { s += (b * g[i][t] + c * g2[i][t]) * x[t][j] }
                    y[i][j] = s
                }
            }
            x = y
        }
        var out = [Double](repeating: 0, count: rows * cols)
        for i in 0..<rows { for j in 0..<cols { out[i * cols + j] = wide ? x[i][j] : x[j][i] } }
        return out
    }
}

extension Reference {
    /// The gradients of causal grouped-query attention for T new rows after
    /// `start` cached positions, in Double with plain loops (the reference
    /// for `Attention.cachedBackward`): with out as `Attention.causal`
    /// computes it and dOut = dL/d(out), dL/dq of the new queries and dL/dk,
    /// dL/dv of the new rows' keys and values; the cached positions' keys and
    /// values are constants.
    ///   q, dOut: [T, H*HS]   k, v: [start + T, KVH*HS]
    ///   → dq [T, H*HS], dk and dv [T, KVH*HS]
    public static func attentionBackward(q: [Float], k: [Float], v: [Float], dOut: [Float], tokens t: Int, start: Int,
                                         heads: Int, kvHeads: Int, headSize hs: Int)
        -> (dq: [Double], dk: [Double], dv: [Double]) {
        let qDim = heads * hs, kvDim = kvHeads * hs, scale = 1 / Double(hs).squareRoot()
        var dq = [Double](repeating: 0, count: t * qDim)
        var dk = [Double](repeating: 0, count: t * kvDim), dv = dk
        for r in 0..<t {
            for h in 0..<heads {
                let kvh = h / (heads / kvHeads), visible = start + r + 1
                func qv(_ i: Int) -> Double { Double(q[r * qDim + h * hs + i]) }
                func kv(_ j: Int, _ i: Int) -> Double { Double(k[j * kvDim + kvh * hs + i]) }
                func vv(_ j: Int, _ i: Int) -> Double { Double(v[j * kvDim + kvh * hs + i]) }
                func dov(_ i: Int) -> Double { Double(dOut[r * qDim + h * hs + i]) }
                // Probabilities over the visible positions.
                var s = [Double](repeating: 0, count: visible)
                for j in 0..<visible {
                    for i in 0..<hs { s[j] += qv(i) * kv(j, i) }
                    s[j] *= scale
                }
                let m = s.max()!
                let e = s.map { exp($0 - m) }, z = e.reduce(0, +)
                let p = e.map { $0 / z }
                // dP_j = dO · v_j; dS_j = P_j (dP_j − Σ P dP).
                var dp = [Double](repeating: 0, count: visible)
                for j in 0..<visible { for i in 0..<hs { dp[j] += dov(i) * vv(j, i) } }
                var pdp = 0.0
                for j in 0..<visible { pdp += p[j] * dp[j] }
                for j in 0..<visible {
                    let ds = p[j] * (dp[j] - pdp)
                    for i in 0..<hs { dq[r * qDim + h * hs + i] += ds * kv(j, i) * scale }
                    // Only the new rows' keys and values take gradients.
                    guard j >= start else { continue }
                    let row = j - start
                    for i in 0..<hs {
                        dk[row * kvDim + kvh * hs + i] += ds * qv(i) * scale
                        dv[row * kvDim + kvh * hs + i] += p[j] * dov(i)
                    }
                }
            }
        }
        return (dq, dk, dv)
    }
}
