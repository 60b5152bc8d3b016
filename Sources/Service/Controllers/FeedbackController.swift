// POST /v1/feedback: a rating of a generation, and what it teaches. A
// positive rating learns the generated answer as the answer to its prompt,
// a correction (with either rating) learns the correction instead, a
// negative rating alone learns nothing. The feedback and its learning job
// are committed together.
import Foundation
import Model
import Store

struct FeedbackController {
    let configuration: ServiceConfiguration
    let tokenizer: Tokenizer
    /// The most bytes one token decodes to: text of more bytes than this times a cap has more tokens than the cap.
    let maxTokenBytes: Int
    let users: any MemoryStore
    let queue: any LearningQueue
    let metrics: Metrics
    let learning: LearningStatus

    func create(_ input: Operations.CreateFeedback.Input) async throws -> Operations.CreateFeedback.Output {
        let principal = try RequestScope.principal()
        guard case .json(let body) = input.body else { throw APIError.invalid("expected a JSON body") }
        guard let uuid = Self.generationUUID(body.generationId),
              let generation = try await queue.generation(id: uuid, tenantID: principal.tenantID) else {
            throw APIError.notFound("no generation '\(body.generationId)' in this tenant")
        }
        let answer = try correction(body.correction).map { $0 }
        var job: LearningRequest?
        if try await users.user(id: generation.userID, tenantID: principal.tenantID)?.learns ?? false {
            let prompt = generation.promptTokens
            let taught = answer ?? (body.rating == .positive && !generation.completionTokens.isEmpty ? generation.completionTokens : nil)
            if let taught {
                job = LearningRequest(tokens: prompt + taught, learnable: prompt.map { _ in false } + taught.map { _ in true })
            }
        }
        let (id, jobID) = try await queue.recordFeedback(generation: generation, rating: body.rating.rawValue,
                                                         correction: body.correction, job: job, actor: principal.actor)
        if jobID != nil { metrics.jobsEnqueued.increment() }
        let learning = try await learning.state(job: jobID, wait: body.waitForLearning ?? false)
        return .ok(.init(body: .json(.init(id: "fb-" + id.uuidString.lowercased(), generationId: body.generationId,
                                           learning: learning))))
    }

    /// A correction's tokens: not empty, no NUL, at most max_correction_tokens (413), refused
    /// before it is tokenized when its bytes alone prove it too long.
    func correction(_ text: String?) throws -> [Int]? {
        guard let c = text else { return nil }
        guard !c.isEmpty else { throw APIError.invalid("correction must not be empty", param: "correction") }
        guard !c.unicodeScalars.contains("\u{0}") else {
            throw APIError.invalid("correction must not contain NUL characters", param: "correction")
        }
        let limit = configuration.maxCorrectionTokens
        let tokens = c.utf8.count <= maxTokenBytes * limit ? tokenizer.encode(c) : nil
        guard let tokens, tokens.count <= limit else {
            throw APIError.tooLarge("the correction exceeds max_correction_tokens (\(limit))", param: "correction")
        }
        return tokens
    }

    /// The generation's UUID from any id a generation endpoint returns.
    static func generationUUID(_ id: String) -> UUID? {
        for prefix in ["gen-", "cmpl-", "chatcmpl-"] where id.hasPrefix(prefix) {
            return UUID(uuidString: String(id.dropFirst(prefix.count)))
        }
        return UUID(uuidString: id)
    }
}
