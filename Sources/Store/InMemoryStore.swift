// InMemoryStore: the store's contracts kept in this process's memory, for
// fast router-level tests that need neither PostgreSQL nor its set-up. It is
// a test double, never the store of record: nothing survives the process.
// Its semantics are the PostgreSQL store's (the contract tests in StoreTests
// run against both): tenant-scoped lookups, immutable versions, a per-user
// lock for every change and learning round (a round skips a user another
// holds, as SKIP LOCKED does), all-or-nothing changes (a body that throws
// changes nothing), erasure with a tombstone, pruning of old versions and
// of what retention no longer keeps. JSON columns (audit details, drift
// metrics, settings) are kept as the text given, not re-formatted.
import Foundation
import Synchronization

public final class InMemoryStore: ContinuumStore {
    struct UserRow {
        var user: User
        var learner: Data?
        /// The current version's optimizer moments by level.
        var moments: [String: Data] = [:]
        /// When a learning round last applied one of the user's jobs.
        var lastLearnedAt: Date?
    }

    struct VersionRow {
        var version: MemoryVersion
        var learner: Data?
    }

    struct GenerationRow {
        var generation: StoredGeneration
        var createdAt: Date
    }

    struct JobRow {
        var job: LearningJob
        var userID: Int64
        var state: JobState
        var appliedVersion: Int64?
        var createdAt: Date
        var finishedAt: Date?
    }

    struct State {
        var nextID: Int64 = 0
        var tenants: [Int64: Tenant] = [:]
        var keys: [Int64: (key: APIKey, hash: String)] = [:]
        var users: [Int64: UserRow] = [:]
        /// user id → version → row
        var versions: [Int64: [Int64: VersionRow]] = [:]
        /// snapshot id → (user id, part)
        var snapshots: [Int64: (user: Int64, data: Data)] = [:]
        var generations: [UUID: GenerationRow] = [:]
        /// feedback id → (user id, generation id, created)
        var feedback: [UUID: (user: Int64, generation: UUID, createdAt: Date)] = [:]
        var jobs: [Int64: JobRow] = [:]
        var events: [(tenant: Int64, event: AuditEvent)] = []
        /// user id → version → report
        var reports: [Int64: [Int64: DriftReport]] = [:]
        var settings: [Int64: (policies: String?, probes: String?)] = [:]
        /// token hash → (key id, expiry)
        var sessions: [String: (key: Int64, expires: Date)] = [:]

        mutating func id() -> Int64 {
            nextID += 1
            return nextID
        }
    }

    private let state = Mutex(State())
    private let locks = UserLocks()

    public init() {}

    // MARK: Tenants and keys

    public func createTenant(name: String) async throws -> Tenant {
        let trimmed = name.trimmingCharacters(in: .whitespaces)
        guard !trimmed.isEmpty, trimmed.count <= 200 else {
            throw Database.Failure(description: "a tenant name must have 1 to 200 characters")
        }
        return try state.withLock { s in
            guard !s.tenants.values.contains(where: { $0.name == trimmed }) else {
                throw Database.Failure(description: "a tenant named '\(trimmed)' already exists")
            }
            let t = Tenant(id: s.id(), name: trimmed, learning: true, createdAt: Date())
            s.tenants[t.id] = t
            return t
        }
    }

    public func tenants() async throws -> [Tenant] { state.withLock { $0.tenants.values.sorted { $0.id < $1.id } } }

    public func tenant(named name: String) async throws -> Tenant? { state.withLock { $0.tenants.values.first { $0.name == name } } }

    public func createKey(tenantID: Int64, name: String, role: KeyRole) async throws -> (APIKey, String) {
        let key = Database.newKey()
        return state.withLock { s in
            let record = APIKey(id: s.id(), tenantID: tenantID, name: name, role: role, prefix: String(key.prefix(11)),
                                createdAt: Date(), revokedAt: nil)
            s.keys[record.id] = (record, Database.hash(key: key))
            return (record, key)
        }
    }

    public func keys(tenantID: Int64) async throws -> [APIKey] {
        state.withLock { $0.keys.values.map(\.key).filter { $0.tenantID == tenantID }.sorted { $0.id < $1.id } }
    }

