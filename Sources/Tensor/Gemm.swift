// Gemm: every fp32 matrix product in Continuum, through OpenBLAS's sgemm run
// single-threaded, its parallelism ours.
//
// OpenBLAS's own threads are process-wide, spin at normal priority and
// serialise concurrent multi-threaded calls on one lock, so a learning lane's
// product made a generation step's prefill wait behind it. Here OpenBLAS runs
// on the calling thread only, and a large product is split into column (or
// row) blocks of C run on `Parallel`'s worker pool, which a background
// thread leaves to a foreground step (see `Parallel.foreground`). The blocks
// depend only on the product's shape and the configured thread count, never
// on who holds the pool, so a product's bits do not depend on the load.
import CBLAS
import Foundation

public enum Gemm {
    /// Products with fewer multiply-adds run as one call.
    static let parallelWork = 1 << 18
    /// Blocks are multiples of this many rows or columns of C.
    static let unit = 16

    /// OpenBLAS on the calling thread only (once per process, before any product).
    private static let singleThreaded: Void = openblas_set_num_threads(1)

    /// C = alpha · op(A) · op(B) + beta · C, row-major, op(X) = Xᵀ when `trans…`.
    ///   op(A): [m, k] (A stored [m, lda] or, transposed, [k, lda])
    ///   op(B): [k, n] (B stored [k, ldb] or, transposed, [n, ldb])
    ///   C:     [m, ldc]
    /// `parallel: false` runs it on the calling thread in one call (for
    /// callers that already split their work across threads).
    public static func sgemm(transA: Bool = false, transB: Bool = false, m: Int, n: Int, k: Int, alpha: Float = 1,
                             _ a: UnsafePointer<Float>, lda: Int, _ b: UnsafePointer<Float>, ldb: Int, beta: Float = 0,
                             _ c: UnsafeMutablePointer<Float>, ldc: Int, parallel: Bool = true) {
        _ = singleThreaded
        guard m > 0 && n > 0 else { return }
        let parts = parallel ? partCount(m: m, n: n, k: k) : 1
        if parts == 1 {
            call(transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
            return
        }
        // Split C's longer side; block p is [lo, hi) of it in whole units.
        let byColumns = n >= m
        let side = byColumns ? n : m
        let units = (side + unit - 1) / unit
        Parallel.forEachChunk(parts) { range in
            for p in range {
                let lo = min(side, units * p / parts * unit), hi = min(side, units * (p + 1) / parts * unit)
                guard lo < hi else { continue }
                if byColumns {
                    // op(B)[:, lo..<hi]: columns of B, or rows of a transposed B.
                    call(transA, transB, m, hi - lo, k, alpha, a, lda, transB ? b + lo * ldb : b + lo, ldb, beta,
                         c + lo, ldc)
                } else {
                    // op(A)[lo..<hi, :]: rows of A, or columns of a transposed A.
                    call(transA, transB, hi - lo, n, k, alpha, transA ? a + lo : a + lo * lda, lda, b, ldb, beta,
                         c + lo * ldc, ldc)
                }
            }
        }
    }

    /// How many blocks a product is split into: one per thread when it is
    /// large enough and its longer side has a unit per thread.
    static func partCount(m: Int, n: Int, k: Int) -> Int {
        let threads = Parallel.threads
        guard threads > 1, m * n * k >= parallelWork else { return 1 }
        return max(1, min(threads, (max(m, n) + unit - 1) / unit))
    }

    private static func call(_ transA: Bool, _ transB: Bool, _ m: Int, _ n: Int, _ k: Int, _ alpha: Float,
                             _ a: UnsafePointer<Float>, _ lda: Int, _ b: UnsafePointer<Float>, _ ldb: Int, _ beta: Float,
                             _ c: UnsafeMutablePointer<Float>, _ ldc: Int) {
        cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
                    Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }
}
