// Backward kernels against central finite differences of a Float64 forward.
import Foundation
import Testing
import TestSupport
@testable import Tensor

@Suite("Backward kernels")
struct BackwardTests {
    @Test("weight-matrix backward dx = dy · W for every format, path and batch size", arguments: allTypes, [1, 3, 13, 50])
    func weightMatrix(type: WeightType, n: Int) {
        let rows = 3000, cols = 512   // two dequantisation chunks of 2,048 rows; twelve transposed stretches of 256
        let w = RandomWeights(type, rows: rows, cols: cols, seed: 4)
        var rng = TestRNG(state: 24)
        let dy = (0..<(n * rows)).map { _ in rng.float() }
        let weights = Reference.dequantize(type, w.matrix.data, count: rows * cols)
        var expected = [Double](repeating: 0, count: n * cols)
        for j in 0..<n { for r in 0..<rows { for c in 0..<cols { expected[j * cols + c] += Double(dy[j * rows + r]) * Double(weights[r * cols + c]) } } }
        for path in KernelPath.allCases {
            var dx = [Float](repeating: 1, count: n * cols)
            w.matrix.matmulBackward(dy, count: n, into: &dx, accumulate: true, kernels: path)
            #expect(maxRelativeError(dx, expected.map { $0 + 1 }) < 1e-5, "\(type) \(path) n \(n), accumulated")
            w.matrix.matmulBackward(dy, count: n, into: &dx, kernels: path)
            #expect(maxRelativeError(dx, expected) < 1e-5, "\(type) \(path) n \(n)")
        }
    }

    @Test("causal attention: dq, dk, dv")
    func attention() {
        let t = 5, heads = 4, kvHeads = 2, hs = 4
        var rng = TestRNG(state: 25)
        let q = (0..<(t * heads * hs)).map { _ in rng.float() }
        let k = (0..<(t * kvHeads * hs)).map { _ in rng.float() }
        let v = (0..<(t * kvHeads * hs)).map { _ in rng.float() }
        let c = (0..<(t * heads * hs)).map { _ in rng.float() }   // loss = Σ c ⊙ out
        var dq = [Float](repeating: 0, count: q.count), dk = [Float](repeating: 0, count: k.count), dv = dk
        Attention.causalBackward(q: q, k: k, v: v, dOut: c, tokens: t, heads: heads, kvHeads: kvHeads, headSize: hs,
                                 dq: &dq, dk: &dk, dv: &dv)
        func loss(_ q: [Float], _ k: [Float], _ v: [Float]) -> Double {
            let out = Attention.reference(q: q, k: k, v: v, tokens: t, start: 0, heads: heads, kvHeads: kvHeads, headSize: hs)
            return zip(out, c).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
        }
        // Float inputs, so a larger step: h = 2^-7.
        let h = 1.0 / 128
        func numeric(_ x: [Float], _ f: ([Float]) -> Double) -> [Double] {
            (0..<x.count).map { i in
                var p = x, m = x
                p[i] += Float(h)
                m[i] -= Float(h)
                return (f(p) - f(m)) / (2 * h)
            }
        }
        #expect(maxRelativeError(dq, numeric(q) { loss($0, k, v) }) < 1e-3)
        #expect(maxRelativeError(dk, numeric(k) { loss(q, $0, v) }) < 1e-3)
        #expect(maxRelativeError(dv, numeric(v) { loss(q, k, $0) }) < 1e-3)
    }

    @Test("attention of new rows over a cache: dq and the new rows' dk, dv against finite differences and the reference",
          arguments: [(0, 5), (3, 4), (7, 1), (20, 17)])
    func cachedAttention(start: Int, t: Int) {
        let heads = 4, kvHeads = 2, hs = 4, l = start + t
        var rng = TestRNG(state: UInt64(26 + start))
        let q = (0..<(t * heads * hs)).map { _ in rng.float() }
        let k = (0..<(l * kvHeads * hs)).map { _ in rng.float() }
        let v = (0..<(l * kvHeads * hs)).map { _ in rng.float() }
        let c = (0..<(t * heads * hs)).map { _ in rng.float() }   // loss = Σ c ⊙ out
        var dq = [Float](repeating: 0, count: q.count)
        var dk = [Float](repeating: 0, count: t * kvHeads * hs), dv = dk
        Attention.cachedBackward(q: q, k: k, v: v, dOut: c, tokens: t, start: start, heads: heads, kvHeads: kvHeads,
                                 headSize: hs, dq: &dq, dk: &dk, dv: &dv)
        let reference = Reference.attentionBackward(q: q, k: k, v: v, dOut: c, tokens: t, start: start, heads: heads,
                                                    kvHeads: kvHeads, headSize: hs)
        #expect(maxRelativeError(dq, reference.dq) < 1e-5)
        #expect(maxRelativeError(dk, reference.dk) < 1e-5)
        #expect(maxRelativeError(dv, reference.dv) < 1e-5)
        // Finite differences of the forward with the cached rows held fixed:
        // only the new rows' keys and values (the last t rows) move.
        func loss(_ q: [Float], _ k: [Float], _ v: [Float]) -> Double {
            let out = Attention.reference(q: q, k: k, v: v, tokens: t, start: start, heads: heads, kvHeads: kvHeads, headSize: hs)
            return zip(out, c).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
        }
        let h = 1.0 / 128, cached = start * kvHeads * hs
        func numeric(_ x: [Float], from: Int = 0, _ f: ([Float]) -> Double) -> [Double] {
            (from..<x.count).map { i in
                var p = x, m = x
                p[i] += Float(h)
                m[i] -= Float(h)
                return (f(p) - f(m)) / (2 * h)
            }
        }
        #expect(maxRelativeError(dq, numeric(q) { loss($0, k, v) }) < 1e-3)
        #expect(maxRelativeError(dk, numeric(k, from: cached) { loss(q, $0, v) }) < 1e-3)
        #expect(maxRelativeError(dv, numeric(v, from: cached) { loss(q, k, $0) }) < 1e-3)
    }

