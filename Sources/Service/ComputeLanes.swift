// ComputeLanes: where the service's maths runs, off the event loops and the
// cooperative threads, and how it shares the cores with generation.
//
//   light  decoding a state's counters (GET …/memory), export, import, reset:
//          milliseconds; a concurrent queue, never behind heavy work
//   heavy  learning rounds, consolidations, audits: seconds; `lanes`
//          threads (one per learning worker), each one job at a time, FIFO
//
// Generation has priority by design: the batch engine's steps run at normal
// priority as foreground steps (`Parallel.foreground`); the heavy lanes run
// at niceness `nice` and as background threads, whose parallel-fors leave
// the kernels' worker pool to a generation step in progress. When nobody is
// generating, learning has every core.
import Foundation
import Tensor

final class ComputeLanes: @unchecked Sendable {
    enum Kind: Sendable {
        case light, heavy
    }

    let lanes: Int
    let nice: Int32
    private let light = DispatchQueue(label: "continuum.compute.light", attributes: .concurrent)
    private let condition = NSCondition()
    // Guarded by `condition`.
    private var jobs: [() -> Void] = []
    private var started = false
    private var stopping = false

    /// `lanes` heavy threads (at least one) at niceness `nice`; they start with `run()`.
    init(lanes: Int, nice: Int32 = 5) {
        self.lanes = max(1, lanes)
        self.nice = nice
    }

    /// Runs `work` on a light queue or a heavy lane; heavy work waits for a free lane.
    func run<T: Sendable>(_ kind: Kind, _ work: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { c in
            switch kind {
            case .light:
                light.async { c.resume(with: Result { try work() }) }
            case .heavy:
                condition.lock()
                if stopping {
                    condition.unlock()
                    c.resume(throwing: BatchEngine.ShutDown())
                    return
                }
                jobs.append { c.resume(with: Result { try work() }) }
                condition.signal()
                condition.unlock()
            }
        }
    }

    /// Heavy jobs waiting for a lane now.
    var waiting: Int {
        condition.lock()
        defer { condition.unlock() }
        return jobs.count
    }

    /// Runs the heavy lanes' threads until `shutdown()`; returns when every one has ended.
    func run() async {
        markStarted()
        await withTaskGroup(of: Void.self) { group in
            for i in 0..<lanes {
                group.addTask { [self] in
                    await ServiceThreads.run(named: "continuum.learning-\(i + 1)") { [self] in
                        Parallel.becomeBackgroundThread(nice: nice)
                        loop()
                    }
                }
            }
        }
    }

    private func markStarted() {
        condition.lock()
        defer { condition.unlock() }
        precondition(!started, "the compute lanes run once")
        started = true
    }

    /// Stops the lanes once the jobs waiting have run (by then the server
    /// and the learning workers, which stop first, submit nothing more);
    /// later heavy work is refused with `ShutDown`.
    func shutdown() {
        condition.lock()
        stopping = true
        condition.broadcast()
        condition.unlock()
    }

    private func loop() {
        while true {
            condition.lock()
            while jobs.isEmpty && !stopping { condition.wait() }
            if stopping && jobs.isEmpty {
                condition.unlock()
                return
            }
            let job = jobs.removeFirst()
            condition.unlock()
            job()
        }
    }
}
