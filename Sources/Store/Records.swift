// The store's records: what the service reads and writes, independent of
// how it is stored (PostgreSQL in Database+*.swift, memory in InMemoryStore).
// A user's memory version n names one level snapshot per level that has
// changed since the user started (a level without one is a fresh level) and
// holds the learner part at that version; version 0 is the backbone. The
// optimizer's working state (each level's moments, the open chunks'
// accumulators in the user's learner part) is kept for the current version
// only: a version restored by rollback or fork-at-an-older-version has its
// weights and counters, and its optimizer starts afresh.
import Foundation

/// A user of a tenant.
public struct User: Sendable, Equatable {
    public let id: Int64
    public let tenantID: Int64
    public let name: String
    /// The current memory version.
    public let version: Int64
    /// Learning jobs applied.
    public let jobsApplied: Int64
    /// Whether the tenant lets its users' memories learn.
    public let learning: Bool
    /// Frozen by a drift policy or an operator: no learning until cleared.
    public let frozen: Bool
    public let createdAt: Date
    /// Learnable tokens applied since the memory was last consolidated or reset.
    public internal(set) var unconsolidatedTokens: Int64 = 0

    /// Whether this user's requests are learned.
    public var learns: Bool { learning && !frozen }
}

/// What made a memory version.
public enum MemoryCause: String, Sendable, CaseIterable, Codable {
    case created, learning, feedback, reset, fork, rollback, consolidate, `import`
}

/// Where a learning job came from: a generation's user text, feedback on
/// one, or an automatic consolidation of the user's recent contexts.
public enum JobKind: String, Sendable, CaseIterable {
    case generation, feedback, consolidate

    /// The cause of the version a job of this kind makes.
    public var cause: MemoryCause {
        switch self {
        case .generation: .learning
        case .feedback: .feedback
        case .consolidate: .consolidate
        }
    }
}

/// What made the service enqueue a consolidation: the user idle long enough
/// with something to consolidate, their fast level's norm past its bound, or
/// enough learnable tokens since the last consolidation.
public enum ConsolidationTrigger: String, Sendable, CaseIterable, Codable {
    case idle, fastNorm = "fast_norm", tokens
}

/// What an audit event records: a change of a memory (by its cause), a job
/// that failed or was cancelled, an erasure's tombstone, a policy's action.
public enum AuditEventKind: String, Sendable, CaseIterable, Codable {
    case learning, feedback, reset, fork, rollback, consolidate, `import`
    case learningFailed = "learning_failed", learningCancelled = "learning_cancelled"
    case erase, freeze, unfreeze, warn

    /// The event of a memory change made for `cause` (version 0 is not an event).
    public init?(_ cause: MemoryCause) {
        guard cause != .created else { return nil }
        self.init(rawValue: cause.rawValue)
    }
}

/// One version of a user's memory.
public struct MemoryVersion: Sendable, Equatable {
    public let version: Int64
    public let parent: Int64?
    /// Snapshot id per level that differs from a fresh level.
    public let levels: [String: Int64]
    /// What made it.
    public let cause: MemoryCause
    /// The generation or feedback id, or the source of a fork or rollback.
    public let causeID: String?
    /// Who: "key:<id>" of the API key whose request caused it, or "operator".
    public let actor: String
    public let createdAt: Date
}

/// A user's memory at one version: level parts by level name and the learner part.
public struct StoredMemory: Sendable {
    public let userID: Int64
    public let version: Int64
    /// Level parts by level name (empty when read without them).
    public let levels: [String: Data]
    /// Snapshot id per stored level (a level without one is fresh).
    public let levelIDs: [String: Int64]
    /// The current version's optimizer moments by level name (read with the
    /// level parts; empty for an older version, whose optimizer starts afresh).
    public var moments: [String: Data] = [:]
    /// The learner part: for the current version the user's (with the open
    /// chunks' accumulators), for an older one the part kept with it.
    public let learner: Data?
    /// Learning jobs applied to the user so far (read with the rest, so consistent with the learner's counters).
    public let jobsApplied: Int64
}

