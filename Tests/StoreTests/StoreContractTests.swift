// The store's contract, run against PostgreSQL (the store of record) and
// the in-memory double alike, so the double cannot drift from the real
// thing: users within tenants, versions with provenance, all-or-nothing
// changes, pruning, rollback, fork, erasure, the learning queue (claim,
// apply, fail, retry, exactly once with two workers), the audit's events,
// reports, rankings and settings.
import Foundation
import StoreTestSupport
import Testing
@testable import Store

enum StoreKind: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case postgres, memory
    var testDescription: String { rawValue }

    /// A fresh, migrated store with one tenant "acme" (and "other").
    func make() async throws -> (any ContinuumStore, acme: Tenant, other: Tenant, close: @Sendable () async -> Void) {
        let store: any ContinuumStore
        let close: @Sendable () async -> Void
        switch self {
        case .postgres:
            let db = try await TestDatabase.make()
            try await db.migrate()
            store = db
            close = { await db.close() }
        case .memory:
            store = InMemoryStore()
            close = {}
        }
        return (store, try await store.createTenant(name: "acme"), try await store.createTenant(name: "other"), close)
    }
}

/// A part the tests store as a level or learner part (the store keeps bytes; it never decodes them).
func part(_ s: String) -> Data { Data(s.utf8) }

struct Boom: Error {}

@Suite("Store contract")
struct StoreContractTests {
    @Test("users live within their tenant; version 0 is created with the user", arguments: StoreKind.allCases)
    func users(kind: StoreKind) async throws {
        let (store, acme, other, close) = try await kind.make()
        let name = try UserName("alice")
        #expect(try await store.user(tenantID: acme.id, name: name) == nil)
        let alice = try #require(try await store.user(tenantID: acme.id, name: name, create: true))
        #expect(alice.version == 0 && alice.name == "alice" && alice.jobsApplied == 0 && !alice.frozen && alice.learns)
        #expect(try await store.user(tenantID: acme.id, name: name, create: true)?.id == alice.id)
        #expect(try await store.user(tenantID: other.id, name: name) == nil)
        #expect(try await store.user(id: alice.id, tenantID: other.id) == nil)
        #expect(try await store.user(id: alice.id, tenantID: acme.id)?.name == "alice")
        #expect(try await store.versions(userID: alice.id).map(\.cause) == [.created])
        let m = try #require(try await store.memory(userID: alice.id))
        #expect(m.version == 0 && m.levels.isEmpty && m.learner == nil)
        await close()
    }

