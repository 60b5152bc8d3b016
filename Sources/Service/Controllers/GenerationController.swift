// The generation endpoints: /v1/generate and the OpenAI-compatible
// /v1/completions and /v1/chat/completions. Each answers JSON, or server-sent
// events when the request's `stream` is true (whatever the Accept header
// says, as OpenAI clients expect), with the schema types generated from
// openapi.yaml (each event written by StreamEvent, Streaming.swift). What
// goes wrong is thrown as it comes and mapped to HTTP in APIError.from,
// also when it ends a started stream. A request with a user runs with that user's current memory
// version; once generated, the generation and (unless learning is off) its
// learning job are committed before the response's last bytes are sent.
import Foundation
import Hummingbird
import Memory
import Model
import Store

struct GenerationController {
    let configuration: ServiceConfiguration
    let model: LlamaModel
    let users: any MemoryStore
    let queue: any LearningQueue
    let engine: BatchEngine
    let memory: UserMemory
    let metrics: Metrics
    let learning: LearningStatus

    func register(on router: Router<AppContext>) {
        router.post("/v1/generate") { request, context in try await generate(request, context) }
        router.post("/v1/completions") { request, context in try await completion(request, context) }
        router.post("/v1/chat/completions") { request, context in try await chatCompletion(request, context) }
    }

    // MARK: Request handling shared by the endpoints

    /// The JSON body, decoded (the pipeline has read it, within max_body_bytes; DecodingError → 400 in APIError.from).
    func decode<T: Decodable>(_ type: T.Type, _ request: Request) async throws -> T {
        try JSONDecoder().decode(T.self, from: Data(buffer: try await request.body.collect(upTo: configuration.maxBodyBytes)))
    }

    /// Most bytes of one stop string.
    static let maxStopBytes = 256

    /// Sampling parameters from a request, checked against the server's limits.
    func sampling(_ s: Components.Schemas.Sampling) throws -> SamplingParameters {
        var p = SamplingParameters()
        if let v = s.maxTokens {
            guard v <= configuration.maxTokens else {
                throw APIError.invalid("max_tokens must be at most \(configuration.maxTokens), got \(v)", param: "max_tokens")
            }
            p.maxTokens = v
        }
        if let v = s.maxTokens, v < 1 { throw APIError.invalid("max_tokens must be at least 1, got \(v)", param: "max_tokens") }
        if let v = s.temperature, !(0...2).contains(v) {
            throw APIError.invalid("temperature must be in [0, 2], got \(v)", param: "temperature")
        }
        if let v = s.stop, v.count > 4 { throw APIError.invalid("stop takes at most 4 strings, got \(v.count)", param: "stop") }
        if let v = s.stop, v.contains(where: { $0.isEmpty || $0.utf8.count > Self.maxStopBytes }) {
            throw APIError.invalid("each stop string must have 1 to \(Self.maxStopBytes) bytes", param: "stop")
        }
        if let v = s.temperature { p.temperature = Float(v) }
        if let v = s.topP { p.topP = Float(v) }
        if let v = s.topK { p.topK = v }
        if let v = s.minP { p.minP = Float(v) }
        if let v = s.repetitionPenalty { p.repetitionPenalty = Float(v) }
        if let v = s.seed { p.seed = UInt64(bitPattern: v) }
        if let v = s.stop { p.stop = v }
        try p.validate()   // SamplingParameters.Invalid → 400 naming the parameter, in APIError.from
        return p
    }

    /// A prompt's tokens and which of them are the user's own text (learnable).
    struct Prompt: Sendable {
        let tokens: [Int]
        let learnable: [Bool]
    }

    /// A prompt given as text: all of it is the user's.
    func prompt(_ text: String) throws -> Prompt {
        let ids = try checked(model.tokenizer.encode(text))
        return Prompt(tokens: ids, learnable: ids.map { _ in true })
    }

    /// Chat messages rendered with the model's template; the learnable tokens
    /// are the content of the user's messages (not the template's markup, the
    /// system prompt or earlier assistant turns).
    func prompt(_ messages: [Components.Schemas.ChatMessage]) throws -> Prompt {
        guard !messages.isEmpty else { throw APIError.invalid("messages must not be empty", param: "messages") }
        let chat = model.chatTemplate.encode(messages.map { ChatMessage(role: $0.role.rawValue, content: $0.content) },
                                             tokenizer: model.tokenizer)
        return Prompt(tokens: try checked(chat.tokens), learnable: chat.userTokens)
    }

