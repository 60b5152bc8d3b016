// ServiceConfiguration: the server's settings, with defaults, validated.
import Foundation

/// How the HTTP service runs. Decodes from JSON with defaults for every key.
public struct ServiceConfiguration: Codable, Sendable, Equatable {
    /// Address to listen on.
    public var host = "127.0.0.1"
    /// Port (0: any free port; the bound port is reported when the server starts).
    public var port = 8080
    /// Largest request body in bytes (413 beyond it).
    public var maxBodyBytes = 1 << 20
    /// Largest state file a memory import takes (413 beyond it).
    public var maxImportBytes = 256 << 20
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
    /// Learning workers in this process (each applies one user's jobs at a time).
    public var learningWorkers = 1
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
    /// Tokens of the user's recent text the personalisation metric scores.
    public var auditPersonalTokens = 128
    /// Tokens of the shipped reference text the forgetting metric scores.
    public var auditReferenceTokens = 256

    enum CodingKeys: String, CodingKey {
        case host, port, maxImportBytes = "max_import_bytes"
        case maxBodyBytes = "max_body_bytes", maxPromptTokens = "max_prompt_tokens", maxTokens = "max_tokens"
        case maxBatch = "max_batch", maxQueued = "max_queued", modelName = "model_name"
        case learningWorkers = "learning_workers", learningBatch = "learning_batch", versionsKept = "versions_kept"
        case cacheBytes = "cache_bytes", learningWaitSeconds = "learning_wait_seconds"
        case audit, auditIntervalSeconds = "audit_interval_seconds", auditPersonalTokens = "audit_personal_tokens"
        case auditReferenceTokens = "audit_reference_tokens"
    }

    public struct Invalid: Error, CustomStringConvertible {
        public let description: String
    }

    public init() {}

    public init(from decoder: Decoder) throws {
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
        learningBatch = try c.decodeIfPresent(Int.self, forKey: .learningBatch) ?? d.learningBatch
        versionsKept = try c.decodeIfPresent(Int.self, forKey: .versionsKept) ?? d.versionsKept
        cacheBytes = try c.decodeIfPresent(Int.self, forKey: .cacheBytes) ?? d.cacheBytes
        learningWaitSeconds = try c.decodeIfPresent(Double.self, forKey: .learningWaitSeconds) ?? d.learningWaitSeconds
        audit = try c.decodeIfPresent(Bool.self, forKey: .audit) ?? d.audit
        auditIntervalSeconds = try c.decodeIfPresent(Double.self, forKey: .auditIntervalSeconds) ?? d.auditIntervalSeconds
        auditPersonalTokens = try c.decodeIfPresent(Int.self, forKey: .auditPersonalTokens) ?? d.auditPersonalTokens
        auditReferenceTokens = try c.decodeIfPresent(Int.self, forKey: .auditReferenceTokens) ?? d.auditReferenceTokens
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
        if learningBatch < 1 { try fail("learning_batch must be at least 1") }
        if versionsKept < 1 { try fail("versions_kept must be at least 1") }
        if cacheBytes < 0 { try fail("cache_bytes must be at least 0") }
        if !(learningWaitSeconds > 0) { try fail("learning_wait_seconds must be positive") }
        if !(auditIntervalSeconds >= 0) { try fail("audit_interval_seconds must be at least 0") }
        if auditPersonalTokens < 2 { try fail("audit_personal_tokens must be at least 2") }
        if auditReferenceTokens < 2 { try fail("audit_reference_tokens must be at least 2") }
    }
}