    @Test("a change is a new version with provenance; a body that throws changes nothing; old versions are pruned", arguments: StoreKind.allCases)
    func versions(kind: StoreKind) async throws {
        let (store, acme, _, close) = try await kind.make()
        let alice = try #require(try await store.user(tenantID: acme.id, name: try UserName("alice"), create: true))
        let m1 = try await store.mutateMemory(userID: alice.id, keep: 3) { current in
            #expect(current.version == 0)
            return MemoryChange(levels: ["fast": part("fast-1")], learner: part("learner-1"), cause: .reset, causeID: "fast", actor: "key:1")
        }
        #expect(m1.version == 1)
        let stored = try #require(try await store.memory(userID: alice.id))
        #expect(stored.levels == ["fast": part("fast-1")] && stored.learner == part("learner-1"))
        #expect(try await store.memory(userID: alice.id, version: 1, withLearner: false, withLevels: false)?.levels.isEmpty == true)
        await #expect(throws: Boom.self) {
            _ = try await store.mutateMemory(userID: alice.id, keep: 3) { _ in throw Boom() }
        }
        #expect(try await store.user(id: alice.id, tenantID: acme.id)?.version == 1)
        // A nil change leaves the memory as it is.
        #expect(try await store.mutateMemory(userID: alice.id, keep: 3) { _ in nil }.version == 1)
        for i in 2...5 {
            _ = try await store.mutateMemory(userID: alice.id, keep: 3) { _ in
                MemoryChange(levels: i == 4 ? ["fast": nil] : ["mid": part("mid-\(i)")], learner: part("learner-\(i)"), cause: .consolidate,
                             actor: "key:1")
            }
        }
        let kept = try await store.versions(userID: alice.id)
        #expect(kept.map(\.version) == [5, 4, 3])
        #expect(kept.first?.levels.keys.sorted() == ["mid"] && kept.first?.parent == 4 && kept.first?.actor == "key:1")
        #expect(try await store.memory(userID: alice.id, version: 1) == nil)
        let v3 = try #require(try await store.memory(userID: alice.id, version: 3))
        #expect(v3.levels == ["fast": part("fast-1"), "mid": part("mid-3")] && v3.learner == part("learner-3"))
        let events = try await store.auditEvents(userID: alice.id).map(\.event)
        #expect(events == [.reset, .consolidate, .consolidate, .consolidate, .consolidate])
        await close()
    }

    @Test("rollback makes a kept version current again, or reports why not; fork copies; erase leaves a tombstone", arguments: StoreKind.allCases)
    func rollbackForkErase(kind: StoreKind) async throws {
        let (store, acme, _, close) = try await kind.make()
        let alice = try #require(try await store.user(tenantID: acme.id, name: try UserName("alice"), create: true))
        for i in 1...2 {
            _ = try await store.mutateMemory(userID: alice.id, keep: 10) { _ in
                MemoryChange(levels: ["fast": part("f\(i)")], learner: part("l\(i)"), cause: .learning, actor: "key:1")
            }
        }
        #expect(try await store.rollback(userID: alice.id, to: 7, keep: 10, actor: "key:1") == .notKept)
        #expect(try await store.rollback(userID: alice.id, to: 1, keep: 10, actor: "p", cancelQueued: false, ifCurrent: 1) == .moved(current: 2))
        guard case .rolledBack(let r) = try await store.rollback(userID: alice.id, to: 1, keep: 10, actor: "key:1") else {
            Issue.record("not rolled back"); await close(); return
        }
        #expect(r.version == 3)
        let now = try #require(try await store.memory(userID: alice.id))
        #expect(now.levels == ["fast": part("f1")] && now.learner == part("l1"))
        let newest = try #require(try await store.versions(userID: alice.id).first)
        #expect(newest.cause == .rollback && newest.causeID == "1")

        let bob = try await store.forkUser(source: alice, version: 2, target: try UserName("bob"), actor: "key:1")
        let forked = try #require(try await store.memory(userID: bob.id))
        #expect(bob.version == 1 && forked.levels == ["fast": part("f2")] && forked.learner == part("l2"))
        await #expect(throws: Conflict.self) { _ = try await store.forkUser(source: alice, version: nil, target: try UserName("bob"), actor: "k") }
        await #expect(throws: NotFound.self) { _ = try await store.forkUser(source: alice, version: 99, target: try UserName("carl"), actor: "k") }

        #expect(try await store.eraseUser(tenantID: acme.id, name: try UserName("alice"), actor: "key:1"))
        #expect(try await store.eraseUser(tenantID: acme.id, name: try UserName("alice"), actor: "key:1") == false)
        #expect(try await store.user(tenantID: acme.id, name: try UserName("alice")) == nil)
        #expect(try await store.auditEvents(userID: alice.id).isEmpty)
        let tombstone = try #require(try await store.auditEvents(tenantID: acme.id).last)
        #expect(tombstone.event == .erase && tombstone.userID == nil && tombstone.fromVersion == 3)
        // The fork keeps its own copy.
        #expect(try await store.memory(userID: bob.id)?.levels == ["fast": part("f2")])
        await close()
    }

    @Test("the optimizer's state (working learner part, moments) is the current version's only: rounds and changes write it, rollback drops it, fork at the current version copies it", arguments: StoreKind.allCases)
    func optimizerState(kind: StoreKind) async throws {
        let (store, acme, _, close) = try await kind.make()
        let alice = try #require(try await store.user(tenantID: acme.id, name: try UserName("alice"), create: true))
        _ = try await store.mutateMemory(userID: alice.id, keep: 10) { _ in
            MemoryChange(levels: ["mid": part("m1"), "fast": part("f1")], learner: part("v1"), working: part("w1"),
                         moments: ["mid": part("mm1"), "fast": part("fm1")], cause: .import, actor: "key:1")
        }
        var now = try #require(try await store.memory(userID: alice.id))
        #expect(now.learner == part("w1") && now.moments == ["mid": part("mm1"), "fast": part("fm1")])
        // Read without levels or without the learner part: no moments.
        #expect(try await store.memory(userID: alice.id, version: nil, withLearner: true, withLevels: false)?.moments.isEmpty == true)
        #expect(try await store.memory(userID: alice.id, version: nil, withLearner: false, withLevels: true)?.moments.isEmpty == true)
        // A learning round: versions without working state; the round's learner part and moments at its end.
        _ = try await store.recordGeneration(id: UUID(), userID: alice.id, memoryVersion: 1, prompt: [1], completion: [2],
                                             job: LearningRequest(tokens: [1, 2], learnable: [false, true]), actor: "key:1")
        let applied = try await store.learnNext(limit: 8, keep: 10, failed: nil) { _, stored, jobs in
            #expect(stored.learner == part("w1") && stored.moments["fast"] == part("fm1"))
            return LearningOutcome(changes: jobs.map { _ in
                MemoryChange(levels: ["fast": part("f2")], learner: part("v2"), working: part("ignored"),
                             moments: ["mid": nil], cause: .learning, actor: "key:1")
            }, learner: part("w2"), moments: ["fast": part("fm2")])
        }
        #expect(applied?.count == 1)
        now = try #require(try await store.memory(userID: alice.id))
        #expect(now.version == 2 && now.learner == part("w2") && now.moments == ["mid": part("mm1"), "fast": part("fm2")])
        // An older version: its own learner part, no moments.
        let v1 = try #require(try await store.memory(userID: alice.id, version: 1))
        #expect(v1.learner == part("v1") && v1.moments.isEmpty)
        // A change that leaves a level fresh drops its moments; one not named keeps them.
        _ = try await store.mutateMemory(userID: alice.id, keep: 10) { _ in
            MemoryChange(levels: ["fast": nil], learner: part("v3"), moments: ["fast": nil], cause: .reset, actor: "key:1")
        }
        now = try #require(try await store.memory(userID: alice.id))
        #expect(now.learner == part("v3") && now.moments == ["mid": part("mm1")])
        // Fork at the current version copies the optimizer's state; at an older one, not.
        let bob = try await store.forkUser(source: alice, version: nil, target: try UserName("bob"), actor: "key:1")
        let forked = try #require(try await store.memory(userID: bob.id))
        #expect(forked.learner == part("v3") && forked.moments == ["mid": part("mm1")])
        let carl = try await store.forkUser(source: alice, version: 2, target: try UserName("carl"), actor: "key:1")
        let older = try #require(try await store.memory(userID: carl.id))
        #expect(older.levels == ["mid": part("m1"), "fast": part("f2")] && older.learner == part("v2") && older.moments.isEmpty)
        // Rollback: the version's weights and learner part; the optimizer starts afresh.
        guard case .rolledBack = try await store.rollback(userID: alice.id, to: 2, keep: 10, actor: "key:1") else {
            Issue.record("not rolled back"); await close(); return
        }
        now = try #require(try await store.memory(userID: alice.id))
        #expect(now.levels == ["mid": part("m1"), "fast": part("f2")] && now.learner == part("v2") && now.moments.isEmpty)
        // Erase leaves none of it.
        #expect(try await store.eraseUser(tenantID: acme.id, name: try UserName("bob"), actor: "key:1"))
        if let db = store as? Database {
            #expect(try await db.integer(unsafeSQL: "SELECT count(*)::bigint FROM level_moments WHERE user_id = \(bob.id)") == 0)
        }
        await close()
    }

    @Test("the queue: jobs claimed per user, oldest first, applied wholly, exactly once; failures marked; errors retried",
          arguments: StoreKind.allCases)
    func queue(kind: StoreKind) async throws {
        let (store, acme, other, close) = try await kind.make()
        let alice = try #require(try await store.user(tenantID: acme.id, name: try UserName("alice"), create: true))
        let bob = try #require(try await store.user(tenantID: acme.id, name: try UserName("bob"), create: true))
        func enqueue(_ user: User) async throws -> Int64 {
            try #require(try await store.recordGeneration(id: UUID(), userID: user.id, memoryVersion: user.version, prompt: [1, 2, 3],
                                                          completion: [4], job: LearningRequest(tokens: [1, 2, 3], learnable: [false, true, true]),
                                                          actor: "key:1"))
        }
        let a1 = try await enqueue(alice), b1 = try await enqueue(bob), a2 = try await enqueue(alice)
        #expect(try await store.queuedJobs(userID: alice.id) == 2)
        #expect(try await store.queuedJobs().count == 3)
        #expect(try await store.jobState(id: a1)?.state == .queued)
        // A body that throws: nothing applied, the jobs stay queued.
        await #expect(throws: Boom.self) { _ = try await store.learnNext(limit: 8, keep: 10) { _, _, _ in throw Boom() } }
        #expect(try await store.queuedJobs().count == 3)
        // Alice's jobs first (her oldest job is oldest), both in one round, in order; the first changes a level.
        let round = try #require(try await store.learnNext(limit: 8, keep: 10) { user, memory, jobs in
            #expect(user.id == alice.id && memory.version == 0 && jobs.map(\.id) == [a1, a2])
            return LearningOutcome(changes: [MemoryChange(levels: ["fast": part("x")], learner: nil, cause: .learning, actor: "key:1"), nil],
                                   learner: part("after"))
        })
        #expect(round.map(\.job.id) == [a1, a2] && round.map(\.version) == [1, 1])
        let a2State = try #require(try await store.jobState(id: a2))
        #expect(a2State.state == .done && a2State.version == 1)
        let after = try #require(try await store.user(id: alice.id, tenantID: acme.id))
        let learnerAfter = try await store.memory(userID: alice.id)?.learner
        #expect(after.version == 1 && after.jobsApplied == 2 && learnerAfter == part("after"))
        // Bob next; a frozen user is skipped; then nothing is left.
        try await store.setFrozen(userID: bob.id, true, actor: "policy")
        #expect(try await store.learnNext(limit: 8, keep: 10) { _, _, _ in Issue.record("a frozen user was claimed"); return LearningOutcome(changes: [], learner: nil) } == nil)
        #expect(try await store.jobState(id: b1)?.frozen == true)
        try await store.setFrozen(userID: bob.id, false, actor: "key:1")
        // Bob's stored memory cannot be read: his job is failed, audited, not retried.
        let failures = FailedJobs()
        let failed = try await store.learnNext(limit: 8, keep: 10, failed: { jobs, reason in failures.add(jobs.map(\.id), reason) }) { _, _, _ in
            throw JobsUnlearnable(reason: "made under another configuration")
        }
        #expect(failed?.isEmpty == true && failures.value == [[b1]])
        #expect(try await store.jobState(id: b1)?.state == .failed)
        #expect(try await store.auditEvents(userID: bob.id).map(\.event).contains(.learningFailed))
        #expect(try await store.learnNext(limit: 8, keep: 10) { _, _, _ in LearningOutcome(changes: [], learner: nil) } == nil)
        // Another tenant's generation is not found.
        let g = UUID()
        _ = try await store.recordGeneration(id: g, userID: alice.id, memoryVersion: 1, prompt: [1], completion: [2], job: nil, actor: "k")
        #expect(try await store.generation(id: g, tenantID: other.id) == nil)
        let stored = try #require(try await store.generation(id: g, tenantID: acme.id))
        let (_, job) = try await store.recordFeedback(generation: stored, rating: "positive", correction: nil,
                                                      job: LearningRequest(tokens: [1, 2], learnable: [false, true]), actor: "k")
        #expect(try await store.jobState(id: try #require(job))?.state == .queued)
        await close()
    }

    @Test("two workers: every job applied exactly once, one round per user at a time", arguments: StoreKind.allCases)
    func exactlyOnce(kind: StoreKind) async throws {
        let (store, acme, _, close) = try await kind.make()
        var users: [User] = []
        for i in 0..<3 { users.append(try #require(try await store.user(tenantID: acme.id, name: try UserName("u\(i)"), create: true))) }
        var ids: [Int64] = []
        for i in 0..<30 {
            ids.append(try #require(try await store.recordGeneration(id: UUID(), userID: users[i % 3].id, memoryVersion: 0, prompt: [1, 2],
                                                                     completion: [], job: LearningRequest(tokens: [1, 2], learnable: [false, true]),
                                                                     actor: "k")))
        }
        let busy = BusyUsers()
        let applied = try await withThrowingTaskGroup(of: [Int64].self) { group in
            for _ in 0..<2 {
                group.addTask {
                    var mine: [Int64] = []
                    while let round = try await store.learnNext(limit: 4, keep: 100, { user, _, jobs in
                        busy.enter(user.id)
                        try await Task.sleep(for: .milliseconds(5))
                        busy.leave(user.id)
                        return LearningOutcome(changes: jobs.map { _ in MemoryChange(levels: [:], learner: nil, cause: .learning, actor: "k") },
                                               learner: nil)
                    }) {
                        mine += round.map(\.job.id)
                    }
                    return mine
                }
            }
            return try await group.reduce(into: []) { $0 += $1 }
        }
        #expect(applied.sorted() == ids.sorted(), "each job once")
        #expect(busy.overlapped == false, "two rounds of one user at once")
        for u in users { #expect(try await store.user(id: u.id, tenantID: acme.id)?.version == 10) }
        await close()
    }

    @Test("consolidation jobs: counted tokens, one waiting per user whoever enqueues, idle sweep, applied in order, counter cleared",
          arguments: StoreKind.allCases)
    func consolidationJobs(kind: StoreKind) async throws {
        let (store, acme, _, close) = try await kind.make()
        let alice = try #require(try await store.user(tenantID: acme.id, name: try UserName("alice"), create: true))
        let bob = try #require(try await store.user(tenantID: acme.id, name: try UserName("bob"), create: true))
        func enqueue(_ user: User, learnable: Int) async throws -> Int64 {
            let tokens = Array(1...(learnable + 1))
            return try #require(try await store.recordGeneration(
                id: UUID(), userID: user.id, memoryVersion: 0, prompt: tokens, completion: [],
                job: LearningRequest(tokens: tokens, learnable: [false] + Array(repeating: true, count: learnable)), actor: "key:1"))
        }
        func learn(_ f: @escaping @Sendable (User, [LearningJob]) -> LearningOutcome) async throws -> [AppliedJob]? {
            try await store.learnNext(limit: 8, keep: 10) { user, _, jobs in f(user, jobs) }
        }
        // Nobody has learned anything: the sweep finds no one.
        #expect(try await store.enqueueIdleConsolidations(idleSeconds: 0, limit: 10).isEmpty)
        // Alice learns 3 + 4 tokens in one round that asks for a consolidation (trigger tokens).
        _ = try await enqueue(alice, learnable: 3)
        _ = try await enqueue(alice, learnable: 4)
        let first = try #require(try await learn { user, jobs in
            #expect(user.unconsolidatedTokens == 0)
            return LearningOutcome(changes: [MemoryChange(levels: ["fast": part("f1")], learner: nil, cause: .learning, actor: "key:1"), nil],
                                   taughtTokens: jobs.map { $0.learnable.filter { $0 }.count }, learner: part("l1"), consolidate: .tokens)
        })
        #expect(first.count == 2)
        #expect(try await store.user(id: alice.id, tenantID: acme.id)?.unconsolidatedTokens == 7)
        #expect(try await store.queuedJobs(userID: alice.id) == 1)
        // One waits already: neither the sweep nor another round adds a second.
        #expect(try await store.enqueueIdleConsolidations(idleSeconds: 0, limit: 10).isEmpty, "alice has a job waiting")
        // A learning job behind the consolidation; the round applies both in order.
        _ = try await enqueue(alice, learnable: 2)
        let second = try #require(try await learn { user, jobs in
            #expect(user.unconsolidatedTokens == 7)
            #expect(jobs.map(\.kind) == [.consolidate, .generation])
            #expect(jobs[0].trigger == .tokens && jobs[0].tokens.isEmpty && jobs[0].actor == "system")
            return LearningOutcome(changes: [MemoryChange(levels: ["mid": part("m"), "fast": nil], learner: nil, cause: .consolidate,
                                                          actor: "system"), nil],
                                   taughtTokens: [0, 2], learner: part("l2"),
                                   details: [["kl_before": 0.5, "kl_after": 0.25, "steps": 4], [:]], consolidate: .tokens)
        })
        #expect(second.map(\.job.kind) == [.consolidate, .generation] && second.map(\.version) == [2, 2])
        let afterSecond = try #require(try await store.user(id: alice.id, tenantID: acme.id))
        #expect(afterSecond.unconsolidatedTokens == 2, "counted from the consolidation on")
        let versions = try await store.versions(userID: alice.id)
        #expect(versions.first?.cause == .consolidate && versions.first?.levels["fast"] == nil && versions.first?.levels["mid"] != nil)
        let event = try #require(try await store.auditEvents(userID: alice.id).first { $0.event == .consolidate })
        let detail = try #require(try JSONSerialization.jsonObject(with: Data(event.detail.utf8)) as? [String: Any])
        #expect(detail["trigger"] as? String == "tokens" && detail["kl_after"] as? Double == 0.25 && detail["steps"] as? Double == 4)
        #expect(event.actor == "system")
        // The outcome asked for another: it waits, alone.
        #expect(try await store.queuedJobs(userID: alice.id) == 1)
        _ = try await learn { _, jobs in
            #expect(jobs.map(\.kind) == [.consolidate])
            return LearningOutcome(changes: [nil], learner: part("l3"))   // nothing to consolidate: no version
        }
        #expect(try await store.user(id: alice.id, tenantID: acme.id)?.unconsolidatedTokens == 0)
        #expect(try await store.user(id: alice.id, tenantID: acme.id)?.version == 2)
        // The idle sweep: bob learned, is idle 0 s, has nothing waiting → queued once; alice has nothing to consolidate.
        _ = try await enqueue(bob, learnable: 5)
        _ = try await learn { _, jobs in LearningOutcome(changes: [nil], taughtTokens: [5], learner: nil) }
        #expect(try await store.enqueueIdleConsolidations(idleSeconds: 3600, limit: 10).isEmpty, "bob has not been idle an hour")
        try await store.setFrozen(userID: bob.id, true, actor: "k")
        #expect(try await store.enqueueIdleConsolidations(idleSeconds: 0, limit: 10).isEmpty, "a frozen user is not consolidated")
        try await store.setFrozen(userID: bob.id, false, actor: "k")
        // Two sweeps at once (two replicas): one consolidation queued.
        async let s1 = store.enqueueIdleConsolidations(idleSeconds: 0, limit: 10)
        async let s2 = store.enqueueIdleConsolidations(idleSeconds: 0, limit: 10)
        let swept = try await s1 + s2
        #expect(swept == [bob.id])
        #expect(try await store.queuedJobs(userID: bob.id) == 1)
        // A reset cancels the waiting consolidation and clears the count.
        _ = try await store.mutateMemory(userID: bob.id, keep: 10, cancelQueued: true) { _ in
            MemoryChange(levels: [:], learner: nil, cause: .reset, actor: "k")
        }
        #expect(try await store.queuedJobs(userID: bob.id) == 0)
        #expect(try await store.user(id: bob.id, tenantID: acme.id)?.unconsolidatedTokens == 0)
        #expect(try await store.enqueueIdleConsolidations(idleSeconds: 0, limit: 10).isEmpty)
        await close()
    }

    @Test("reset-like changes and rollbacks cancel the queued jobs when asked", arguments: StoreKind.allCases)
    func cancellation(kind: StoreKind) async throws {
        let (store, acme, _, close) = try await kind.make()
        let alice = try #require(try await store.user(tenantID: acme.id, name: try UserName("alice"), create: true))
        var jobs: [Int64] = []
        for _ in 0..<2 {
            jobs.append(try #require(try await store.recordGeneration(id: UUID(), userID: alice.id, memoryVersion: 0, prompt: [1, 2], completion: [],
                                                                      job: LearningRequest(tokens: [1, 2], learnable: [false, true]), actor: "k")))
        }
        let kept = try await store.mutateMemory(userID: alice.id, keep: 10, cancelQueued: false) { _ in
            MemoryChange(levels: [:], learner: nil, cause: .reset, actor: "k")
        }
        let stillQueued = try await store.queuedJobs(userID: alice.id)
        #expect(kept.cancelledJobs.isEmpty && stillQueued == 2)
        let m = try await store.mutateMemory(userID: alice.id, keep: 10, cancelQueued: true) { _ in
            MemoryChange(levels: [:], learner: nil, cause: .reset, actor: "k")
        }
        #expect(m.cancelledJobs == jobs)
        #expect(try await store.jobState(id: jobs[0])?.state == .cancelled)
        let event = try #require(try await store.auditEvents(userID: alice.id).first { $0.event == .learningCancelled })
        #expect(event.causeID == "reset")
        let detail = try #require(try JSONSerialization.jsonObject(with: Data(event.detail.utf8)) as? [String: Any])
        #expect((detail["job_ids"] as? [Int])?.map(Int64.init) == jobs)
        await close()
    }

    @Test("audit: events in windows, reports, rankings by any metric, the last passing version, settings", arguments: StoreKind.allCases)
    func audit(kind: StoreKind) async throws {
        let (store, acme, other, close) = try await kind.make()
        let a = try #require(try await store.user(tenantID: acme.id, name: try UserName("a"), create: true))
        let b = try #require(try await store.user(tenantID: acme.id, name: try UserName("b"), create: true))
        let c = try #require(try await store.user(tenantID: other.id, name: try UserName("c"), create: true))
        for (u, kl, top1, passed) in [(a, 0.5, 0.9, false), (b, 0.1, 0.7, true), (c, 9.0, 0.1, true)] {
            _ = try await store.mutateMemory(userID: u.id, keep: 10) { _ in MemoryChange(levels: [:], learner: nil, cause: .learning, actor: "k") }
            try await store.saveDriftReport(userID: u.id, version: 1, metrics: "{\"kl_mean\": \(kl), \"top1_agreement\": \(top1)}",
                                            flags: passed ? "[]" : "[{\"metric\": \"kl_mean\"}]", passed: passed)
        }
        let byKL = try await store.rankedDrift(tenantID: acme.id, metric: "kl_mean", ascending: false, flaggedOnly: false, since: nil,
                                               until: nil, limit: 10, offset: 0)
        #expect(byKL.map(\.user) == ["a", "b"])
        let byTop1 = try await store.rankedDrift(tenantID: acme.id, metric: "top1_agreement", ascending: true, flaggedOnly: false,
                                                 since: nil, until: nil, limit: 1, offset: 0)
        #expect(byTop1.map(\.user) == ["b"])
        let flagged = try await store.rankedDrift(tenantID: acme.id, metric: "kl_mean", ascending: false, flaggedOnly: true, since: nil,
                                                  until: nil, limit: 10, offset: 0)
        #expect(flagged.map(\.user) == ["a"])
        #expect(try await store.lastPassingVersion(userID: a.id, before: 2) == 0)
        #expect(try await store.lastPassingVersion(userID: b.id, before: 2) == 1)
        // Event windows and limits.
        for i in 0..<5 { try await store.recordAudit(userID: a.id, event: .warn, from: 1, to: 1, actor: "p", causeID: "\(i)", detail: "{}") }
        let all = try await store.auditEvents(userID: a.id)
        #expect(all.count == 6 && all.map(\.id) == all.map(\.id).sorted())
        #expect(try await store.auditEvents(userID: a.id, since: nil, until: nil, limit: 2).map(\.causeID) == ["3", "4"])
        #expect(try await store.auditEvents(userID: a.id, since: Date().addingTimeInterval(3600), until: nil, limit: 10).isEmpty)
        #expect(try await store.auditEvents(tenantID: other.id).allSatisfy { $0.userID == c.id })
        // Settings per tenant.
        try await store.setPolicies(tenantID: acme.id, json: "[]")
        try await store.setProbes(tenantID: acme.id, json: "[\"p\"]")
        #expect(try await store.auditSettings(tenantID: acme.id) == ("[]", "[\"p\"]"))
        #expect(try await store.auditSettings(tenantID: other.id) == (nil, nil))
        let froze = try await store.setFrozen(userID: a.id, true, actor: "p")
        let again = try await store.setFrozen(userID: a.id, true, actor: "p")
        #expect(froze && !again)
        await close()
    }
}

