// ServiceConfiguration: the server's settings, with defaults, validated.
import Foundation
import Memory
import Store

/// How the HTTP service runs. Decodes from JSON with defaults for every key.
public struct ServiceConfiguration: Codable, Sendable, Equatable {
    /// Address to listen on.
    public var host = "127.0.0.1"
    /// Port (0: any free port; the bound port is reported when the server starts).
    public var port = 8080
    /// Largest request body in bytes (413 beyond it).
    public var maxBodyBytes = 1 << 20
    /// Largest state file a memory import takes (413 beyond it).
    public var maxImportBytes = 64 << 20
    /// Most prompt tokens per request (413 beyond it); also bounded by the model's context.
    public var maxPromptTokens = 4096
    /// Largest max_tokens a request may ask for (400 beyond it).
    public var maxTokens = 2048
    /// Sequences stepped together by the batch engine.
    public var maxBatch = 16
    /// Generations admitted at once (running + waiting); beyond it 429.
    public var maxQueued = 64
    /// The model's name in the OpenAI-compatible API.
    public var modelName = "continuum"
    /// Learning workers in this process: each applies one user's jobs at a
    /// time, on a compute lane (thread) of its own, so that many users learn
    /// in parallel; consolidations and audits share those lanes.
    public var learningWorkers = 1
    /// Scheduling niceness of the learning lanes (0...19; 0: as generation).
    /// Generation has priority: at 5, a saturated CPU gives a lane about a
    /// quarter of a generation thread's share (CFS weights 335 : 1024), so
    /// learning is slowed, never starved; the lanes also leave the kernels'
    /// worker pool to a generation step in progress.
    public var learningNice = 5
    /// Most prompt tokens one sequence prefills in one batch step: a long
    /// prompt is prefilled over several steps, so other users' tokens keep coming.
    public var prefillChunkTokens = 256
    /// Most jobs of one user applied in one transaction.
    public var learningBatch = 8
    /// Memory versions kept per user (older ones cannot be rolled back to).
    public var versionsKept = 32
    /// Bytes of users' level weights cached in memory.
    public var cacheBytes = 256 << 20
    /// Longest wait for a request's own learning job (`wait_for_learning`).
    public var learningWaitSeconds = 120.0
    /// Audit users' new memory versions in the background (drift metrics, policies).
    public var audit = true
    /// Least seconds between two background audits of one user (new versions in between wait).
    public var auditIntervalSeconds = 30.0
    /// Longest a due background audit waits while learning jobs are queued
    /// (learning lag comes first; audits otherwise take the lanes' idle time).
    public var auditMaxDelaySeconds = 300.0
    /// Tokens of the user's recent text the personalisation metric scores.
    public var auditPersonalTokens = 128
    /// Tokens of the shipped reference text the forgetting metric scores.
    public var auditReferenceTokens = 256
    /// Most on-demand audits (`POST …/audit`, or a first report) per user per minute (429 beyond).
    public var auditsPerUserPerMinute = 2
    /// Most tokens a feedback correction may have (413 beyond).
    public var maxCorrectionTokens = 512
    /// Most policies a tenant may set (400 beyond).
    public var maxPolicies = 64
    /// Most distillation steps an on-demand consolidation may ask for (400 beyond).
    public var maxConsolidationSteps = 64
    /// A connection that sends nothing for this long (between requests, or
    /// mid-request while its headers or body are due) is closed.
    public var idleTimeoutSeconds = 60.0
    /// A request body must arrive within this long (408 beyond).
    public var bodyReadTimeoutSeconds = 30.0
    /// A streamed response whose client reads nothing for this long is ended
    /// (its generation cancelled, its engine slot freed).
    public var streamWriteTimeoutSeconds = 30.0
    /// When users' memories are consolidated automatically, and how.
    public var consolidation = ConsolidationConfiguration()
    /// How long finished records are kept, and how often they are pruned.
    public var retention = RetentionConfiguration()
    /// How long a browser session (signing in to the HTML reports with an admin key) lasts.
    public var sessionHours = 8.0
    /// Mark the session cookie Secure (set it when the service is reached over HTTPS, e.g. behind a TLS proxy).
    public var sessionCookieSecure = false