    /// The prompt's tokens, within the server's limit.
    func checked(_ ids: [Int]) throws -> [Int] {
        guard !ids.isEmpty else { throw APIError.invalid("the prompt is empty", param: "prompt") }
        let limit = min(configuration.maxPromptTokens, model.configuration.maxPositionEmbeddings - 1)
        guard ids.count <= limit else {
            throw APIError.tooLarge("the prompt has \(ids.count) tokens; the limit is \(limit)", param: "prompt")
        }
        return ids
    }

    /// Whose memory a request runs with: the user (nil for a user-less
    /// OpenAI request: the backbone, nothing learned or recorded) at their
    /// current version, and that version's levels (nil: none stored).
    struct Target: @unchecked Sendable {
        let principal: Principal
        let user: User?
        let adapter: LevelState?
        var version: Int64 { user?.version ?? 0 }
    }

    func target(_ text: String?, _ principal: Principal) async throws -> Target {
        guard let text else { return Target(principal: principal, user: nil, adapter: nil) }
        let name = try UserName(text)   // UserName.Invalid → 400, param user, in APIError.from
        for _ in 0..<5 {
            guard let user = try await users.user(tenantID: principal.tenantID, name: name, create: true) else { break }
            do {
                return Target(principal: principal, user: user, adapter: try await memory.adapter(for: user))
            } catch is UserMemory.VersionMoved {
                continue   // a learning round committed between the two reads
            }
        }
        throw APIError(.serviceUnavailable, type: "server_error", message: "the user's memory is changing too fast; retry",
                       code: "memory_busy")
    }

    func submit(_ prompt: Prompt, _ parameters: SamplingParameters, _ target: Target) throws
        -> AsyncThrowingStream<GenerationEvent, Error> {
        try engine.submit(prompt: prompt.tokens, parameters: parameters, adapter: target.adapter)   // Overloaded → 429
    }

    /// After a generation: counts its tokens, records it for a user with its
    /// learning job (one transaction), and waits for the job when asked.
    func finish(_ result: GenerationResult, id: UUID, target: Target, prompt: Prompt, learn: Bool, wait: Bool) async throws
        -> Components.Schemas.Learning {
        metrics.promptTokens.increment(by: result.promptTokens)
        metrics.completionTokens.increment(by: result.tokens.count)
        guard let user = target.user else { return .init(state: .off) }
        let job = learn && user.learns && LearnableTokens.count(prompt.learnable) > 0
            ? LearningRequest(tokens: prompt.tokens, learnable: prompt.learnable) : nil
        let jobID = try await queue.recordGeneration(id: id, userID: user.id, memoryVersion: user.version,
                                                              prompt: prompt.tokens, completion: result.tokens,
                                                              job: job, actor: target.principal.actor)
        if jobID != nil { metrics.jobsEnqueued.increment() }
        return try await learning.state(job: jobID, wait: wait)
    }

    /// Waits for the whole generation.
    func collect(_ stream: AsyncThrowingStream<GenerationEvent, Error>) async throws -> GenerationResult {
        for try await event in stream {
            if case .finished(let result) = event { return result }
        }
        throw CancellationError()
    }

    static func usage(_ r: GenerationResult) -> Components.Schemas.Usage {
        .init(promptTokens: r.promptTokens, completionTokens: r.tokens.count, totalTokens: r.promptTokens + r.tokens.count)
    }

    // MARK: /v1/generate