extension StoreContractTests {
    @Test("browser sessions: a token names its key's principal until it expires, is ended, or its key is revoked",
          arguments: StoreKind.allCases)
    func sessions(kind: StoreKind) async throws {
        let (store, acme, _, close) = try await kind.make()
        let (record, key) = try await store.createKey(tenantID: acme.id, name: "ops", role: .admin)
        let principal = try #require(try await store.authenticate(key: key))
        let token = try await store.createSession(for: principal, seconds: 3600)
        #expect(token.hasPrefix("cs-") && token.count == 46 && token != key)
        #expect(try await store.session(token: token) == principal)
        #expect(try await store.session(token: token + "x") == nil)
        #expect(try await store.session(token: key) == nil)
        let expired = try await store.createSession(for: principal, seconds: -1)
        #expect(try await store.session(token: expired) == nil)
        try await store.endSession(token: token)
        #expect(try await store.session(token: token) == nil)
        let other = try await store.createSession(for: principal, seconds: 3600)
        #expect(try await store.revokeKey(id: record.id, tenantID: acme.id))
        #expect(try await store.session(token: other) == nil)
        await close()
    }
}

/// Job ids of `failed` callbacks.
final class FailedJobs: @unchecked Sendable {
    private let lock = NSLock()
    private var calls: [[Int64]] = []
    func add(_ ids: [Int64], _ reason: String) { lock.withLock { calls.append(ids) } }
    var value: [[Int64]] { lock.withLock { calls } }
}

/// Watches for two rounds of one user at once.
final class BusyUsers: @unchecked Sendable {
    private let lock = NSLock()
    private var busy: Set<Int64> = []
    private(set) var overlapped = false
    func enter(_ id: Int64) { lock.withLock { if !busy.insert(id).inserted { overlapped = true } } }
    func leave(_ id: Int64) { lock.withLock { _ = busy.remove(id) } }
}
