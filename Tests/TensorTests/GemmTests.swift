// Gemm: the blocked, pool-parallel sgemm against a Double reference, and its
// bits independent of who holds the worker pool.
import Foundation
import Testing
@testable import Tensor

@Suite("Gemm", .serialized) struct GemmTests {
    /// C = alpha · op(A) · op(B) + beta · C in Double, from the definition.
    static func reference(transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float, a: [Float], lda: Int,
                          b: [Float], ldb: Int, beta: Float, c: [Float], ldc: Int) -> [Double] {
        var out = c.map(Double.init)
        for i in 0..<m {
            for j in 0..<n {
                var s = 0.0
                for p in 0..<k {
                    let x = transA ? a[p * lda + i] : a[i * lda + p]
                    let y = transB ? b[j * ldb + p] : b[p * ldb + j]
                    s += Double(x) * Double(y)
                }
                out[i * ldc + j] = Double(alpha) * s + Double(beta) * Double(c[i * ldc + j])
            }
        }
        return out
    }

    struct Case: CustomStringConvertible {
        let transA: Bool, transB: Bool, m: Int, n: Int, k: Int
        var description: String { "\(transA ? "Aᵀ" : "A")·\(transB ? "Bᵀ" : "B") [\(m)×\(k)]·[\(k)×\(n)]" }
    }

    /// Wide, tall (each side split), small (one call), odd sizes, every transpose.
    static let cases: [Case] = [(7, 9, 5), (300, 64, 96), (64, 577, 80), (33, 190, 257), (256, 256, 64)].flatMap { m, n, k in
        [(false, false), (false, true), (true, false), (true, true)].map { Case(transA: $0.0, transB: $0.1, m: m, n: n, k: k) }
    }

    @Test("matches the Double reference, with padded leading dimensions, alpha and beta", arguments: cases)
    func matchesReference(_ t: Case) {
        let saved = Parallel.threads
        defer { Parallel.setThreads(saved) }
        Parallel.setThreads(2)
        var rng = TestRNG(state: UInt64(t.m * 7919 + t.n * 31 + t.k))
        let (aRows, aCols) = t.transA ? (t.k, t.m) : (t.m, t.k)
        let (bRows, bCols) = t.transB ? (t.n, t.k) : (t.k, t.n)
        let lda = aCols + 3, ldb = bCols + 5, ldc = t.n + 2
        let a = (0..<(aRows * lda)).map { _ in rng.float() }
        let b = (0..<(bRows * ldb)).map { _ in rng.float() }
        var c = (0..<(t.m * ldc)).map { _ in rng.float() }
        let want = Self.reference(transA: t.transA, transB: t.transB, m: t.m, n: t.n, k: t.k, alpha: 0.75, a: a, lda: lda,
                                  b: b, ldb: ldb, beta: 0.5, c: c, ldc: ldc)
        Gemm.sgemm(transA: t.transA, transB: t.transB, m: t.m, n: t.n, k: t.k, alpha: 0.75, a, lda: lda, b, ldb: ldb,
                   beta: 0.5, &c, ldc: ldc)
        var worst = 0.0
        for i in 0..<t.m {
            for j in 0..<ldc {
                let got = Double(c[i * ldc + j]), w = want[i * ldc + j]
                // Padding columns of C (j ≥ n) must be untouched: beta applies inside n only.
                worst = max(worst, abs(got - w) / (1 + abs(w)))
            }
        }
        #expect(worst < 1e-4 * Double(t.k).squareRoot(), "\(t): worst relative error \(worst)")
    }

    @Test("a product's bits do not depend on whether the worker pool was free")
    func independentOfPool() {
        let saved = Parallel.threads
        defer { Parallel.setThreads(saved) }
        Parallel.setThreads(2)
        var rng = TestRNG(state: 42)
        let m = 96, n = 640, k = 200
        let a = (0..<(m * k)).map { _ in rng.float() }, b = (0..<(n * k)).map { _ in rng.float() }
        #expect(Gemm.partCount(m: m, n: n, k: k) == 2)
        var free = [Float](repeating: 0, count: m * n)
        Gemm.sgemm(transB: true, m: m, n: n, k: k, a, lda: k, b, ldb: k, &free, ldc: n)
        // Inside a parallel-for the pool is held, so the blocks run one after another on this thread.
        var held = [Float](repeating: 0, count: m * n)
        held.withUnsafeMutableBufferPointer { out in
            let c = out.baseAddress!
            Parallel.forEachChunk(2) { range in
                if range.contains(0) { Gemm.sgemm(transB: true, m: m, n: n, k: k, a, lda: k, b, ldb: k, c, ldc: n) }
            }
        }
        #expect(free == held)
    }
}