    enum CodingKeys: String, CodingKey, CaseIterable {
        case host, port, maxImportBytes = "max_import_bytes"
        case maxBodyBytes = "max_body_bytes", maxPromptTokens = "max_prompt_tokens", maxTokens = "max_tokens"
        case maxBatch = "max_batch", maxQueued = "max_queued", modelName = "model_name"
        case learningWorkers = "learning_workers", learningNice = "learning_nice", prefillChunkTokens = "prefill_chunk_tokens", learningBatch = "learning_batch", versionsKept = "versions_kept"
        case cacheBytes = "cache_bytes", learningWaitSeconds = "learning_wait_seconds"
        case audit, auditIntervalSeconds = "audit_interval_seconds", auditMaxDelaySeconds = "audit_max_delay_seconds", auditPersonalTokens = "audit_personal_tokens"
        case auditReferenceTokens = "audit_reference_tokens", auditsPerUserPerMinute = "audits_per_user_per_minute"
        case maxCorrectionTokens = "max_correction_tokens", maxPolicies = "max_policies"
        case maxConsolidationSteps = "max_consolidation_steps", idleTimeoutSeconds = "idle_timeout_seconds"
        case bodyReadTimeoutSeconds = "body_read_timeout_seconds", streamWriteTimeoutSeconds = "stream_write_timeout_seconds"
        case consolidation, retention, sessionHours = "session_hours", sessionCookieSecure = "session_cookie_secure"
    }

    public struct Invalid: Error, CustomStringConvertible {
        public let description: String
    }

    public init() {}

    public init(from decoder: Decoder) throws {
        try checkKnownKeys(decoder, CodingKeys.self, in: "service configuration")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = ServiceConfiguration()
        host = try c.decodeIfPresent(String.self, forKey: .host) ?? d.host
        port = try c.decodeIfPresent(Int.self, forKey: .port) ?? d.port
        maxBodyBytes = try c.decodeIfPresent(Int.self, forKey: .maxBodyBytes) ?? d.maxBodyBytes
        maxImportBytes = try c.decodeIfPresent(Int.self, forKey: .maxImportBytes) ?? d.maxImportBytes
        maxPromptTokens = try c.decodeIfPresent(Int.self, forKey: .maxPromptTokens) ?? d.maxPromptTokens
        maxTokens = try c.decodeIfPresent(Int.self, forKey: .maxTokens) ?? d.maxTokens
        maxBatch = try c.decodeIfPresent(Int.self, forKey: .maxBatch) ?? d.maxBatch
        maxQueued = try c.decodeIfPresent(Int.self, forKey: .maxQueued) ?? d.maxQueued
        modelName = try c.decodeIfPresent(String.self, forKey: .modelName) ?? d.modelName
        learningWorkers = try c.decodeIfPresent(Int.self, forKey: .learningWorkers) ?? d.learningWorkers
        learningNice = try c.decodeIfPresent(Int.self, forKey: .learningNice) ?? d.learningNice
        prefillChunkTokens = try c.decodeIfPresent(Int.self, forKey: .prefillChunkTokens) ?? d.prefillChunkTokens
        learningBatch = try c.decodeIfPresent(Int.self, forKey: .learningBatch) ?? d.learningBatch
        versionsKept = try c.decodeIfPresent(Int.self, forKey: .versionsKept) ?? d.versionsKept
        cacheBytes = try c.decodeIfPresent(Int.self, forKey: .cacheBytes) ?? d.cacheBytes
        learningWaitSeconds = try c.decodeIfPresent(Double.self, forKey: .learningWaitSeconds) ?? d.learningWaitSeconds
        audit = try c.decodeIfPresent(Bool.self, forKey: .audit) ?? d.audit
        auditIntervalSeconds = try c.decodeIfPresent(Double.self, forKey: .auditIntervalSeconds) ?? d.auditIntervalSeconds
        auditMaxDelaySeconds = try c.decodeIfPresent(Double.self, forKey: .auditMaxDelaySeconds) ?? d.auditMaxDelaySeconds
        auditPersonalTokens = try c.decodeIfPresent(Int.self, forKey: .auditPersonalTokens) ?? d.auditPersonalTokens
        auditReferenceTokens = try c.decodeIfPresent(Int.self, forKey: .auditReferenceTokens) ?? d.auditReferenceTokens
        auditsPerUserPerMinute = try c.decodeIfPresent(Int.self, forKey: .auditsPerUserPerMinute) ?? d.auditsPerUserPerMinute
        maxCorrectionTokens = try c.decodeIfPresent(Int.self, forKey: .maxCorrectionTokens) ?? d.maxCorrectionTokens
        maxPolicies = try c.decodeIfPresent(Int.self, forKey: .maxPolicies) ?? d.maxPolicies
        maxConsolidationSteps = try c.decodeIfPresent(Int.self, forKey: .maxConsolidationSteps) ?? d.maxConsolidationSteps
        idleTimeoutSeconds = try c.decodeIfPresent(Double.self, forKey: .idleTimeoutSeconds) ?? d.idleTimeoutSeconds
        bodyReadTimeoutSeconds = try c.decodeIfPresent(Double.self, forKey: .bodyReadTimeoutSeconds) ?? d.bodyReadTimeoutSeconds
        streamWriteTimeoutSeconds = try c.decodeIfPresent(Double.self, forKey: .streamWriteTimeoutSeconds)
            ?? d.streamWriteTimeoutSeconds
        consolidation = try c.decodeIfPresent(ConsolidationConfiguration.self, forKey: .consolidation) ?? d.consolidation
        retention = try c.decodeIfPresent(RetentionConfiguration.self, forKey: .retention) ?? d.retention
        sessionHours = try c.decodeIfPresent(Double.self, forKey: .sessionHours) ?? d.sessionHours
        sessionCookieSecure = try c.decodeIfPresent(Bool.self, forKey: .sessionCookieSecure) ?? d.sessionCookieSecure
        try validate()
    }