    @Test("attention backward over an empty cache is causalBackward")
    func cachedAttentionWithoutCache() {
        let t = 21, heads = 6, kvHeads = 2, hs = 8
        var rng = TestRNG(state: 27)
        let q = (0..<(t * heads * hs)).map { _ in rng.float() }
        let k = (0..<(t * kvHeads * hs)).map { _ in rng.float() }
        let v = (0..<(t * kvHeads * hs)).map { _ in rng.float() }
        let c = (0..<(t * heads * hs)).map { _ in rng.float() }
        var dq = [Float](repeating: 0, count: q.count), dk = [Float](repeating: 0.5, count: k.count), dv = dk
        var dq2 = dq, dk2 = dk, dv2 = dv
        Attention.causalBackward(q: q, k: k, v: v, dOut: c, tokens: t, heads: heads, kvHeads: kvHeads, headSize: hs,
                                 dq: &dq, dk: &dk, dv: &dv)
        Attention.cachedBackward(q: q, k: k, v: v, dOut: c, tokens: t, start: 0, heads: heads, kvHeads: kvHeads,
                                 headSize: hs, dq: &dq2, dk: &dk2, dv: &dv2)
        for (a, b) in [(dq, dq2), (dk, dk2), (dv, dv2)] {
            #expect(maxRelativeError(b, a.map(Double.init)) < 1e-6)
        }
    }

    @Test("linear: dx and dW")
    func linear() {
        var rng = TestRNG(state: 21)
        let t = 3, n = 5, k = 7
        let x = (0..<(t * k)).map { _ in rng.float() }, w = (0..<(n * k)).map { _ in rng.float() }
        let c = (0..<(t * n)).map { _ in rng.float() }   // loss = Σ c ⊙ y
        var dx = [Float](repeating: 0, count: t * k), dw = [Float](repeating: 0, count: n * k)
        Ops.linearBackward(c, rows: t, x: x, w, out: n, in: k, dx: &dx, dw: &dw)
        func loss(_ xs: [Double], _ ws: [Double]) -> Double {
            var s = 0.0
            for r in 0..<t { for o in 0..<n { for i in 0..<k { s += Double(c[r * n + o]) * xs[r * k + i] * ws[o * k + i] } } }
            return s
        }
        let xd = x.map(Double.init), wd = w.map(Double.init)
        #expect(maxRelativeError(dx, numericGradient(xd) { loss($0, wd) }) < 1e-5)
        #expect(maxRelativeError(dw, numericGradient(wd) { loss(xd, $0) }) < 1e-5)
    }

    @Test("RMSNorm: dx and dweight")
    func rmsNorm() {
        var rng = TestRNG(state: 22)
        let t = 2, d = 12
        let x = (0..<(t * d)).map { _ in rng.float(-2, 2) }, w = (0..<d).map { _ in rng.float(0.5, 1.5) }
        let c = (0..<(t * d)).map { _ in rng.float() }
        var dx = [Float](repeating: 0, count: t * d), dw = [Float](repeating: 0, count: d)
        Ops.rmsNormBackward(x, weight: w, eps: 1e-5, rows: t, dim: d, dy: c, dx: &dx, dweight: &dw)
        func loss(_ xs: [Double], _ ws: [Double]) -> Double {
            var s = 0.0
            for r in 0..<t {
                let ms = (0..<d).reduce(0.0) { $0 + xs[r * d + $1] * xs[r * d + $1] } / Double(d)
                let rr = 1 / (ms + 1e-5).squareRoot()
                for i in 0..<d { s += Double(c[r * d + i]) * xs[r * d + i] * rr * ws[i] }
            }
            return s
        }
        let xd = x.map(Double.init), wd = w.map(Double.init)
        #expect(maxRelativeError(dx, numericGradient(xd) { loss($0, wd) }) < 1e-4)
        #expect(maxRelativeError(dw, numericGradient(wd) { loss(xd, $0) }) < 1e-4)
    }

    @Test("SwiGLU: da and db")
    func swiglu() {
        var rng = TestRNG(state: 23)
        let n = 20
        let a = (0..<n).map { _ in rng.float(-4, 4) }, b = (0..<n).map { _ in rng.float(-2, 2) }
        let c = (0..<n).map { _ in rng.float() }
        var da = [Float](repeating: 0, count: n), db = da
        Ops.swigluBackward(a: a, b: b, dout: c, count: n, da: &da, db: &db)
        func loss(_ as_: [Double], _ bs: [Double]) -> Double {
            (0..<n).reduce(0.0) { $0 + Double(c[$1]) * as_[$1] / (1 + exp(-as_[$1])) * bs[$1] }
        }
        let ad = a.map(Double.init), bd = b.map(Double.init)
        #expect(maxRelativeError(da, numericGradient(ad) { loss($0, bd) }) < 1e-5)
        #expect(maxRelativeError(db, numericGradient(bd) { loss(ad, $0) }) < 1e-5)
    }
}
