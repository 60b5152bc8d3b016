// Parallel: how many threads the kernels use, and a parallel-for over chunks.
import CBLAS
import Dispatch
import Synchronization

/// Thread settings shared by every kernel in the process.
public enum Parallel {
    private static let threadCount = Atomic<Int>(defaultThreads())

    private static func defaultThreads() -> Int {
        var cpus = 1
        #if os(Linux)
        cpus = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        #endif
        return max(1, cpus)
    }

    /// Number of threads kernels split work across (and OpenBLAS uses).
    public static var threads: Int { threadCount.load(ordering: .relaxed) }

    /// Sets the thread count for our kernels and for OpenBLAS.
    public static func setThreads(_ n: Int) {
        let n = max(1, n)
        threadCount.store(n, ordering: .relaxed)
        openblas_set_num_threads(Int32(n))
    }

    /// Calls `body(range)` on disjoint chunks covering `0..<count`, in
    /// parallel when more than one thread is configured and the work is large
    /// enough. `minChunk` is the smallest range worth a thread of its own.
    public static func forEachChunk(_ count: Int, minChunk: Int = 1, _ body: (Range<Int>) -> Void) {
        let parts = min(threads, max(1, count / max(1, minChunk)))
        if parts <= 1 {
            body(0..<count)
            return
        }
        // The chunks are disjoint and the call returns only when all are done,
        // so sharing the non-Sendable body across threads is safe.
        withoutActuallyEscaping(body) { body in
            let shared = UncheckedSendable(body)
            DispatchQueue.concurrentPerform(iterations: parts) { p in
                let lo = count * p / parts
                let hi = count * (p + 1) / parts
                if lo < hi { shared.value(lo..<hi) }
            }
        }
    }
}

/// Wraps a value the caller guarantees is used safely across threads.
struct UncheckedSendable<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

#if os(Linux)
import Glibc
#endif