    public func revokeKey(id: Int64, tenantID: Int64) async throws -> Bool {
        state.withLock { s in
            guard let k = s.keys[id], k.key.tenantID == tenantID, k.key.revokedAt == nil else { return false }
            let r = k.key
            s.keys[id] = (APIKey(id: r.id, tenantID: r.tenantID, name: r.name, role: r.role, prefix: r.prefix, createdAt: r.createdAt,
                                 revokedAt: Date()), k.hash)
            return true
        }
    }

    public func authenticate(key: String) async throws -> Principal? {
        guard key.hasPrefix("ck-"), key.count < 200 else { return nil }
        let hash = Database.hash(key: key)
        return state.withLock { s in
            s.keys.values.first { $0.hash == hash && $0.key.revokedAt == nil }
                .map { Principal(tenantID: $0.key.tenantID, keyID: $0.key.id, role: $0.key.role) }
        }
    }

    public func createSession(for principal: Principal, seconds: Double) async throws -> String {
        let token = Database.newSessionToken()
        state.withLock { $0.sessions[Database.hash(key: token)] = (principal.keyID, Date().addingTimeInterval(seconds)) }
        return token
    }

    public func session(token: String) async throws -> Principal? {
        guard token.hasPrefix("cs-"), token.count < 200 else { return nil }
        let hash = Database.hash(key: token)
        return state.withLock { s in
            guard let session = s.sessions[hash], session.expires > Date(), let k = s.keys[session.key]?.key, k.revokedAt == nil else {
                return nil
            }
            return Principal(tenantID: k.tenantID, keyID: k.id, role: k.role)
        }
    }

    public func endSession(token: String) async throws {
        state.withLock { _ = $0.sessions.removeValue(forKey: Database.hash(key: token)) }
    }

    // MARK: Users

    public func user(tenantID: Int64, name: UserName, create: Bool) async throws -> User? {
        state.withLock { s in
            if let row = s.users.values.first(where: { $0.user.tenantID == tenantID && $0.user.name == name.value }) {
                return s.current(row.user.id)
            }
            guard create, let tenant = s.tenants[tenantID] else { return nil }
            let id = s.id()
            s.users[id] = UserRow(user: User(id: id, tenantID: tenantID, name: name.value, version: 0, jobsApplied: 0,
                                             learning: tenant.learning, frozen: false, createdAt: Date()), learner: nil)
            s.insertCreatedVersion(userID: id, actor: "server")
            return s.current(id)
        }
    }

    public func user(id: Int64, tenantID: Int64) async throws -> User? {
        state.withLock { s in s.users[id]?.user.tenantID == tenantID ? s.current(id) : nil }
    }

    public func users(tenantID: Int64) async throws -> [User] {
        state.withLock { s in s.users.values.filter { $0.user.tenantID == tenantID }.compactMap { s.current($0.user.id) }.sorted { $0.name < $1.name } }
    }

    public func eraseUser(tenantID: Int64, name: UserName, actor: String) async throws -> Bool {
        guard let id = state.withLock({ s in s.users.values.first { $0.user.tenantID == tenantID && $0.user.name == name.value }?.user.id })
        else { return false }
        // As DELETE waits for a round holding the row.
        return try await locks.holding(id) { state.withLock { s in
            guard let row = s.users[id] else { return false }
            s.users[id] = nil
            s.versions[id] = nil
            s.snapshots = s.snapshots.filter { $0.value.user != id }
            let generations = Set(s.generations.filter { $0.value.generation.userID == id }.keys)
            for g in generations { s.generations[g] = nil }
            s.feedback = s.feedback.filter { $0.value.user != id }
            s.jobs = s.jobs.filter { $0.value.userID != id }
            s.events.removeAll { $0.event.userID == id }
            s.reports[id] = nil
            s.events.append((tenantID, AuditEvent(id: s.id(), userID: nil, event: .erase, fromVersion: row.user.version, toVersion: nil,
                                                  actor: actor, causeID: nil, detail: "{\"user_id\": \(id)}", createdAt: Date())))
            return true
        } }
    }

    // MARK: Memory versions

    public func versions(userID: Int64) async throws -> [MemoryVersion] {
        state.withLock { ($0.versions[userID] ?? [:]).values.map(\.version).sorted { $0.version > $1.version } }
    }

    public func memory(userID: Int64, version: Int64?, withLearner: Bool, withLevels: Bool) async throws -> StoredMemory? {
        try state.withLock { try $0.memory(userID: userID, version: version, withLearner: withLearner, withLevels: withLevels) }
    }