    public func validate() throws {
        func fail(_ m: String) throws -> Never { throw Invalid(description: "invalid service configuration: " + m) }
        if !(0...65535).contains(port) { try fail("port must be in 0...65535, got \(port)") }
        if maxBodyBytes < 1024 { try fail("max_body_bytes must be at least 1024") }
        if maxImportBytes < 1024 { try fail("max_import_bytes must be at least 1024") }
        if maxPromptTokens < 1 { try fail("max_prompt_tokens must be at least 1") }
        if maxTokens < 1 { try fail("max_tokens must be at least 1") }
        if maxBatch < 1 { try fail("max_batch must be at least 1") }
        if maxQueued < maxBatch { try fail("max_queued must be at least max_batch") }
        if modelName.isEmpty { try fail("model_name must not be empty") }
        if learningWorkers < 0 { try fail("learning_workers must be at least 0 (0: this replica applies no jobs)") }
        if !(0...19).contains(learningNice) { try fail("learning_nice must be in 0...19") }
        if prefillChunkTokens < 1 { try fail("prefill_chunk_tokens must be at least 1") }
        if learningBatch < 1 { try fail("learning_batch must be at least 1") }
        if versionsKept < 1 { try fail("versions_kept must be at least 1") }
        if cacheBytes < 0 { try fail("cache_bytes must be at least 0") }
        if !(learningWaitSeconds > 0) { try fail("learning_wait_seconds must be positive") }
        if !(auditIntervalSeconds >= 0) { try fail("audit_interval_seconds must be at least 0") }
        if !(auditMaxDelaySeconds >= 0) { try fail("audit_max_delay_seconds must be at least 0") }
        if auditPersonalTokens < 2 { try fail("audit_personal_tokens must be at least 2") }
        if auditReferenceTokens < 2 { try fail("audit_reference_tokens must be at least 2") }
        if auditsPerUserPerMinute < 1 { try fail("audits_per_user_per_minute must be at least 1") }
        if maxCorrectionTokens < 1 { try fail("max_correction_tokens must be at least 1") }
        if maxPolicies < 0 { try fail("max_policies must be at least 0") }
        if !(1...1000).contains(maxConsolidationSteps) { try fail("max_consolidation_steps must be in 1...1000") }
        for (name, v) in [("idle_timeout_seconds", idleTimeoutSeconds), ("body_read_timeout_seconds", bodyReadTimeoutSeconds),
                          ("stream_write_timeout_seconds", streamWriteTimeoutSeconds)] where !(v > 0 && v <= 86400) {
            try fail("\(name) must be in (0, 86400]")
        }
        if !(sessionHours > 0 && sessionHours <= 24 * 30) { try fail("session_hours must be in (0, 720]") }
        try consolidation.validate()
        try retention.validate()
    }
}

