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

    enum CodingKeys: String, CodingKey {
        case host, port
        case maxBodyBytes = "max_body_bytes", maxPromptTokens = "max_prompt_tokens", maxTokens = "max_tokens"
        case maxBatch = "max_batch", maxQueued = "max_queued", modelName = "model_name"
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
        maxPromptTokens = try c.decodeIfPresent(Int.self, forKey: .maxPromptTokens) ?? d.maxPromptTokens
        maxTokens = try c.decodeIfPresent(Int.self, forKey: .maxTokens) ?? d.maxTokens
        maxBatch = try c.decodeIfPresent(Int.self, forKey: .maxBatch) ?? d.maxBatch
        maxQueued = try c.decodeIfPresent(Int.self, forKey: .maxQueued) ?? d.maxQueued
        modelName = try c.decodeIfPresent(String.self, forKey: .modelName) ?? d.modelName
        try validate()
    }

    public func validate() throws {
        func fail(_ m: String) throws -> Never { throw Invalid(description: "invalid service configuration: " + m) }
        if !(0...65535).contains(port) { try fail("port must be in 0...65535, got \(port)") }
        if maxBodyBytes < 1024 { try fail("max_body_bytes must be at least 1024") }
        if maxPromptTokens < 1 { try fail("max_prompt_tokens must be at least 1") }
        if maxTokens < 1 { try fail("max_tokens must be at least 1") }
        if maxBatch < 1 { try fail("max_batch must be at least 1") }
        if maxQueued < maxBatch { try fail("max_queued must be at least max_batch") }
        if modelName.isEmpty { try fail("model_name must not be empty") }
    }
}