/// A change to a user's memory that makes a new version.
public struct MemoryChange: Sendable {
    /// Levels whose weights changed: the new part, or nil for a fresh level.
    public var levels: [String: Data?]
    /// Per new part, its tensors' dtypes and shapes as JSON ({"name": {"dtype",
    /// "shape"}}), kept beside the bytes for inspection ("{}" when absent):
    /// the store never decodes a part.
    public var shapes: [String: String]
    /// The learner part kept with the new version (nil: fresh counters).
    public var learner: Data?
    /// The user's learner part once the change is current, when it holds more
    /// than the version's (the open chunks' accumulators); nil: `learner`.
    /// Written only by a change that becomes current at once (a learning
    /// round writes its last one itself, in `LearningOutcome`).
    public var working: Data?
    /// Optimizer moments after the change, by level: the new part, or nil
    /// for a fresh optimizer; a level not named keeps its moments. Written
    /// like `working`.
    public var moments: [String: Data?]
    public var cause: MemoryCause
    public var causeID: String?
    public var actor: String

    public init(levels: [String: Data?], shapes: [String: String] = [:], learner: Data?, working: Data? = nil,
                moments: [String: Data?] = [:], cause: MemoryCause, causeID: String? = nil, actor: String) {
        self.levels = levels
        self.shapes = shapes
        self.learner = learner
        self.working = working
        self.moments = moments
        self.cause = cause
        self.causeID = causeID
        self.actor = actor
    }
}

/// Where a learning job is: waiting, applied, refused (the stored memory
/// cannot be read by this server) or cancelled (a reset, rollback or import
/// came after it).
public enum JobState: String, Sendable, CaseIterable {
    case queued, done, failed, cancelled
}

/// What a memory operation (reset, rollback, import, consolidation) did:
/// the version current afterwards and the queued jobs it cancelled.
public struct MemoryMutation: Sendable, Equatable {
    public let version: Int64
    public let cancelledJobs: [Int64]
}

/// A queued learning job.
public struct LearningJob: Sendable, Equatable {
    public let id: Int64
    public let kind: JobKind
    public let sourceID: UUID?
    /// Empty for a consolidation (it consolidates the learner's recent contexts).
    public let tokens: [Int]
    public let learnable: [Bool]
    public let actor: String
    /// What enqueued a consolidation (nil for other kinds).
    public var trigger: ConsolidationTrigger? = nil

    /// A user's unconsolidated token count after `jobs`, in order, taught
    /// `taught` tokens each, starting from `start`: a consolidation clears it,
    /// every other job adds what it taught. The one rule both stores and the
    /// worker's triggers count by.
    public static func unconsolidated(from start: Int64, after jobs: [LearningJob], taught: [Int]) -> Int64 {
        zip(jobs, taught).reduce(start) { n, jt in jt.0.kind == .consolidate ? 0 : n + Int64(jt.1) }
    }
}

/// What a learning job is made of, when a request enqueues one.
public struct LearningRequest: Sendable {
    public let tokens: [Int]
    public let learnable: [Bool]
    public init(tokens: [Int], learnable: [Bool]) {
        precondition(tokens.count == learnable.count)
        self.tokens = tokens
        self.learnable = learnable
    }
}

/// What the worker made of a claimed batch of jobs.
public struct LearningOutcome: Sendable {
    /// Per job in claim order: the change it made to the levels (nil: it only
    /// accumulated), which becomes a version.
    public var changes: [MemoryChange?]
    /// Per job, the tokens it taught (its learnable targets), for its audit event.
    public var taughtTokens: [Int]
    /// The user's learner part after the last job (with its accumulators).
    public var learner: Data?
    /// The optimizer moments after the round of the levels it changed, by
    /// level (nil: a fresh optimizer); a level not named keeps its moments.
    public var moments: [String: Data?]
    /// Per job, further figures for its audit event's detail (a
    /// consolidation's KL before and after, its steps); empty: none.
    public var details: [[String: Double]]
    /// Enqueue a consolidation of the user after this round (in the same
    /// transaction; nothing when one is already waiting).
    public var consolidate: ConsolidationTrigger?

    public init(changes: [MemoryChange?], taughtTokens: [Int]? = nil, learner: Data?, moments: [String: Data?] = [:],
                details: [[String: Double]]? = nil, consolidate: ConsolidationTrigger? = nil) {
        self.changes = changes
        self.taughtTokens = taughtTokens ?? changes.map { _ in 0 }
        self.learner = learner
        self.moments = moments
        self.details = details ?? changes.map { _ in [:] }
        self.consolidate = consolidate
    }

