// Users' memories in the service: the level weights a user's requests run
// with (from a bounded LRU cache keyed by user and version, PostgreSQL
// behind it), the learning state the worker and the memory operations
// decode and encode, and where the learning maths runs (ComputeLanes).
import Foundation
import Memory
import Model
import Store
import Synchronization

/// The weights of users' current memory versions, least recently used
/// dropped first beyond `capacityBytes`. Keyed by user id and version: a
/// version's weights never change, so an entry is never stale; a request
/// reads the user's current version from the store first.
final class LevelCache: Sendable {
    struct Key: Hashable {
        let user: Int64
        let version: Int64
    }

    /// The entries (with their size and last use) and the counters, behind one lock.
    private struct Entries {
        var entries: [Key: (state: LevelState, bytes: Int, tick: UInt64)] = [:]
        var tick: UInt64 = 0
        var bytes = 0
        /// Lookups that found an entry, and those that did not (monotonic).
        var hits = 0
        var misses = 0
    }

    let capacityBytes: Int
    private let cache = Mutex(Entries())

    init(capacityBytes: Int) {
        self.capacityBytes = capacityBytes
    }

    func get(_ key: Key) -> LevelState? {
        cache.withLock { c in
            c.tick += 1
            guard let e = c.entries[key] else { c.misses += 1; return nil }
            c.hits += 1
            c.entries[key]!.tick = c.tick
            return e.state
        }
    }

    func put(_ key: Key, _ state: LevelState) {
        let size = state.blocks.joined().reduce(0) { $0 + $1.tensors.reduce(0) { $0 + 4 * $1.count } }
        guard size <= capacityBytes else { return }
        let capacity = capacityBytes
        cache.withLock { c in
            c.tick += 1
            if let old = c.entries[key] { c.bytes -= old.bytes }
            c.entries[key] = (state, size, c.tick)
            c.bytes += size
            while c.bytes > capacity, let oldest = c.entries.min(by: { $0.value.tick < $1.value.tick }) {
                c.bytes -= oldest.value.bytes
                c.entries[oldest.key] = nil
            }
        }
    }

    /// Drops every entry of the user (erasure).
    func remove(user: Int64) {
        cache.withLock { c in
            for key in c.entries.keys where key.user == user {
                c.bytes -= c.entries[key]!.bytes
                c.entries[key] = nil
            }
        }
    }

    func snapshot() -> (entries: Int, bytes: Int, hits: Int, misses: Int) {
        cache.withLock { c in (c.entries.count, c.bytes, c.hits, c.misses) }
    }
}

/// Decodes, runs and encodes users' level states for the service.
final class UserMemory: Sendable {
    let model: LlamaModel
    let levels: LevelConfiguration
    let store: any MemoryStore
    let cache: LevelCache
    /// Where the maths runs: light work at once, heavy work (learning,
    /// consolidation, audits) on background lanes that yield to generation.
    let lanes: ComputeLanes

    init(model: LlamaModel, levels: LevelConfiguration, store: any MemoryStore, cacheBytes: Int, lanes: ComputeLanes) {
        self.model = model
        self.levels = levels
        self.store = store
        self.lanes = lanes
        cache = LevelCache(capacityBytes: cacheBytes)
    }

    /// Runs `work` off the cooperative threads: `.light` (decoding or
    /// encoding a state, a reset) at once, `.heavy` (learning, consolidation,
    /// audits) on a background lane.
    func compute<T: Sendable>(_ kind: ComputeLanes.Kind, _ work: @escaping @Sendable () throws -> T) async throws -> T {
        try await lanes.run(kind, work)
    }

    /// The adapter for the user's current version: nil at a memory with no
    /// stored level (the backbone itself, so a new user's output is the backbone's).
    func adapter(for user: User) async throws -> LevelState? {
        let key = LevelCache.Key(user: user.id, version: user.version)
        if let state = cache.get(key) { return state }
        guard let stored = try await store.memory(userID: user.id, version: user.version, withLearner: false) else {
            // The version moved on since the user row was read: the caller retries with the new one.
            throw VersionMoved()
        }
        guard !stored.levels.isEmpty else { return nil }
        let state = try learner(stored).state   // a few milliseconds; not behind the learning queue
        cache.put(key, state)
        return state
    }

    struct VersionMoved: Error {}

    /// A user's stored memory that this server cannot read (made under
    /// another level configuration or backbone, or damaged): the request is
    /// refused with 409 and learning jobs are marked failed; nothing is changed.
    struct Unreadable: Error, CustomStringConvertible {
        let reason: String
        var description: String {
            "this user's stored memory cannot be read by this server (\(reason)); serve it with the level configuration it was made under, or reset or erase the user"
        }
    }

    /// The learner a stored memory holds.
    func learner(_ stored: StoredMemory) throws -> LevelLearner {
        try learner(levels: stored.levels, moments: stored.moments, learner: stored.learner)
    }