    func generate(_ request: Request, _ context: AppContext) async throws -> Response {
        let principal = try RequestScope.principal()
        let body = try await decode(Components.Schemas.GenerateRequest.self, request)
        let r = body.value2
        let prompt: Prompt
        switch (r.prompt, r.messages) {
        case (let p?, nil): prompt = try self.prompt(p)
        case (nil, let m?): prompt = try self.prompt(m)
        default: throw APIError.invalid("give exactly one of prompt and messages", param: "prompt")
        }
        let parameters = try sampling(body.value1)
        let target = try await target(r.user, principal)
        let stream = try submit(prompt, parameters, target)
        let uuid = UUID(), id = "gen-" + uuid.uuidString.lowercased()
        let user = r.user, learn = r.learn ?? true, wait = r.waitForLearning ?? false
        let response: @Sendable (GenerationResult) async throws -> Components.Schemas.GenerateResponse = { result in
            let learning = try await finish(result, id: uuid, target: target, prompt: prompt, learn: learn, wait: wait)
            return .init(id: id, user: user, text: result.text,
                         finishReason: result.finishReason == .stop ? .stop : .length,
                         usage: Self.usage(result), memoryVersion: target.version, learning: learning)
        }
        guard r.stream == true else { return try JSONReply.response(try await response(try await collect(stream))) }
        return eventStream(context) { writer in
            for try await event in stream {
                switch event {
                case .token(let t) where !t.text.isEmpty:
                    try await writer.send(StreamEvent(event: "token", Components.Schemas.GenerateToken(text: t.text)))
                case .token:
                    break
                case .finished(let result):
                    let done: StreamEvent
                    do {
                        let reply = try await response(result)
                        done = try StreamEvent(event: "done", reply)
                    } catch {
                        done = try Self.errorEvent(error, context, event: "error")
                    }
                    try await writer.send(done)
                }
            }
        }
    }

    /// An error as a stream event, once the response has started (logged when it is the server's).
    static func errorEvent(_ error: any Error, _ context: AppContext, event: String?) throws -> StreamEvent {
        try StreamEvent(event: event, APIError.reported(error, logger: context.logger, route: context.endpointPath).body)
    }

    // MARK: OpenAI-compatible

    func checkModel(_ name: String) throws {
        guard name == configuration.modelName else {
            throw APIError(.notFound, type: "invalid_request_error",
                           message: "the model '\(name)' does not exist; this server serves '\(configuration.modelName)'",
                           param: "model", code: "model_not_found")
        }
    }

    /// What the OpenAI-compatible endpoints share: the generation started
    /// with the request's user's memory, its id, and the step that records it
    /// (and its learning job) once it has finished.
    func start(_ prompt: Prompt, _ s: Components.Schemas.Sampling, _ principal: Principal, user: String?, learn: Bool?,
               wait: Bool?, idPrefix: String) async throws
        -> (AsyncThrowingStream<GenerationEvent, Error>, String, @Sendable (GenerationResult) async throws -> Void) {
        let parameters = try sampling(s)
        let target = try await target(user, principal)
        let stream = try submit(prompt, parameters, target)
        let uuid = UUID(), learn = learn ?? true, wait = wait ?? false
        return (stream, idPrefix + uuid.uuidString.lowercased(), { result in
            _ = try await finish(result, id: uuid, target: target, prompt: prompt, learn: learn, wait: wait)
        })
    }

    func completion(_ request: Request, _ context: AppContext) async throws -> Response {
        let principal = try RequestScope.principal()
        let body = try await decode(Components.Schemas.CompletionRequest.self, request)
        let r = body.value2
        try checkModel(r.model)
        let (stream, id, finished) = try await start(try prompt(r.prompt), body.value1, principal, user: r.user, learn: r.learn,
                                                     wait: r.waitForLearning, idPrefix: "cmpl-")
        let created = Int64(Date().timeIntervalSince1970), model = r.model
        guard r.stream == true else {
            let result = try await collect(stream)
            try await finished(result)
            return try JSONReply.response(Components.Schemas.Completion(
                id: id, object: .textCompletion, created: created, model: model,
                choices: [.init(index: 0, text: result.text, finishReason: result.finishReason == .stop ? .stop : .length)],
                usage: Self.usage(result)))
        }
        return openAIStream(context, stream, id: id, created: created, model: model, kind: .text,
                                 includeUsage: r.streamOptions?.includeUsage == true, finished: finished)
    }