    public func mutateMemory(userID: Int64, keep: Int, cancelQueued: Bool,
                             _ body: @Sendable (StoredMemory) async throws -> MemoryChange?) async throws -> MemoryMutation {
        try await locks.holding(userID) {
        guard let current = try state.withLock({ try $0.memory(userID: userID, version: nil, withLearner: true, withLevels: true) })
        else { throw Database.Failure(description: "user \(userID) has no current memory version") }
        guard let change = try await body(current) else { return MemoryMutation(version: current.version, cancelledJobs: []) }
        return state.withLock { s in
            let cancelled = cancelQueued
                ? s.cancelQueued(userID: userID, version: current.version, cause: change.cause, actor: change.actor) : []
            let next = s.apply(change, after: (current.version, current.levelIDs), userID: userID)
            s.audit(userID: userID, event: AuditEventKind(change.cause) ?? .learning, from: current.version, to: next.version, actor: change.actor,
                    causeID: change.causeID)
            s.prune(userID: userID, keep: keep)
            return MemoryMutation(version: next.version, cancelledJobs: cancelled)
        }
        }
    }

    public func rollback(userID: Int64, to version: Int64, keep: Int, actor: String, cancelQueued: Bool,
                         ifCurrent: Int64?) async throws -> RollbackOutcome {
        try await locks.holding(userID) { state.withLock { s in
            guard let current = s.users[userID]?.user.version else { return .notKept }
            if let ifCurrent, ifCurrent != current { return .moved(current: current) }
            guard let target = s.versions[userID]?[version] else { return .notKept }
            let cancelled = cancelQueued ? s.cancelQueued(userID: userID, version: current, cause: .rollback, actor: actor) : []
            let next = current + 1
            s.commitVersion(userID: userID, version: next, parent: current, levels: target.version.levels, learner: target.learner,
                            cause: .rollback, causeID: String(version), actor: actor)
            s.users[userID]?.moments = [:]   // the version's weights and counters; its optimizer starts afresh
            s.audit(userID: userID, event: .rollback, from: current, to: next, actor: actor, causeID: String(version),
                    detail: "{\"restored\": \(version)}")
            s.prune(userID: userID, keep: keep)
            return .rolledBack(MemoryMutation(version: next, cancelledJobs: cancelled))
        } }
    }

    public func forkUser(source: User, version: Int64?, target: UserName, actor: String) async throws -> User {
        let forked: Int64 = try state.withLock { s in
            guard let memory = try s.memory(userID: source.id, version: version, withLearner: true, withLevels: true) else {
                throw NotFound(description: "version \(version ?? -1) of user '\(source.name)' is not kept")
            }
            guard !s.users.values.contains(where: { $0.user.tenantID == source.tenantID && $0.user.name == target.value }) else {
                throw Conflict(description: "user '\(target)' already exists")
            }
            let id = s.id()
            s.users[id] = UserRow(user: User(id: id, tenantID: source.tenantID, name: target.value, version: 0, jobsApplied: 0,
                                             learning: s.tenants[source.tenantID]?.learning ?? true, frozen: false,
                                             createdAt: Date()), learner: nil)
            s.insertCreatedVersion(userID: id, actor: actor)
            let copied = !memory.levels.isEmpty || memory.learner != nil
            if copied {
                // At the source's current version the copy also takes its optimizer's state.
                let isCurrent = memory.version == s.users[source.id]?.user.version
                let change = MemoryChange(levels: memory.levels.mapValues { Optional($0) },
                                          learner: s.versions[source.id]?[memory.version]?.learner,
                                          working: isCurrent ? memory.learner : nil,
                                          moments: isCurrent ? memory.moments.mapValues { Optional($0) } : [:], cause: .fork,
                                          causeID: "\(source.name)@\(memory.version)", actor: actor)
                _ = s.apply(change, after: (0, [:]), userID: id)
            }
            s.audit(userID: id, event: .fork, from: nil, to: copied ? 1 : 0, actor: actor, causeID: "\(source.name)@\(memory.version)")
            return id
        }
        guard let user = try await user(id: forked, tenantID: source.tenantID) else {
            throw Database.Failure(description: "the forked user '\(target)' was not created")
        }
        return user
    }

    // MARK: Generations, feedback and the queue

