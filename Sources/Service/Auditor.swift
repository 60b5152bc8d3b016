// Auditor: the drift audit of users' memory versions. After a learning round
// changes a user's version (no sooner than audit_interval_seconds after that
// user's previous audit) and on demand, it measures the version against the
// backbone (Drift: KL and top-1 agreement on the tenant's probe set,
// forgetting on shipped reference text, personalisation on the user's recent
// text, parameter norms and change, activity), stores the report, checks the
// tenant's policies and applies their actions (warn, freeze, rollback), each
// an audit event.
import Foundation
import Logging
import Memory
import Model
import Store
import Synchronization

/// A threshold on one audit metric and what to do when it is crossed.
struct Policy: Codable, Sendable, Equatable {
    enum Action: String, Codable, Sendable { case warn, freeze, rollback }
    var metric: DriftMetric
    /// Crossed when the metric is above `max` or below `min`.
    var max: Double?
    var min: Double?
    var action: Action

    /// Why a policy a request gives cannot be used (→ 400 naming `parameter`).
    struct Invalid: Error, CustomStringConvertible {
        let description: String
        let parameter: String
    }

    func validate() throws {
        guard (max == nil) != (min == nil) else { throw Invalid(description: "give exactly one of max and min", parameter: "max") }
        guard (max ?? min!).isFinite else { throw Invalid(description: "the threshold must be a finite number", parameter: "max") }
    }

    /// Whether `value` crosses the threshold.
    func crossed(by value: Double) -> Bool {
        if let max, value > max { return true }
        if let min, value < min { return true }
        return false
    }

    /// The defaults: flags only (no automatic action). kl_max separates the
    /// audit test's users best (normally taught 0.095, fed contradicting
    /// corrections 2.56); see README, "Drift audit".
    static let defaults = [
        Policy(metric: .klMax, max: 1.0, action: .warn),
        Policy(metric: .top1Agreement, min: 0.8, action: .warn),
        Policy(metric: .forgettingPPLRatio, max: 1.1, action: .warn),
    ]
}

/// A crossed policy.
struct DriftFlag: Codable, Sendable, Equatable {
    var metric: DriftMetric
    var value: Double
    var max: Double?
    var min: Double?
    var action: Policy.Action
}

final class Auditor: Sendable {
    let memory: UserMemory
    let configuration: ServiceConfiguration
    let logger: Logger
    let defaultProbes: [String]
    let reference: [Int]

    /// What the auditor keeps between audits, behind one lock.
    struct State {
        /// The backbone's perplexity on the reference text (computed once).
        var backboneReferencePPL: Double?
        /// Users whose new version awaits an audit, with when it is due; last audit per user.
        var pending: [Int64: (tenantID: Int64, due: Date)] = [:]
        var lastAudit: [Int64: Date] = [:]
    }
    private let state = Mutex(State())

    struct MissingResource: Error, CustomStringConvertible { let description: String }

    /// The user has no stored memory to audit (→ 404).
    struct NoMemory: Error, CustomStringConvertible {
        let user: String
        var description: String { "user '\(user)' has no memory" }
    }

    init(memory: UserMemory, store: any MemoryStore & AuditStore, configuration: ServiceConfiguration, metrics: Metrics,
         logger: Logger) throws {
        self.memory = memory
        self.metrics = metrics
        self.store = store
        self.configuration = configuration
        self.logger = logger
        guard let dir = Bundle.module.url(forResource: "Audit", withExtension: nil),
              let probes = FileManager.default.contents(atPath: dir.path + "/probes.json"),
              let text = FileManager.default.contents(atPath: dir.path + "/reference.txt") else {
            throw MissingResource(description: "the audit's probe set or reference text is missing from this build")
        }
        struct ProbeFile: Decodable { let probes: [String] }
        defaultProbes = try JSONDecoder().decode(ProbeFile.self, from: probes).probes
        reference = Array(memory.model.tokenizer.encode(String(decoding: text, as: UTF8.self))
            .prefix(configuration.auditReferenceTokens))
    }

    /// Reports, events, settings and the memories they measure.
    let store: any MemoryStore & AuditStore
    let metrics: Metrics

    // MARK: Scheduling

    /// After a round changed the user's version: due now, or once the interval since their last audit has passed.
    func versionChanged(userID: Int64, tenantID: Int64, dueNow: Bool = false) {
        guard configuration.audit else { return }
        let interval = configuration.auditIntervalSeconds
        state.withLock { s in
            let due = dueNow ? Date() : s.lastAudit[userID].map { $0.addingTimeInterval(interval) } ?? Date()
            s.pending[userID] = (tenantID, dueNow ? due : max(due, s.pending[userID]?.due ?? .distantPast))
        }
    }

    /// Runs the audits that are due (background, never on a request's path).
    /// Learning comes first: while jobs wait (`learningWaits`, asked only
    /// when an audit is due), an audit runs only once it is
    /// `audit_max_delay_seconds` past due, so audits take the lanes' idle
    /// time and a saturated queue still audits every user.
    func runDue(learningWaits: () async -> Bool = { false }) async {
        let now = Date()
        guard state.withLock({ s in s.pending.values.contains { $0.due <= now } }) else { return }
        let cutoff = await learningWaits() ? now.addingTimeInterval(-configuration.auditMaxDelaySeconds) : now
        let due = state.withLock { s in
            let due = s.pending.filter { $0.value.due <= cutoff }
            for id in due.keys { s.pending[id] = nil }
            return due
        }
        for (userID, entry) in due {
            do {
                guard let user = try await store.user(id: userID, tenantID: entry.tenantID) else { continue }
                _ = try await audit(user, actor: "policy")
            } catch {
                logger.error("audit of user \(userID) failed: \(error)")
            }
        }
    }