    /// A job's audit detail: its id, the tokens it taught, what triggered it
    /// (a consolidation) and `details`, as one JSON object with sorted keys.
    static func auditDetail(job: LearningJob, taught: Int, details: [String: Double]) -> String {
        var members = ["\"job_id\": \(job.id)", "\"learnable_tokens\": \(taught)"]
        if let t = job.trigger { members.append("\"trigger\": \"\(t.rawValue)\"") }
        for (k, v) in details.sorted(by: { $0.key < $1.key }) where v.isFinite { members.append("\"\(k)\": \(v)") }
        return "{" + members.sorted().joined(separator: ", ") + "}"
    }
}

/// A stored generation, for feedback.
public struct StoredGeneration: Sendable {
    public let id: UUID
    public let userID: Int64
    public let memoryVersion: Int64
    public let promptTokens: [Int]
    public let completionTokens: [Int]
}

/// What a rollback did.
public enum RollbackOutcome: Sendable, Equatable {
    /// The new version, and the queued jobs cancelled.
    case rolledBack(MemoryMutation)
    /// The version asked for is not kept.
    case notKept
    /// `ifCurrent` was given and the user's current version is another one (nothing changed).
    case moved(current: Int64)
}

/// A job `learnNext` applied: the memory version current after it, and its
/// lag in seconds (enqueue to commit).
public typealias AppliedJob = (job: LearningJob, version: Int64, lagSeconds: Double)

// MARK: Tenants and keys

/// An organisation using the server; its users and keys belong to it.
public struct Tenant: Sendable, Equatable {
    public let id: Int64
    public let name: String
    public let learning: Bool
    public let createdAt: Date
}

/// What an API key may do. `app` keys serve an application's requests
/// (generation, completions, chat, models, feedback, and reading a user's
/// memory summary and versions); `admin` keys also operate memories (reset,
/// rollback, fork, consolidate, import, export, erase) and the drift audit.
public enum KeyRole: String, Sendable, CaseIterable, Codable {
    case app, admin

    /// Whether a key of this role may do what `required` allows.
    public func permits(_ required: KeyRole) -> Bool { self == .admin || required == .app }
}

/// A stored API key (never the key itself).
public struct APIKey: Sendable, Equatable {
    public let id: Int64
    public let tenantID: Int64
    public let name: String
    public let role: KeyRole
    /// The key's first characters, to recognise it in listings.
    public let prefix: String
    public let createdAt: Date
    public let revokedAt: Date?
}

/// Who a request authenticated as.
public struct Principal: Sendable, Equatable {
    public let tenantID: Int64
    public let keyID: Int64
    public let role: KeyRole

    public init(tenantID: Int64, keyID: Int64, role: KeyRole) {
        self.tenantID = tenantID
        self.keyID = keyID
        self.role = role
    }
}

// MARK: The drift audit

/// One mutation of a user's memory (or an erasure's tombstone).
public struct AuditEvent: Sendable, Equatable {
    public let id: Int64
    /// Nil for an erased user's tombstone.
    public let userID: Int64?
    public let event: AuditEventKind
    public let fromVersion: Int64?
    public let toVersion: Int64?
    public let actor: String
    public let causeID: String?
    /// JSON object with event-specific details (no text, no weights).
    public let detail: String
    public let createdAt: Date
}

/// The drift metrics of one memory version and what the policies made of them.
public struct DriftReport: Sendable, Equatable {
    public let userID: Int64
    public let version: Int64
    /// JSON object of metrics.
    public let metrics: String
    /// JSON array of flags (policy violations).
    public let flags: String
    public let passed: Bool
    public let computedAt: Date
}

/// A user's latest drift report, for tenant-wide rankings.
public struct RankedDrift: Sendable, Equatable {
    public let user: String
    public let frozen: Bool
    public let report: DriftReport
}

// MARK: Limits every store has

/// What any store can hold, whatever keeps it: callers check values against
/// these before they reach a store (the service refuses others with 400).
public enum StoreLimits {
    /// The times a store can bind: PostgresNIO encodes a Date as Int64
    /// microseconds, which traps for non-finite or far-off times, so every
    /// caller-given time must lie in years 1…9999.
    public static let storableDates = Date(timeIntervalSince1970: -62_135_596_800)...Date(timeIntervalSince1970: 253_402_300_799)

    /// Whether a time can be stored (finite, in years 1…9999). The finiteness
    /// test comes first: Date's `<=` is `!(>)`, which is true for NaN.
    public static func isStorable(_ d: Date) -> Bool {
        d.timeIntervalSince1970.isFinite && storableDates.contains(d)
    }
}