    /// The learner of stored parts (levels and moments by name; without
    /// them, fresh weights and a fresh optimizer under the stored counters).
    func learner(levels parts: [String: Data], moments: [String: Data] = [:], learner part: Data?) throws -> LevelLearner {
        do {
            return try LevelStateFile.decode(levels: parts, moments: moments, learner: part, model: model, configuration: levels)
        } catch let e as LevelStateFile.Incompatible {
            throw Unreadable(reason: e.description)
        }
    }

    /// A change writing the `changed` levels' weights (and marking the
    /// `fresh` ones fresh) and the version's learner part; with `current`,
    /// also what the user keeps while it is the current version: the learner
    /// part with its accumulators and the changed levels' optimizer moments
    /// (a learning round leaves those to its last job: `roundState`).
    func change(_ learner: LevelLearner, changed: [Int], fresh: [Int] = [], cause: MemoryCause, causeID: String?,
                actor: String, current: Bool = true) throws -> MemoryChange {
        var parts: [String: Data?] = [:], shapes: [String: String] = [:], moments: [String: Data?] = [:]
        for l in changed {
            let name = levels.levels[l].name
            let part = try LevelStateFile.encodeLevel(learner, level: l, backbone: model.fingerprint)
            parts[name] = part
            shapes[name] = Safetensors.shapesJSON(part)
            if current { moments[name] = try LevelStateFile.encodeMoments(learner, level: l, backbone: model.fingerprint) }
        }
        for l in fresh {
            parts[levels.levels[l].name] = .some(nil)
            moments[levels.levels[l].name] = .some(nil)
        }
        return MemoryChange(levels: parts, shapes: shapes,
                            learner: try LevelStateFile.encodeLearner(learner, accumulators: false, backbone: model.fingerprint),
                            working: current ? try LevelStateFile.encodeLearner(learner, backbone: model.fingerprint) : nil,
                            moments: current ? moments : [:], cause: cause, causeID: causeID, actor: actor)
    }

    /// What a learning round leaves its user with after `changes` (in
    /// order): the learner part with its accumulators, and the optimizer
    /// moments of every level a change named (nil for one it left fresh).
    func roundState(_ learner: LevelLearner, after changes: [MemoryChange?]) throws -> (learner: Data, moments: [String: Data?]) {
        var fresh: [String: Bool] = [:]
        for change in changes.compactMap({ $0 }) {
            for (name, part) in change.levels { fresh[name] = part == nil }
        }
        var moments: [String: Data?] = [:]
        for (l, level) in levels.levels.enumerated() {
            guard let isFresh = fresh[level.name] else { continue }
            moments[level.name] = isFresh ? .some(nil) : try LevelStateFile.encodeMoments(learner, level: l, backbone: model.fingerprint)
        }
        return (try LevelStateFile.encodeLearner(learner, backbone: model.fingerprint), moments)
    }

    /// The server's level configuration has no level to consolidate into (→ 400).
    struct NotConsolidable: Error, CustomStringConvertible {
        var description: String { "consolidation needs at least two levels in the server's level configuration" }
    }

    /// What a consolidation did, for its reply, audit event and metrics.
    struct Consolidated {
        var klBefore = 0.0, klAfter = 0.0, steps = 0, written = 0
        /// The new version's change (nil: nothing to consolidate, nothing changed).
        var change: MemoryChange?

        var details: [String: Double] {
            ["kl_before": klBefore, "kl_after": klAfter, "steps": Double(steps), "units_written": Double(written)]
        }
    }

    /// Consolidates `learner`'s fastest level into the next slower one by
    /// `method` (fast cleared) and makes the version change, cause
    /// `consolidate` (`current` as for `change`). With nothing to learn from
    /// it changes nothing.
    func consolidate(_ learner: LevelLearner, method: ConsolidationConfiguration.Method, budget: ConsolidationBudget,
                     sleep: SleepConfiguration, actor: String, current: Bool = true) throws -> Consolidated {
        guard let (fast, mid) = levels.consolidation else { throw NotConsolidable() }
        var out = Consolidated()
        switch method {
        case .distill, .transplant:
            let r = try learner.consolidate(contexts: learner.recentTokens, level: fast, into: mid, budget: budget,
                                            transplant: method == .transplant)
            (out.klBefore, out.klAfter, out.steps, out.written) = (r.klBefore, r.klAfter, r.steps, r.written)
        case .sleep:
            let r = try learner.sleep(texts: learner.recentTexts, configuration: sleep)
            (out.klBefore, out.klAfter, out.steps) = (r.klBefore, r.klAfter, r.steps)
        }
        if out.steps > 0 || out.written > 0 {
            out.change = try change(learner, changed: [mid], fresh: [fast], cause: .consolidate, causeID: nil, actor: actor,
                                    current: current)
        }
        return out
    }

    /// The norm of what the fastest level adds (Drift.norms over its layers).
    func fastNorm(_ learner: LevelLearner) -> Double {
        guard let (fast, _) = levels.consolidation else { return 0 }
        return Drift.norms(learner.state)[fast].reduce(0) { $0 + $1 * $1 }.squareRoot()
    }
}
