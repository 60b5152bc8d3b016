// Parallel: how many threads the kernels use, and a parallel-for over chunks
// run by a small pool of persistent workers.
import CKernels
import Foundation
import Synchronization

/// Thread settings shared by every kernel in the process.
public enum Parallel {
    private static let threadCount = Atomic<Int>(ProcessInfo.processInfo.activeProcessorCount)

    /// Workers besides the calling thread, one per extra core. The pool is
    /// the process's, as the loaded model is: its threads sleep on a condition
    /// when idle, are shared by every application and command in the process,
    /// and end with it (a service's own threads — batch engine, compute
    /// lanes — are lifecycle services that stop with their application).
    static let pool = WorkerPool(workers: max(1, ProcessInfo.processInfo.activeProcessorCount - 1))

    /// Number of threads kernels split work across, fp32 products included
    /// (OpenBLAS itself runs single-threaded, see `Gemm`).
    public static var threads: Int { threadCount.load(ordering: .relaxed) }

    /// Sets the thread count for every kernel.
    public static func setThreads(_ n: Int) {
        threadCount.store(max(1, n), ordering: .relaxed)
    }

    /// Foreground steps (generation) in progress, process-wide.
    private static let foregroundSteps = Atomic<Int>(0)

    /// Runs `body` as a foreground step: while it runs, background threads'
    /// parallel-fors (learning) leave the worker pool to it and run on their
    /// own thread.
    public static func foreground<T>(_ body: () throws -> T) rethrows -> T {
        foregroundSteps.add(1, ordering: .relaxed)
        defer { foregroundSteps.subtract(1, ordering: .relaxed) }
        return try body()
    }

    /// Marks the calling thread, for its lifetime, as a background thread
    /// (see `foreground`) and lowers its scheduling priority to `nice`
    /// (Linux, per thread). Returns false where the priority could not be set.
    @discardableResult
    public static func becomeBackgroundThread(nice: Int32) -> Bool {
        ck_set_background_thread(1)
        return ck_set_thread_nice(nice) == 0
    }

    /// Whether the calling thread is a background thread.
    public static var isBackgroundThread: Bool { ck_is_background_thread() != 0 }

    /// Calls `body(range)` on disjoint chunks covering `0..<count`, in
    /// parallel when more than one thread is configured and the work is large
    /// enough. `minChunk` is the smallest range worth a thread of its own.
    /// Returns when every chunk is done.
    public static func forEachChunk(_ count: Int, minChunk: Int = 1, _ body: (Range<Int>) -> Void) {
        let parts = min(threads, pool.workers + 1, max(1, count / max(1, minChunk)))
        let yields = parts > 1 && foregroundSteps.load(ordering: .relaxed) > 0 && ck_is_background_thread() != 0
        if parts > 1 && !yields {
            let ran = pool.run(parts: parts) { p in
                let lo = count * p / parts, hi = count * (p + 1) / parts
                if lo < hi { body(lo..<hi) }
            }
            if ran { return }
        }
        // One thread, the pool busy with another caller's work, or a background caller yielding it.
        body(0..<count)
    }
}

/// Persistent worker threads that run one parallel-for at a time. Workers
/// spin briefly waiting for the next job (decode steps issue one every few
/// tens of microseconds), then sleep on a condition. Every worker checks in
/// for every job, so no worker can see a job's closure after `run` returns.
final class WorkerPool: @unchecked Sendable {
    let workers: Int
    private let epoch = Atomic<Int>(0)
    private let remaining = Atomic<Int>(0)
    private let sleepers = Atomic<Int>(0)
    private let busy = Atomic<Bool>(false)
    private let condition = NSCondition()
    // Written by `run` before it bumps `epoch`; read by workers after they see it.
    private var task: (Int) -> Void = { _ in }
    private var parts = 0
    /// Spin iterations (PAUSE) before a worker sleeps: roughly 100 µs.
    private let spinLimit = 2000

    init(workers: Int) {
        self.workers = workers
        for i in 1...workers {
            let t = Thread { [unowned self] in self.workerLoop(index: i) }
            t.name = "continuum-worker-\(i)"
            t.start()
        }
    }

    /// Runs `body(p)` for p in 0..<parts (parts ≤ workers + 1), part 0 on the
    /// calling thread. Returns false without running anything when another
    /// caller holds the pool.
    func run(parts: Int, _ body: (Int) -> Void) -> Bool {
        guard busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged else { return false }
        withoutActuallyEscaping(body) { body in
            task = body
            self.parts = parts
            remaining.store(workers, ordering: .relaxed)
            // Sequentially consistent, with the worker's sleepers increment and
            // epoch check: either this sees the sleeper or the sleeper sees the new epoch.
            epoch.wrappingAdd(1, ordering: .sequentiallyConsistent)
            if sleepers.load(ordering: .sequentiallyConsistent) > 0 {
                condition.lock()
                condition.broadcast()
                condition.unlock()
            }
            body(0)
            while remaining.load(ordering: .acquiring) > 0 { ck_cpu_relax() }
            task = { _ in }
        }
        busy.store(false, ordering: .releasing)
        return true
    }

    private func workerLoop(index: Int) {
        var seen = 0
        while true {
            var spins = 0
            while epoch.load(ordering: .acquiring) == seen {
                spins += 1
                if spins < spinLimit {
                    ck_cpu_relax()
                    continue
                }
                condition.lock()
                sleepers.wrappingAdd(1, ordering: .sequentiallyConsistent)
                while epoch.load(ordering: .sequentiallyConsistent) == seen { condition.wait() }
                sleepers.wrappingSubtract(1, ordering: .acquiringAndReleasing)
                condition.unlock()
            }
            seen = epoch.load(ordering: .acquiring)
            if index < parts { task(index) }
            remaining.wrappingSubtract(1, ordering: .releasing)
        }
    }
}