    public func recordGeneration(id: UUID, userID: Int64, memoryVersion: Int64, prompt: [Int], completion: [Int],
                                 job: LearningRequest?, actor: String) async throws -> Int64? {
        try state.withLock { s in
            guard s.users[userID] != nil else { throw Database.Failure(description: "user \(userID) does not exist") }
            s.generations[id] = GenerationRow(generation: StoredGeneration(id: id, userID: userID, memoryVersion: memoryVersion,
                                                                           promptTokens: prompt, completionTokens: completion),
                                              createdAt: Date())
            return job.map { s.enqueue($0, kind: .generation, source: id, userID: userID, actor: actor) }
        }
    }

    public func generation(id: UUID, tenantID: Int64) async throws -> StoredGeneration? {
        state.withLock { s in
            guard let g = s.generations[id], s.users[g.generation.userID]?.user.tenantID == tenantID else { return nil }
            return g.generation
        }
    }

    public func recordFeedback(generation: StoredGeneration, rating: String, correction: String?, job: LearningRequest?,
                               actor: String) async throws -> (UUID, Int64?) {
        try state.withLock { s in
            guard s.generations[generation.id] != nil else { throw Database.Failure(description: "generation \(generation.id) is gone") }
            let id = UUID()
            s.feedback[id] = (generation.userID, generation.id, Date())
            return (id, job.map { s.enqueue($0, kind: .feedback, source: id, userID: generation.userID, actor: actor) })
        }
    }

    public func queuedJobs(userID: Int64) async throws -> Int {
        state.withLock { $0.jobs.values.filter { $0.userID == userID && $0.state == .queued }.count }
    }

    public func queuedJobs() async throws -> (count: Int, oldestSeconds: Double) {
        state.withLock { s in
            let queued = s.jobs.values.filter { $0.state == .queued }
            return (queued.count, queued.map { Date().timeIntervalSince($0.createdAt) }.max() ?? 0)
        }
    }

    public func enqueueIdleConsolidations(idleSeconds: Double, limit: Int) async throws -> [Int64] {
        try Database.checkSeconds(idleSeconds)
        return state.withLock { s in
            let now = Date()
            let waiting = Set(s.jobs.values.filter { $0.state == .queued }.map(\.userID))
            let due = s.users.values.filter { row in
                guard let at = row.lastLearnedAt, row.user.unconsolidatedTokens > 0, !row.user.frozen,
                      s.tenants[row.user.tenantID]?.learning != false, !waiting.contains(row.user.id) else { return false }
                return now.timeIntervalSince(at) >= idleSeconds
            }.sorted { ($0.lastLearnedAt!, $0.user.id) < ($1.lastLearnedAt!, $1.user.id) }.prefix(limit)
            return due.compactMap { s.enqueueConsolidation(userID: $0.user.id, trigger: .idle) ? $0.user.id : nil }
        }
    }

    public func jobState(id: Int64) async throws -> (state: JobState, version: Int64?, frozen: Bool)? {
        state.withLock { s in
            guard let j = s.jobs[id] else { return nil }
            return (j.state, j.appliedVersion, s.users[j.userID]?.user.frozen ?? false)
        }
    }

    public func learnNext(limit: Int, keep: Int, failed: (@Sendable ([LearningJob], String) -> Void)?,
                          _ body: @Sendable (User, StoredMemory, [LearningJob]) async throws -> LearningOutcome) async throws -> [AppliedJob]? {
        // Users with queued jobs, oldest job first; the first one no other round holds.
        let candidates: [Int64] = state.withLock { s in
            var oldest: [Int64: Int64] = [:]
            for j in s.jobs.values where j.state == .queued && s.users[j.userID]?.user.frozen == false {
                oldest[j.userID] = min(oldest[j.userID] ?? .max, j.job.id)
            }
            return oldest.sorted { $0.value < $1.value }.map(\.key)
        }
        var claimed: Int64?
        for id in candidates where await locks.tryLock(id) {
            claimed = id
            break
        }
        guard let userID = claimed else { return nil }
        do {
            let applied = try await round(userID: userID, limit: limit, keep: keep, failed: failed, body)
            await locks.unlock(userID)
            return applied
        } catch {
            await locks.unlock(userID)
            throw error
        }
    }