    // MARK: Measuring

    /// The tenant's probe texts (its own set, else the default one).
    func probes(tenantID: Int64) async throws -> [String] {
        if let json = try await store.auditSettings(tenantID: tenantID).probes {
            return try JSONReply.stored(json, as: [String].self, "probe set")   // unreadable: the server's fault, not the request's
        }
        return defaultProbes
    }

    /// The tenant's policies (its own, else the defaults).
    func policies(tenantID: Int64) async throws -> [Policy] {
        if let json = try await store.auditSettings(tenantID: tenantID).policies {
            return try JSONReply.stored(json, as: [Policy].self, "policies")
        }
        return Policy.defaults
    }

    /// Measures the user's current version, stores the report, applies the
    /// policies' actions (as `actor`). Returns the metrics and flags.
    func audit(_ user: User, actor: String) async throws -> (DriftMetrics, [DriftFlag]) {
        state.withLock { $0.lastAudit[user.id] = Date() }
        guard let stored = try await store.memory(userID: user.id) else { throw NoMemory(user: user.name) }
        let previous = stored.version > 0 ? try await store.memory(userID: user.id, version: stored.version - 1) : nil
        let memory = self.memory, reference = self.reference, personalTokens = configuration.auditPersonalTokens
        let probeTokens = try await probes(tenantID: user.tenantID).map { memory.model.tokenizer.encode($0) }
        let backboneReference = try await backboneReferencePerplexity()
        let auditSeconds = self.metrics.auditSeconds
        let metrics = try await memory.compute(.heavy) {
            let start = ContinuousClock.now
            defer { auditSeconds.observe((ContinuousClock.now - start).seconds) }
            let learner = try memory.learner(stored)
            return try Drift.measure(model: memory.model, learner: learner, hasLevels: !stored.levels.isEmpty,
                                     previous: try previous.map { try memory.learner($0) }, probes: probeTokens,
                                     reference: reference, backboneReferencePerplexity: backboneReference,
                                     personalTokens: personalTokens, version: stored.version, jobsApplied: stored.jobsApplied)
        }
        let flags = try await policies(tenantID: user.tenantID).compactMap { p -> DriftFlag? in
            guard let v = metrics.value(p.metric), p.crossed(by: v) else { return nil }
            return DriftFlag(metric: p.metric, value: v, max: p.max, min: p.min, action: p.action)
        }
        try await store.saveDriftReport(userID: user.id, version: metrics.version, metrics: try Self.json(metrics),
                                           flags: try Self.json(flags), passed: flags.isEmpty)
        try await act(on: flags, user: user, version: metrics.version, actor: actor)
        return (metrics, flags)
    }

    /// The policies' actions: a warn event per flag, freezing, rollback to the last version that passed.
    func act(on flags: [DriftFlag], user: User, version: Int64, actor: String) async throws {
        metrics.auditsRun.increment()
        guard !flags.isEmpty else { return }
        metrics.auditsFlagged.increment()
        for action in Set(flags.map(\.action)) { metrics.policyActions[action]?.increment() }
        let detail = try Self.json(flags)
        try await store.recordAudit(userID: user.id, event: .warn, from: version, to: version, actor: actor,
                                       causeID: flags.map(\.metric.rawValue).joined(separator: ","), detail: "{\"flags\": \(detail)}")
        if flags.contains(where: { $0.action == .freeze }) {
            try await store.setFrozen(userID: user.id, true, actor: actor, causeID: "version \(version)",
                                         detail: "{\"flags\": \(detail)}")
        }
        if flags.contains(where: { $0.action == .rollback }),
           let target = try await store.lastPassingVersion(userID: user.id, before: version) {
            // Only from the version measured: if learning has moved past it,
            // the newer version is audited (now) and the policy judges that one.
            // The jobs queued behind the failing version are cancelled, so the
            // rollback does not re-apply what made it fail.
            switch try await store.rollback(userID: user.id, to: target, keep: configuration.versionsKept, actor: actor,
                                               cancelQueued: true, ifCurrent: version) {
            case .rolledBack(let m):
                logger.info("policy rolled user \(user.id) back from version \(version) to \(target) (new version \(m.version), \(m.cancelledJobs.count) queued jobs cancelled)")
                versionChanged(userID: user.id, tenantID: user.tenantID)   // the restored version gets its own report
            case .moved(let current):
                logger.info("policy rollback of user \(user.id) skipped: version \(version) was measured, \(current) is current; auditing that")
                versionChanged(userID: user.id, tenantID: user.tenantID, dueNow: true)
            case .notKept:
                break
            }
        }
    }

    func backboneReferencePerplexity() async throws -> Double {
        if let cached = state.withLock({ $0.backboneReferencePPL }) { return cached }
        let memory = self.memory, reference = self.reference
        let ppl = try await memory.compute(.heavy) { try memory.model.perplexity(tokens: reference).perplexity }
        state.withLock { $0.backboneReferencePPL = ppl }
        return ppl
    }

    static func json(_ value: some Encodable) throws -> String {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        e.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        return String(decoding: try e.encode(value), as: UTF8.self)
    }
}