/// When the service consolidates a user's memory by itself ("sleep"), as a
/// job in the learning queue: after the user has been idle `idle_seconds`
/// with something learned since the last consolidation, when their fast
/// level's norm reaches `fast_norm`, or every `every_tokens` learnable tokens
/// (0 turns a trigger off). Each consolidation is budgeted (`steps`
/// distillation steps on up to `generated_tokens` generated tokens per
/// context, or `sleep` for the `sleep` method) and, like the on-demand one,
/// makes a version with cause `consolidate` and clears the fast level.
public struct ConsolidationConfiguration: Codable, Sendable, Equatable {
    /// How knowledge moves from the fast level into the slower one.
    public enum Method: String, Codable, Sendable, CaseIterable {
        /// Distil the model with its levels into the model without the fast
        /// level, on its own continuations of the recent requests.
        case distill
        /// Distil from context: the user's recent texts in the teacher's
        /// context, questions the model writes about them (see `Memory.Sleep`).
        case sleep
        /// Write the fast level's units into the slower level's least-used
        /// units in closed form (`LevelLearner.transplant`), then `steps`
        /// steps of `distill` correct what the write changed.
        case transplant
    }

    /// Seconds without learning after which a user with unconsolidated tokens is consolidated (0: never).
    public var idleSeconds = 900.0
    /// Consolidate when the fast level's norm (Drift.norms over its layers) reaches this (0: never).
    public var fastNorm = 0.0
    /// Consolidate after this many learnable tokens since the last consolidation (0: never).
    public var everyTokens = 0
    /// `transplant` by default: in `continuum bench learn` it keeps what the
    /// fast level recalled (6/20 on the first fact set, as awake) where
    /// `distill` kept 3/20 after 80 steps (BENCHMARKS.md).
    public var method = Method.transplant
    /// Distillation steps per consolidation (`distill`: 16 by default, at
    /// least 1; `transplant`: 0 by default, steps after the write); the
    /// operator's budget, not bounded by `max_consolidation_steps` (which caps
    /// what an on-demand request may ask for). On-demand requests default to it.
    public var steps = 0
    /// Tokens the teacher generates after each recent context for the
    /// distillation and the KL it reports (`distill`: 32 by default;
    /// `transplant`: 0, the recent contexts themselves).
    public var generatedTokens = 0

    /// The default steps and generated tokens of a method.
    public static func defaultBudget(_ method: Method) -> ConsolidationBudget {
        method == .transplant ? ConsolidationBudget(steps: 0, generatedTokens: 0) : ConsolidationBudget(steps: 16, generatedTokens: 32)
    }

    /// The fewest steps a method's consolidation may take.
    public static func minimumSteps(_ method: Method) -> Int { method == .transplant ? 0 : 1 }
    /// How `sleep` makes its data and its teacher.
    public var sleep = SleepConfiguration()
    /// Seconds between two looks for idle users by each replica's first learning worker.
    public var sweepSeconds = 15.0

    enum CodingKeys: String, CodingKey, CaseIterable {
        case idleSeconds = "idle_seconds", fastNorm = "fast_norm", everyTokens = "every_tokens", method, steps
        case generatedTokens = "generated_tokens", sleep, sweepSeconds = "sweep_seconds"
    }

    public init() {}

    public init(from decoder: Decoder) throws {
        try checkKnownKeys(decoder, CodingKeys.self, in: "consolidation")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = ConsolidationConfiguration()
        idleSeconds = try c.decodeIfPresent(Double.self, forKey: .idleSeconds) ?? d.idleSeconds
        fastNorm = try c.decodeIfPresent(Double.self, forKey: .fastNorm) ?? d.fastNorm
        everyTokens = try c.decodeIfPresent(Int.self, forKey: .everyTokens) ?? d.everyTokens
        method = try c.decodeIfPresent(Method.self, forKey: .method) ?? d.method
        let budget = Self.defaultBudget(method)
        steps = try c.decodeIfPresent(Int.self, forKey: .steps) ?? budget.steps
        generatedTokens = try c.decodeIfPresent(Int.self, forKey: .generatedTokens) ?? budget.generatedTokens
        sleep = try c.decodeIfPresent(SleepConfiguration.self, forKey: .sleep) ?? d.sleep
        sweepSeconds = try c.decodeIfPresent(Double.self, forKey: .sweepSeconds) ?? d.sweepSeconds
        try validate()
    }