    /// A round of `learnNext` for a user whose lock it holds.
    private func round(userID: Int64, limit: Int, keep: Int, failed: (@Sendable ([LearningJob], String) -> Void)?,
                       _ body: @Sendable (User, StoredMemory, [LearningJob]) async throws -> LearningOutcome) async throws -> [AppliedJob] {
        let claim: (User, StoredMemory, [LearningJob])? = try state.withLock { s in
            guard let user = s.current(userID), !user.frozen else { return nil }
            let jobs = s.jobs.values.filter { $0.userID == userID && $0.state == .queued }.map(\.job).sorted { $0.id < $1.id }
                .prefix(limit)
            guard !jobs.isEmpty, let memory = try s.memory(userID: userID, version: nil, withLearner: true, withLevels: true)
            else { return nil }
            return (user, memory, Array(jobs))
        }
        guard let (user, memory, jobs) = claim else { return [] }
        let outcome: LearningOutcome
        do {
            outcome = try await body(user, memory, jobs)
        } catch let failure as JobsUnlearnable {
            state.withLock { s in
                for j in jobs {
                    s.jobs[j.id]?.state = .failed
                    s.jobs[j.id]?.finishedAt = Date()
                }
                let detail = String(decoding: (try? JSONSerialization.data(
                    withJSONObject: ["job_ids": jobs.map(\.id), "reason": failure.reason] as [String: Any], options: [.sortedKeys]))
                    ?? Data("{}".utf8), as: UTF8.self)
                s.audit(userID: userID, event: .learningFailed, from: memory.version, to: memory.version, actor: "system",
                        causeID: nil, detail: detail)
            }
            failed?(jobs, failure.reason)
            return []
        }
        precondition(outcome.changes.count == jobs.count, "one outcome per job")
        return state.withLock { s in
            guard s.users[userID] != nil else { return [] }   // erased meanwhile: nothing to apply to
            var current = (version: memory.version, levels: memory.levelIDs)
            var applied: [AppliedJob] = []
            for (i, (job, (change, taught))) in zip(jobs, zip(outcome.changes, outcome.taughtTokens)).enumerated() {
                let from = current.version
                if let change { current = s.apply(change, after: current, userID: userID, setsLearner: false) }
                s.audit(userID: userID, event: AuditEventKind(job.kind.cause) ?? .learning, from: from, to: current.version,
                        actor: job.actor, causeID: job.sourceID?.uuidString.lowercased(),
                        detail: LearningOutcome.auditDetail(job: job, taught: taught, details: outcome.details[i]))
                let now = Date()
                s.jobs[job.id]?.state = .done
                s.jobs[job.id]?.appliedVersion = current.version
                s.jobs[job.id]?.finishedAt = now
                applied.append((job, current.version, now.timeIntervalSince(s.jobs[job.id]?.createdAt ?? now)))
            }
            s.users[userID]?.learner = outcome.learner
            s.writeMoments(outcome.moments, userID: userID)
            let unconsolidated = LearningJob.unconsolidated(from: user.unconsolidatedTokens, after: jobs, taught: outcome.taughtTokens)
            if let u = s.users[userID]?.user {
                s.users[userID]?.user = User(id: u.id, tenantID: u.tenantID, name: u.name, version: u.version,
                                             jobsApplied: u.jobsApplied + Int64(jobs.count), learning: u.learning, frozen: u.frozen,
                                             createdAt: u.createdAt, unconsolidatedTokens: unconsolidated)
            }
            if jobs.contains(where: { $0.kind != .consolidate }) { s.users[userID]?.lastLearnedAt = Date() }
            if let trigger = outcome.consolidate { s.enqueueConsolidation(userID: userID, trigger: trigger) }
            s.prune(userID: userID, keep: keep)
            return applied
        }
    }

    // MARK: The drift audit

    public func recordAudit(userID: Int64, event: AuditEventKind, from: Int64?, to: Int64?, actor: String, causeID: String?,
                            detail: String) async throws {
        state.withLock { $0.audit(userID: userID, event: event, from: from, to: to, actor: actor, causeID: causeID, detail: detail) }
    }

    public func auditEvents(userID: Int64, since: Date?, until: Date?, limit: Int) async throws -> [AuditEvent] {
        try Database.checkStorable(since, until)
        return state.withLock { Self.window($0.events.map(\.event).filter { $0.userID == userID }, since: since, until: until, limit: limit) }
    }

    public func auditEvents(tenantID: Int64, since: Date?, until: Date?, limit: Int) async throws -> [AuditEvent] {
        try Database.checkStorable(since, until)
        return state.withLock { Self.window($0.events.filter { $0.tenant == tenantID }.map(\.event), since: since, until: until, limit: limit) }
    }

