// Reference: the naive, obviously-correct dequantisation of every block
// format, straight from ggml's definitions. Tests check the fast kernels
// against it; nothing on a hot path uses it.

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