    public func validate() throws {
        func fail(_ m: String) throws -> Never {
            throw ServiceConfiguration.Invalid(description: "invalid service configuration: consolidation." + m)
        }
        if !(idleSeconds >= 0 && idleSeconds <= 86400 * 30) { try fail("idle_seconds must be in [0, 2592000] (0: never)") }
        if !(fastNorm >= 0 && fastNorm.isFinite) { try fail("fast_norm must be a finite number at least 0 (0: never)") }
        if everyTokens < 0 { try fail("every_tokens must be at least 0 (0: never)") }
        let least = Self.minimumSteps(method)
        if !(least...1000).contains(steps) { try fail("steps must be in \(least)...1000 for method \(method.rawValue)") }
        if !(0...256).contains(generatedTokens) { try fail("generated_tokens must be in 0...256") }
        if !(sweepSeconds >= 0.01 && sweepSeconds <= 3600) { try fail("sweep_seconds must be in [0.01, 3600]") }
        do { try sleep.validate() } catch let e as LevelConfiguration.Invalid { try fail(e.description) }
    }

    /// The budget of one consolidation (`distill`, `transplant`).
    public var budget: ConsolidationBudget { ConsolidationBudget(steps: steps, generatedTokens: generatedTokens) }
}

/// How long the database keeps finished records (days; 0 keeps them
/// forever), and how often each replica prunes them.
public struct RetentionConfiguration: Codable, Sendable, Equatable {
    /// Learning jobs that are done, failed or cancelled (with their token arrays).
    public var finishedJobsDays = 7.0
    /// Generations (feedback needs them: feedback on a pruned one answers 404) and the feedback on them.
    public var generationsDays = 30.0
    /// Drift reports, except each user's newest and those of versions still kept.
    public var driftReportsDays = 90.0
    /// Audit events, erasure tombstones included.
    public var auditEventsDays = 365.0
    /// Seconds between two pruning passes of a replica.
    public var intervalSeconds = 3600.0

    enum CodingKeys: String, CodingKey, CaseIterable {
        case finishedJobsDays = "finished_jobs_days", generationsDays = "generations_days"
        case driftReportsDays = "drift_reports_days", auditEventsDays = "audit_events_days", intervalSeconds = "interval_seconds"
    }

    public init() {}

    public init(from decoder: Decoder) throws {
        try checkKnownKeys(decoder, CodingKeys.self, in: "retention")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = RetentionConfiguration()
        finishedJobsDays = try c.decodeIfPresent(Double.self, forKey: .finishedJobsDays) ?? d.finishedJobsDays
        generationsDays = try c.decodeIfPresent(Double.self, forKey: .generationsDays) ?? d.generationsDays
        driftReportsDays = try c.decodeIfPresent(Double.self, forKey: .driftReportsDays) ?? d.driftReportsDays
        auditEventsDays = try c.decodeIfPresent(Double.self, forKey: .auditEventsDays) ?? d.auditEventsDays
        intervalSeconds = try c.decodeIfPresent(Double.self, forKey: .intervalSeconds) ?? d.intervalSeconds
        try validate()
    }

    public func validate() throws {
        for (name, v) in [("finished_jobs_days", finishedJobsDays), ("generations_days", generationsDays),
                          ("drift_reports_days", driftReportsDays), ("audit_events_days", auditEventsDays)]
            where !(v >= 0 && v <= 36500) {
            throw ServiceConfiguration.Invalid(description: "invalid service configuration: retention.\(name) must be in [0, 36500] (0: forever)")
        }
        guard intervalSeconds >= 1 && intervalSeconds <= 86400 * 7 else {
            throw ServiceConfiguration.Invalid(description: "invalid service configuration: retention.interval_seconds must be in [1, 604800]")
        }
    }

    /// The store's retention (seconds; nil: forever).
    public var store: Retention {
        func seconds(_ days: Double) -> Double? { days > 0 ? days * 86400 : nil }
        return Retention(finishedJobs: seconds(finishedJobsDays), generations: seconds(generationsDays),
                         driftReports: seconds(driftReportsDays), auditEvents: seconds(auditEventsDays))
    }
}

/// Refuses keys a configuration does not know (a misspelt setting is an error, not a default).
func checkKnownKeys<K: CodingKey & CaseIterable>(_ decoder: Decoder, _ keys: K.Type, in what: String) throws {
    let known = Set(K.allCases.map(\.stringValue))
    let unknown = try decoder.container(keyedBy: AnyKey.self).allKeys.map(\.stringValue).filter { !known.contains($0) }
    guard unknown.isEmpty else {
        throw ServiceConfiguration.Invalid(description: "invalid service configuration: unknown \(what) key(s) \(unknown.sorted().joined(separator: ", "))")
    }
}

/// Any key of a JSON object, for listing the keys a decoder was given.
struct AnyKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}