    static func window(_ events: [AuditEvent], since: Date?, until: Date?, limit: Int) -> [AuditEvent] {
        Array(events.filter { e in (since.map { e.createdAt >= $0 } ?? true) && (until.map { e.createdAt < $0 } ?? true) }.suffix(limit))
    }

    public func saveDriftReport(userID: Int64, version: Int64, metrics: String, flags: String, passed: Bool) async throws {
        state.withLock { s in
            guard s.users[userID] != nil else { return }
            s.reports[userID, default: [:]][version] = DriftReport(userID: userID, version: version, metrics: metrics, flags: flags,
                                                                   passed: passed, computedAt: Date())
        }
    }

    public func driftReports(userID: Int64) async throws -> [DriftReport] {
        state.withLock { ($0.reports[userID] ?? [:]).values.sorted { $0.version < $1.version } }
    }

    public func rankedDrift(tenantID: Int64, metric: String, ascending: Bool, flaggedOnly: Bool, since: Date?, until: Date?,
                            limit: Int, offset: Int) async throws -> [RankedDrift] {
        try Database.checkStorable(since, until)
        func value(_ r: DriftReport) -> Double? {
            ((try? JSONSerialization.jsonObject(with: Data(r.metrics.utf8))) as? [String: Any])?[metric].flatMap { ($0 as? NSNumber)?.doubleValue }
        }
        func flagged(_ r: DriftReport) -> Bool {
            (((try? JSONSerialization.jsonObject(with: Data(r.flags.utf8))) as? [Any])?.count ?? 0) > 0
        }
        return state.withLock { s in
            let latest: [RankedDrift] = s.users.values.filter { $0.user.tenantID == tenantID }.compactMap { row in
                let within = (s.reports[row.user.id] ?? [:]).values.filter { r in
                    (since.map { r.computedAt >= $0 } ?? true) && (until.map { r.computedAt < $0 } ?? true)
                }
                guard let newest = within.max(by: { $0.version < $1.version }), !flaggedOnly || flagged(newest) else { return nil }
                return RankedDrift(user: row.user.name, frozen: row.user.frozen, report: newest)
            }
            let sorted = latest.sorted { a, b in
                switch (value(a.report), value(b.report)) {
                case let (x?, y?) where x != y: return ascending ? x < y : x > y
                case (_?, nil): return true    // NULLS LAST
                case (nil, _?): return false
                default: return a.user < b.user
                }
            }
            return Array(sorted.dropFirst(offset).prefix(limit))
        }
    }

    public func lastPassingVersion(userID: Int64, before: Int64) async throws -> Int64? {
        state.withLock { s in
            (s.versions[userID] ?? [:]).keys.filter { v in v < before && (v == 0 || s.reports[userID]?[v]?.passed == true) }.max()
        }
    }

    public func auditSettings(tenantID: Int64) async throws -> (policies: String?, probes: String?) {
        state.withLock { $0.settings[tenantID] ?? (nil, nil) }
    }

    public func setPolicies(tenantID: Int64, json: String?) async throws {
        state.withLock { $0.settings[tenantID] = (json, $0.settings[tenantID]?.probes) }
    }

    public func setProbes(tenantID: Int64, json: String?) async throws {
        state.withLock { $0.settings[tenantID] = ($0.settings[tenantID]?.policies, json) }
    }

    @discardableResult
    public func setFrozen(userID: Int64, _ frozen: Bool, actor: String, causeID: String?, detail: String) async throws -> Bool {
        state.withLock { s in
            guard let u = s.users[userID]?.user, u.frozen != frozen else { return false }
            s.users[userID]?.user = User(id: u.id, tenantID: u.tenantID, name: u.name, version: u.version, jobsApplied: u.jobsApplied,
                                         learning: u.learning, frozen: frozen, createdAt: u.createdAt, unconsolidatedTokens: u.unconsolidatedTokens)
            s.audit(userID: userID, event: frozen ? .freeze : .unfreeze, from: nil, to: nil, actor: actor, causeID: causeID,
                    detail: detail)
            return true
        }
    }

    // MARK: Maintenance

    public func ping() async throws {}

    public func isMigrated() async throws -> Bool { true }

