// The store's contracts: what the service needs of persistence, one
// protocol per concern. `Database` (PostgreSQL) is the source of truth;
// `InMemoryStore` is a double with the same semantics for fast router-level
// tests; the contract tests in StoreTests run against both.
//
// Invariants every implementation keeps:
//   * every query is scoped by tenant, or by a user id resolved within one;
//   * a memory version, once written, never changes; version 0 is the backbone;
//   * a user's memory changes only under that user's lock (one round of
//     learning, one operation at a time, across every replica), and a change
//     is applied wholly or not at all;
//   * erasing a user removes every row that holds their data and leaves one
//     content-free tombstone in the audit log.
import Foundation

/// Tenants and their API keys (only hashes are stored).
public protocol TenantStore: Sendable {
    func createTenant(name: String) async throws -> Tenant
    func tenants() async throws -> [Tenant]
    func tenant(named name: String) async throws -> Tenant?
    /// A new key of `role`: its record and the key itself, which is not stored.
    func createKey(tenantID: Int64, name: String, role: KeyRole) async throws -> (APIKey, String)
    func keys(tenantID: Int64) async throws -> [APIKey]
    /// False when the tenant has no such live key.
    func revokeKey(id: Int64, tenantID: Int64) async throws -> Bool
    /// The tenant, key and role a presented key belongs to; nil for unknown or revoked keys.
    func authenticate(key: String) async throws -> Principal?
    /// A new browser session of `principal`'s key, valid for `seconds`: the token (only its hash is kept).
    func createSession(for principal: Principal, seconds: Double) async throws -> String
    /// The principal of a live session (its key not revoked, not expired); nil otherwise.
    func session(token: String) async throws -> Principal?
    /// Ends a session (nothing when there is none).
    func endSession(token: String) async throws
}

/// Users and the versions of their memories.
public protocol MemoryStore: Sendable {
    /// The tenant's user named `name`; created (at version 0) when `create` and missing.
    func user(tenantID: Int64, name: UserName, create: Bool) async throws -> User?
    func user(id: Int64, tenantID: Int64) async throws -> User?
    func users(tenantID: Int64) async throws -> [User]
    /// Erases every row of the user, leaving a tombstone; false when the tenant has no such user.
    func eraseUser(tenantID: Int64, name: UserName, actor: String) async throws -> Bool
    /// The versions kept, newest first.
    func versions(userID: Int64) async throws -> [MemoryVersion]
    /// The memory at `version` (nil: the current one), or nil when not kept;
    /// without the learner part or the level parts when asked.
    func memory(userID: Int64, version: Int64?, withLearner: Bool, withLevels: Bool) async throws -> StoredMemory?
    /// Runs `body` on the current memory under the user's lock and writes
    /// what it returns as a new version (nil: no change); with
    /// `cancelQueued`, a change also cancels the user's queued jobs.
    func mutateMemory(userID: Int64, keep: Int, cancelQueued: Bool,
                      _ body: @Sendable (StoredMemory) async throws -> MemoryChange?) async throws -> MemoryMutation
    /// Makes a kept version current again as a new version (see `RollbackOutcome`).
    func rollback(userID: Int64, to version: Int64, keep: Int, actor: String, cancelQueued: Bool,
                  ifCurrent: Int64?) async throws -> RollbackOutcome
    /// A new user of the same tenant holding a copy of `source`'s memory at `version` (nil: current).
    /// Throws `NotFound` for a version not kept, `Conflict` when the target exists.
    func forkUser(source: User, version: Int64?, target: UserName, actor: String) async throws -> User
}

/// Generations, feedback and the learning-job queue.
public protocol LearningQueue: Sendable {
    /// Records a generation and, when given, its learning job, together; returns the job id.
    func recordGeneration(id: UUID, userID: Int64, memoryVersion: Int64, prompt: [Int], completion: [Int],
                          job: LearningRequest?, actor: String) async throws -> Int64?
    /// A generation of one of the tenant's users (nil: none, or another tenant's).
    func generation(id: UUID, tenantID: Int64) async throws -> StoredGeneration?
    /// Records feedback and, when given, its learning job, together; returns the feedback and job ids.
    func recordFeedback(generation: StoredGeneration, rating: String, correction: String?, job: LearningRequest?,
                        actor: String) async throws -> (UUID, Int64?)
    func queuedJobs(userID: Int64) async throws -> Int
    /// Jobs waiting in all, and the age of the oldest in seconds.
    func queuedJobs() async throws -> (count: Int, oldestSeconds: Double)
    /// Queues a consolidation (trigger `idle`) for up to `limit` users who
    /// have unconsolidated tokens, whose last learning job was applied at
    /// least `idleSeconds` ago, with no job waiting, not frozen, in a tenant
    /// that learns; longest idle first. Never two waiting for one user,
    /// whichever replica calls it. Returns the users queued.
    func enqueueIdleConsolidations(idleSeconds: Double, limit: Int) async throws -> [Int64]
    /// A job's state, the version it was applied in, and whether its user is frozen.
    func jobState(id: Int64) async throws -> (state: JobState, version: Int64?, frozen: Bool)?
    /// One round: claims the unfrozen user whose oldest queued job is oldest
    /// among the users no one holds, runs `body` on their memory and up to
    /// `limit` of their jobs under their lock, and commits its outcome (the
    /// versions, the learner part, the jobs done, the user's unconsolidated
    /// token count, a consolidation the outcome asks for) wholly or not at all. A
    /// `JobsUnlearnable` from `body` marks the jobs failed (and `failed` is
    /// told once that is committed). Nil when no job waited.
    func learnNext(limit: Int, keep: Int, failed: (@Sendable ([LearningJob], String) -> Void)?,
                   _ body: @Sendable (User, StoredMemory, [LearningJob]) async throws -> LearningOutcome) async throws -> [AppliedJob]?
}

