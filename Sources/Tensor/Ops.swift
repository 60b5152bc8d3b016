// Ops: the element-wise and normalisation kernels of a Llama block.
//
// Shape letters: T tokens in the step, D model width, H heads, HS head size,
// F feed-forward width, L key/value positions, V vocabulary.
// Every buffer argument states its shape; all buffers are row-major fp32.
import CKernels
import Foundation

public enum Ops {
    // MARK: SIMD helpers

    /// Σ a[i]·b[i] over n elements.
    @inlinable
    public static func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc0 = SIMD8<Float>(), acc1 = SIMD8<Float>()
        var i = 0
        let ra = UnsafeRawPointer(a), rb = UnsafeRawPointer(b)
        while i + 16 <= n {
            acc0 += ra.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self)
                * rb.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self)
            acc1 += ra.loadUnaligned(fromByteOffset: 4 * i + 32, as: SIMD8<Float>.self)
                * rb.loadUnaligned(fromByteOffset: 4 * i + 32, as: SIMD8<Float>.self)
            i += 16
        }
        var s = (acc0 + acc1).sum()
        while i < n { s += a[i] * b[i]; i += 1 }
        return s
    }

    /// y += x over n elements (the residual connection).
    @inlinable
    public static func add(_ x: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>, _ n: Int) {
        for i in 0..<n { y[i] += x[i] }
    }

    // MARK: Linear

    /// y = x · Wᵀ (+ y when `accumulate`), fp32 weights.
    ///   x: [T, in]   w: [out, in]   y: [T, out]
    public static func linear(_ x: UnsafePointer<Float>, rows t: Int, _ w: UnsafePointer<Float>, out: Int, in k: Int,
                              into y: UnsafeMutablePointer<Float>, accumulate: Bool = false) {
        Gemm.sgemm(transB: true, m: t, n: out, k: k, x, lda: k, w, ldb: k, beta: accumulate ? 1 : 0, y, ldc: out)
    }

    /// Backward of `linear`: dx (+)= dy · W, and dW += dyᵀ · x.
    ///   dy: [T, out]   x: [T, in]   w: [out, in]
    ///   dx: [T, in] (overwritten unless accumulate; nil skips it)
    ///   dw: [out, in] (accumulated; nil skips it)
    public static func linearBackward(_ dy: UnsafePointer<Float>, rows t: Int, x: UnsafePointer<Float>,
                                      _ w: UnsafePointer<Float>, out: Int, in k: Int,
                                      dx: UnsafeMutablePointer<Float>?, accumulate: Bool = false,
                                      dw: UnsafeMutablePointer<Float>?) {
        if let dx {
            Gemm.sgemm(m: t, n: k, k: out, dy, lda: out, w, ldb: k, beta: accumulate ? 1 : 0, dx, ldc: k)
        }
        if let dw {
            Gemm.sgemm(transA: true, m: out, n: k, k: t, dy, lda: out, x, ldb: k, beta: 1, dw, ldc: k)
        }
    }

    // MARK: RMSNorm

    /// out[t] = x[t] / sqrt(mean(x[t]²) + eps) * weight, as Hugging Face's
    /// LlamaRMSNorm computes it in fp32.
    ///   x: [T, D]   weight: [D]   out: [T, D] (may alias x)
    public static func rmsNorm(_ x: UnsafePointer<Float>, weight: UnsafePointer<Float>, eps: Float,
                               rows t: Int, dim d: Int, out: UnsafeMutablePointer<Float>) {
        for r in 0..<t {
            let xr = x + r * d, o = out + r * d
            let ms = dot(xr, xr, d) / Float(d)
            let scale = 1 / (ms + eps).squareRoot()
            for i in 0..<d { o[i] = (xr[i] * scale) * weight[i] }
        }
    }

    /// Backward of `rmsNorm`: with r = (mean(x²) + eps)^-½,
    /// dx = r·w⊙dy − x·r³/D·Σ(dy⊙w⊙x), dweight += Σ_t dy⊙x·r.
    ///   x: [T, D]   dy: [T, D]   dx: [T, D] (accumulated)   dweight: [D] (accumulated; nil skips it)
    public static func rmsNormBackward(_ x: UnsafePointer<Float>, weight: UnsafePointer<Float>, eps: Float,
                                       rows t: Int, dim d: Int, dy: UnsafePointer<Float>,
                                       dx: UnsafeMutablePointer<Float>, dweight: UnsafeMutablePointer<Float>?) {
        for row in 0..<t {
            let xr = x + row * d, g = dy + row * d, o = dx + row * d
            let ms = dot(xr, xr, d) / Float(d)
            let r = 1 / (ms + eps).squareRoot()
            var s: Float = 0
            for i in 0..<d { s += g[i] * weight[i] * xr[i] }
            let c = r * r * r / Float(d) * s
            for i in 0..<d { o[i] += r * weight[i] * g[i] - xr[i] * c }
            if let dweight { for i in 0..<d { dweight[i] += g[i] * xr[i] * r } }
        }
    }

    // MARK: SwiGLU

    /// gate[i] = silu(gate[i]) * up[i], silu(z) = z / (1 + e^-z).
    ///   gate: [T, F] (overwritten)   up: [T, F]
    public static func swiglu(gate: UnsafeMutablePointer<Float>, up: UnsafePointer<Float>, count n: Int) {
        Parallel.forEachChunk(n, minChunk: 16384) { range in
            ck_swiglu(gate + range.lowerBound, up + range.lowerBound, range.count, KernelPath.best.level)
        }
    }

    /// Backward of `swiglu` given its inputs a (gate) and b (up):
    /// out = silu(a)⊙b, silu'(a) = σ(a)(1 + a(1 − σ(a))).
    ///   a, b, dout: [n]   da, db: [n] (overwritten)
    public static func swigluBackward(a: UnsafePointer<Float>, b: UnsafePointer<Float>, dout: UnsafePointer<Float>,
                                      count n: Int, da: UnsafeMutablePointer<Float>, db: UnsafeMutablePointer<Float>) {
        for i in 0..<n {
            let s = 1 / (1 + expf(-a[i]))
            da[i] = dout[i] * b[i] * s * (1 + a[i] * (1 - s))
            db[i] = dout[i] * a[i] * s
        }
    }

    // MARK: Softmax

    /// In-place softmax over n elements; returns nothing, max-subtracted.
    public static func softmax(_ x: UnsafeMutablePointer<Float>, _ n: Int) {
        var m = -Float.infinity
        for i in 0..<n where x[i] > m { m = x[i] }
        var s: Float = 0
        for i in 0..<n {
            let e = expf(x[i] - m)
            x[i] = e
            s += e
        }
        let inv = 1 / s
        for i in 0..<n { x[i] *= inv }
    }
}