    public func prune(_ retention: Retention, now: Date) async throws -> PruneCounts {
        state.withLock { s in
            var counts = PruneCounts()
            func cutoff(_ seconds: Double?) -> Date? { seconds.map { now.addingTimeInterval(-$0) } }
            if let c = cutoff(retention.finishedJobs) {
                let gone = s.jobs.filter { $0.value.state != .queued && ($0.value.finishedAt.map { $0 < c } ?? false) }.keys
                counts.finishedJobs = gone.count
                for id in gone { s.jobs[id] = nil }
            }
            if let c = cutoff(retention.generations) {
                let gone = Set(s.generations.filter { $0.value.createdAt < c }.keys)
                counts.generations = gone.count
                for id in gone { s.generations[id] = nil }
                s.feedback = s.feedback.filter { !gone.contains($0.value.generation) }
            }
            if let c = cutoff(retention.driftReports) {
                for (user, reports) in s.reports {
                    let newest = reports.keys.max()
                    for (v, r) in reports where r.computedAt < c && v != newest && s.versions[user]?[v] == nil {
                        s.reports[user]?[v] = nil
                        counts.driftReports += 1
                    }
                }
            }
            s.sessions = s.sessions.filter { $0.value.expires > now }
            if let c = cutoff(retention.auditEvents) {
                let before = s.events.count
                s.events.removeAll { $0.event.createdAt < c }
                counts.auditEvents = before - s.events.count
            }
            return counts
        }
    }
}

// What the store's operations do to the state, under its lock.
extension InMemoryStore.State {
    /// The user as the store returns it (its current version and counters).
    func current(_ id: Int64) -> User? { users[id]?.user }

    func memory(userID: Int64, version: Int64?, withLearner: Bool, withLevels: Bool) throws -> StoredMemory? {
        guard let row = users[userID] else { return nil }
        let v = version ?? row.user.version
        guard let kept = versions[userID]?[v] else { return nil }
        var levels: [String: Data] = [:]
        if withLevels {
            for (name, id) in kept.version.levels {
                guard let part = snapshots[id] else { throw Database.Failure(description: "level snapshot \(id) of user \(userID) is missing") }
                levels[name] = part.data
            }
        }
        let learner = withLearner ? (v == row.user.version ? row.learner : kept.learner) : nil
        let moments = withLearner && withLevels && v == row.user.version ? row.moments : [:]
        return StoredMemory(userID: userID, version: v, levels: levels, levelIDs: kept.version.levels, moments: moments,
                            learner: learner, jobsApplied: row.user.jobsApplied)
    }

    mutating func insertCreatedVersion(userID: Int64, actor: String) {
        versions[userID, default: [:]][0] = .init(version: MemoryVersion(version: 0, parent: nil, levels: [:], cause: .created,
                                                                        causeID: nil, actor: actor, createdAt: Date()), learner: nil)
    }

    /// Writes `change` as the version after `current` and makes it current
    /// (its learner part and moments the user's unless `setsLearner` is false).
    mutating func apply(_ change: MemoryChange, after current: (version: Int64, levels: [String: Int64]),
                        userID: Int64, setsLearner: Bool = true) -> (version: Int64, levels: [String: Int64]) {
        var levels = current.levels
        for (name, part) in change.levels.sorted(by: { $0.key < $1.key }) {
            guard let data = part else { levels[name] = nil; continue }
            let id = self.id()
            snapshots[id] = (userID, data)
            levels[name] = id
        }
        let version = current.version + 1
        commitVersion(userID: userID, version: version, parent: current.version, levels: levels, learner: change.learner,
                      working: change.working, cause: change.cause, causeID: change.causeID, actor: change.actor,
                      setsLearner: setsLearner)
        if setsLearner { writeMoments(change.moments, userID: userID) }
        return (version, levels)
    }

    /// The user's optimizer moments by level (nil: deleted); levels not named keep theirs.
    mutating func writeMoments(_ moments: [String: Data?], userID: Int64) {
        for (name, part) in moments { users[userID]?.moments[name] = part }
    }

    mutating func commitVersion(userID: Int64, version: Int64, parent: Int64, levels: [String: Int64], learner: Data?,
                                working: Data? = nil, cause: MemoryCause, causeID: String?, actor: String, setsLearner: Bool = true) {
        versions[userID, default: [:]][version] = .init(version: MemoryVersion(version: version, parent: parent, levels: levels,
                                                                              cause: cause, causeID: causeID, actor: actor,
                                                                              createdAt: Date()), learner: learner)
        if setsLearner { users[userID]?.learner = working ?? learner }
        if let u = users[userID]?.user {
            users[userID]?.user = User(id: u.id, tenantID: u.tenantID, name: u.name, version: version, jobsApplied: u.jobsApplied,
                                       learning: u.learning, frozen: u.frozen, createdAt: u.createdAt,
                                       unconsolidatedTokens: cause == .consolidate || cause == .reset ? 0 : u.unconsolidatedTokens)
        }
    }