    func chatCompletion(_ request: Request, _ context: AppContext) async throws -> Response {
        let principal = try RequestScope.principal()
        let body = try await decode(Components.Schemas.ChatCompletionRequest.self, request)
        let r = body.value2
        try checkModel(r.model)
        let (stream, id, finished) = try await start(try prompt(r.messages), body.value1, principal, user: r.user, learn: r.learn,
                                                     wait: r.waitForLearning, idPrefix: "chatcmpl-")
        let created = Int64(Date().timeIntervalSince1970), model = r.model
        guard r.stream == true else {
            let result = try await collect(stream)
            try await finished(result)
            return try JSONReply.response(Components.Schemas.ChatCompletion(
                id: id, object: .chat_completion, created: created, model: model,
                choices: [.init(index: 0, message: .init(role: .assistant, content: result.text),
                                finishReason: result.finishReason == .stop ? .stop : .length)],
                usage: Self.usage(result)))
        }
        return openAIStream(context, stream, id: id, created: created, model: model, kind: .chat,
                                 includeUsage: r.streamOptions?.includeUsage == true, finished: finished)
    }

    /// Which OpenAI stream: text completion chunks or chat completion chunks.
    enum StreamKind: Sendable { case text, chat }

    /// What one chunk of an OpenAI stream carries.
    enum ChunkContent {
        /// Chat only: the assistant's role, with empty content.
        case opening
        case text(String)
        /// Empty text (delta) and the finish reason.
        case closing(FinishReason)
        /// No choices, the usage.
        case usage(GenerationResult)
    }

    /// The event of one chunk of a stream of `kind` (a CompletionChunk or a ChatCompletionChunk).
    static func chunk(_ content: ChunkContent, kind: StreamKind, id: String, created: Int64, model: String) throws -> StreamEvent {
        var usage: Components.Schemas.Usage?
        if case .usage(let result) = content { usage = Self.usage(result) }
        typealias TextChoice = Components.Schemas.CompletionChunkChoice
        typealias ChatChoice = Components.Schemas.ChatCompletionChunkChoice
        switch kind {
        case .text:
            let choices: [TextChoice]
            switch content {
            case .opening, .usage: choices = []
            case .text(let text): choices = [TextChoice(index: 0, text: text, finishReason: nil)]
            case .closing(let reason): choices = [TextChoice(index: 0, text: "", finishReason: reason == .stop ? .stop : .length)]
            }
            return try StreamEvent(Components.Schemas.CompletionChunk(id: id, object: .textCompletion, created: created, model: model,
                                                                          choices: choices, usage: usage))
        case .chat:
            let choices: [ChatChoice]
            switch content {
            case .opening: choices = [ChatChoice(index: 0, delta: .init(role: .assistant, content: ""), finishReason: nil)]
            case .text(let text): choices = [ChatChoice(index: 0, delta: .init(content: text), finishReason: nil)]
            case .closing(let reason): choices = [ChatChoice(index: 0, delta: .init(), finishReason: reason == .stop ? .stop : .length)]
            case .usage: choices = []
            }
            return try StreamEvent(Components.Schemas.ChatCompletionChunk(id: id, object: .chat_completion_chunk, created: created,
                                                                              model: model, choices: choices, usage: usage))
        }
    }

    /// An OpenAI stream: (chat: an opening chunk with the role), a chunk per
    /// piece of text, then, once `finished` has recorded the generation, the
    /// closing chunk with finish_reason, the usage chunk when asked, and
    /// `data: [DONE]`. A failure to record ends the stream with an error object.
    func openAIStream(_ context: AppContext, _ stream: AsyncThrowingStream<GenerationEvent, Error>, id: String, created: Int64,
                      model: String, kind: StreamKind, includeUsage: Bool,
                      finished: @escaping @Sendable (GenerationResult) async throws -> Void) -> Response {
        @Sendable func chunk(_ content: ChunkContent) throws -> StreamEvent {
            try Self.chunk(content, kind: kind, id: id, created: created, model: model)
        }
        return eventStream(context) { writer in
            if kind == .chat { try await writer.send(chunk(.opening)) }
            for try await event in stream {
                switch event {
                case .token(let t) where !t.text.isEmpty:
                    try await writer.send(chunk(.text(t.text)))
                case .token:
                    break
                case .finished(let result):
                    do { try await finished(result) } catch {
                        try await writer.send(Self.errorEvent(error, context, event: nil))
                        return
                    }
                    try await writer.send(chunk(.closing(result.finishReason)))
                    if includeUsage { try await writer.send(chunk(.usage(result))) }
                }
            }
            try await writer.send(.done)
        }
    }
}