/// Rotary position embedding tables and their application.
public struct Rope: Sendable {
    /// Which rows of a head form a rotated pair.
    public enum Layout: Sendable {
        /// (2i, 2i+1): llama.cpp's layout, used by GGUF files whose Q/K rows
        /// the converter permuted.
        case adjacentPairs
        /// (i, i+HS/2): Hugging Face's rotate_half layout.
        case halfSplit
    }

    public let headSize: Int
    public let base: Float
    public let layout: Layout
    /// inv_freq[i] = 1 / base^(2i/HS), computed in fp32 as transformers does.
    public let inverseFrequencies: [Float]

    public init(headSize: Int, base: Float, layout: Layout) {
        self.headSize = headSize
        self.base = base
        self.layout = layout
        inverseFrequencies = (0..<(headSize / 2)).map { i in 1 / powf(base, Float(2 * i) / Float(headSize)) }
    }

    /// Rotates each head of each token by its position.
    ///   x: [T, heads*HS] (in place)   positions: [T]
    public func apply(_ x: UnsafeMutablePointer<Float>, positions: [Int], heads: Int) {
        let half = headSize / 2
        var cosT = [Float](repeating: 0, count: half), sinT = cosT
        for (t, pos) in positions.enumerated() {
            for i in 0..<half {
                let angle = Float(pos) * inverseFrequencies[i]
                cosT[i] = cosf(angle)
                sinT[i] = sinf(angle)
            }
            for h in 0..<heads {
                let v = x + (t * heads + h) * headSize
                switch layout {
                case .adjacentPairs:
                    for i in 0..<half {
                        let a = v[2 * i], b = v[2 * i + 1]
                        v[2 * i] = a * cosT[i] - b * sinT[i]
                        v[2 * i + 1] = b * cosT[i] + a * sinT[i]
                    }
                case .halfSplit:
                    for i in 0..<half {
                        let a = v[i], b = v[i + half]
                        v[i] = a * cosT[i] - b * sinT[i]
                        v[i + half] = b * cosT[i] + a * sinT[i]
                    }
                }
            }
        }
    }
}

// MARK: Orthogonalisation

extension Ops {
    /// Muon's quintic Newton–Schulz coefficients (Jordan et al., 2024).
    public static let newtonSchulzCoefficients: (a: Float, b: Float, c: Float) = (3.4445, -4.7750, 2.0315)

    /// `steps` iterations of Muon's quintic Newton–Schulz map on m / ‖m‖_F:
    /// X ← aX + (b·XXᵀ + c·(XXᵀ)²)X, run on the wide orientation (rows ≤
    /// cols). The result keeps m's singular vectors with every non-negligible
    /// singular value pushed into roughly [0.7, 1.2] — an approximately
    /// orthogonal matrix (M3's and Muon's update direction). Zero maps to zero.
    ///   m: [rows, cols] → [rows, cols]
    public static func newtonSchulz(_ m: [Float], rows: Int, cols: Int, steps: Int = 5) -> [Float] {
        precondition(m.count == rows * cols)
        let norm = m.reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot()
        guard norm > 0 else { return m }
        let wide = rows <= cols
        let r = wide ? rows : cols, c = wide ? cols : rows
        var x = [Float](repeating: 0, count: r * c)   // [r, c]
        let s = Float(1 / (norm + 1e-7))
        for i in 0..<rows { for j in 0..<cols { x[wide ? i * cols + j : j * rows + i] = m[i * cols + j] * s } }
        let (ca, cb, cc) = newtonSchulzCoefficients
        var a = [Float](repeating: 0, count: r * r), b = a   // [r, r]
        var next = x
        for _ in 0..<steps {
            linear(x, rows: r, x, out: r, in: c, into: &a)   // A = XXᵀ
            linear(a, rows: r, a, out: r, in: r, into: &b)   // A² (A symmetric)
            for i in b.indices { b[i] = cb * a[i] + cc * b[i] }
            next = x
            // X ← aX + B·X
            Gemm.sgemm(m: r, n: c, k: r, b, lda: r, x, ldb: c, beta: ca, &next, ldc: c)
            swap(&x, &next)
        }
        if wide { return x }
        var out = [Float](repeating: 0, count: rows * cols)
        for i in 0..<rows { for j in 0..<cols { out[i * cols + j] = x[j * rows + i] } }
        return out
    }
}