    /// Drops versions older than the newest `keep` (never the current one) and the snapshots no kept version names.
    mutating func prune(userID: Int64, keep: Int) {
        guard let all = versions[userID], let newest = all.keys.max(), let current = users[userID]?.user.version else { return }
        for v in all.keys where v != current && v <= newest - Int64(keep) { versions[userID]?[v] = nil }
        let named = Set((versions[userID] ?? [:]).values.flatMap { $0.version.levels.values })
        snapshots = snapshots.filter { $0.value.user != userID || named.contains($0.key) }
    }

    mutating func cancelQueued(userID: Int64, version: Int64, cause: MemoryCause, actor: String) -> [Int64] {
        let ids = jobs.values.filter { $0.userID == userID && $0.state == .queued }.map(\.job.id).sorted()
        guard !ids.isEmpty else { return [] }
        for id in ids {
            jobs[id]?.state = .cancelled
            jobs[id]?.finishedAt = Date()
        }
        audit(userID: userID, event: .learningCancelled, from: version, to: version, actor: actor, causeID: cause.rawValue,
              detail: "{\"by\": \"\(cause.rawValue)\", \"job_ids\": [\(ids.map(String.init).joined(separator: ", "))]}")
        return ids
    }

    /// Queues a consolidation unless one is waiting for the user; true when queued.
    @discardableResult
    mutating func enqueueConsolidation(userID: Int64, trigger: ConsolidationTrigger) -> Bool {
        guard !jobs.values.contains(where: { $0.userID == userID && $0.state == .queued && $0.job.kind == .consolidate })
        else { return false }
        let id = self.id()
        jobs[id] = .init(job: LearningJob(id: id, kind: .consolidate, sourceID: nil, tokens: [], learnable: [], actor: "system",
                                          trigger: trigger),
                         userID: userID, state: .queued, appliedVersion: nil, createdAt: Date(), finishedAt: nil)
        return true
    }

    mutating func enqueue(_ job: LearningRequest, kind: JobKind, source: UUID, userID: Int64, actor: String) -> Int64 {
        let id = self.id()
        jobs[id] = .init(job: LearningJob(id: id, kind: kind, sourceID: source, tokens: job.tokens, learnable: job.learnable, actor: actor),
                         userID: userID, state: .queued, appliedVersion: nil, createdAt: Date(), finishedAt: nil)
        return id
    }

    mutating func audit(userID: Int64, event: AuditEventKind, from: Int64?, to: Int64?, actor: String, causeID: String?,
                        detail: String = "{}") {
        guard let tenant = users[userID]?.user.tenantID else { return }
        events.append((tenant, AuditEvent(id: id(), userID: userID, event: event, fromVersion: from, toVersion: to, actor: actor,
                                          causeID: causeID, detail: detail, createdAt: Date())))
    }
}

/// One lock per user: a change or a learning round holds the user's lock;
/// `tryLock` skips a held user (as SKIP LOCKED does), `lock` waits its turn.
actor UserLocks {
    private var held: Set<Int64> = []
    private var waiting: [Int64: [CheckedContinuation<Void, Never>]] = [:]

    func tryLock(_ id: Int64) -> Bool { held.insert(id).inserted }

    /// Runs `body` holding the user's lock (waiting for it first).
    nonisolated func holding<T>(_ id: Int64, _ body: () async throws -> T) async throws -> T {
        await lock(id)
        do {
            let value = try await body()
            await unlock(id)
            return value
        } catch {
            await unlock(id)
            throw error
        }
    }

    func lock(_ id: Int64) async {
        guard held.contains(id) else {
            held.insert(id)
            return
        }
        await withCheckedContinuation { waiting[id, default: []].append($0) }   // the lock is handed over on unlock
    }

    func unlock(_ id: Int64) {
        if var queue = waiting[id], !queue.isEmpty {
            let next = queue.removeFirst()
            waiting[id] = queue.isEmpty ? nil : queue
            next.resume()
        } else {
            held.remove(id)
        }
    }
}