/// The drift audit: events, reports, tenant settings, freezing.
public protocol AuditStore: Sendable {
    func recordAudit(userID: Int64, event: AuditEventKind, from: Int64?, to: Int64?, actor: String, causeID: String?,
                     detail: String) async throws
    /// The user's events in order within [since, until), the newest `limit`.
    func auditEvents(userID: Int64, since: Date?, until: Date?, limit: Int) async throws -> [AuditEvent]
    /// The tenant's events (tombstones included) in order within [since, until), the newest `limit`.
    func auditEvents(tenantID: Int64, since: Date?, until: Date?, limit: Int) async throws -> [AuditEvent]
    func saveDriftReport(userID: Int64, version: Int64, metrics: String, flags: String, passed: Bool) async throws
    /// The user's reports, oldest version first.
    func driftReports(userID: Int64) async throws -> [DriftReport]
    /// Each user's newest report computed in [since, until), ranked by `metric`.
    func rankedDrift(tenantID: Int64, metric: String, ascending: Bool, flaggedOnly: Bool, since: Date?, until: Date?,
                     limit: Int, offset: Int) async throws -> [RankedDrift]
    /// The newest kept version below `before` whose report passed (0 passes).
    func lastPassingVersion(userID: Int64, before: Int64) async throws -> Int64?
    func auditSettings(tenantID: Int64) async throws -> (policies: String?, probes: String?)
    func setPolicies(tenantID: Int64, json: String?) async throws
    func setProbes(tenantID: Int64, json: String?) async throws
    /// Freezes or unfreezes the user with an audit event; false when nothing changed.
    @discardableResult
    func setFrozen(userID: Int64, _ frozen: Bool, actor: String, causeID: String?, detail: String) async throws -> Bool
}

/// The store's health and housekeeping.
public protocol StoreMaintenance: Sendable {
    /// Fails unless the store answers.
    func ping() async throws
    /// Whether every bundled migration is applied.
    func isMigrated() async throws -> Bool
    /// Deletes what `retention` no longer keeps, as of `now`.
    func prune(_ retention: Retention, now: Date) async throws -> PruneCounts
}

/// Everything the service keeps.
public typealias ContinuumStore = TenantStore & MemoryStore & LearningQueue & AuditStore & StoreMaintenance

// The calls with their usual arguments.
extension MemoryStore {
    public func user(tenantID: Int64, name: UserName) async throws -> User? {
        try await user(tenantID: tenantID, name: name, create: false)
    }
    public func memory(userID: Int64, version: Int64? = nil, withLearner: Bool = true) async throws -> StoredMemory? {
        try await memory(userID: userID, version: version, withLearner: withLearner, withLevels: true)
    }
    public func mutateMemory(userID: Int64, keep: Int, _ body: @Sendable (StoredMemory) async throws -> MemoryChange?)
        async throws -> MemoryMutation {
        try await mutateMemory(userID: userID, keep: keep, cancelQueued: false, body)
    }
    public func rollback(userID: Int64, to version: Int64, keep: Int, actor: String) async throws -> RollbackOutcome {
        try await rollback(userID: userID, to: version, keep: keep, actor: actor, cancelQueued: false, ifCurrent: nil)
    }
}

extension AuditStore {
    public func recordAudit(userID: Int64, event: AuditEventKind, from: Int64?, to: Int64?, actor: String) async throws {
        try await recordAudit(userID: userID, event: event, from: from, to: to, actor: actor, causeID: nil, detail: "{}")
    }
    public func auditEvents(userID: Int64, limit: Int = 1000) async throws -> [AuditEvent] {
        try await auditEvents(userID: userID, since: nil, until: nil, limit: limit)
    }
    public func auditEvents(tenantID: Int64, since: Date? = nil, limit: Int = 1000) async throws -> [AuditEvent] {
        try await auditEvents(tenantID: tenantID, since: since, until: nil, limit: limit)
    }
    @discardableResult
    public func setFrozen(userID: Int64, _ frozen: Bool, actor: String) async throws -> Bool {
        try await setFrozen(userID: userID, frozen, actor: actor, causeID: nil, detail: "{}")
    }
}

extension LearningQueue {
    public func learnNext(limit: Int, keep: Int,
                          _ body: @Sendable (User, StoredMemory, [LearningJob]) async throws -> LearningOutcome) async throws -> [AppliedJob]? {
        try await learnNext(limit: limit, keep: keep, failed: nil, body)
    }
}

extension StoreMaintenance {
    public func prune(_ retention: Retention) async throws -> PruneCounts { try await prune(retention, now: Date()) }
}
