// The generation endpoints: /v1/generate and the OpenAI-compatible
// /v1/completions and /v1/chat/completions. Each answers JSON, or server-sent
// events when the request's `stream` is true (whatever the Accept header
// says, as OpenAI clients expect), with the schema types generated from
// openapi.yaml.
import Foundation
import Hummingbird
import Model

struct GenerationRoutes {
    let state: ServiceState

    func register(on router: Router<AppContext>) {
        router.post("/v1/generate") { request, context in try await generate(request, context) }
        router.post("/v1/completions") { request, context in try await completion(request, context) }
        router.post("/v1/chat/completions") { request, context in try await chatCompletion(request, context) }
    }

    // MARK: Request handling shared by the endpoints

    func decode<T: Decodable>(_ type: T.Type, _ request: Request) async throws -> T {
        var request = request
        let buffer: ByteBuffer
        do {
            buffer = try await request.collectBody(upTo: state.configuration.maxBodyBytes)
        } catch {
            throw APIError.tooLarge("the request body exceeds \(state.configuration.maxBodyBytes) bytes")
        }
        return try JSONDecoder().decode(T.self, from: Data(buffer: buffer))   // DecodingError → 400 in APIError.from
    }

    /// Sampling parameters from a request, checked against the server's limits.
    func sampling(_ s: Components.Schemas.Sampling) throws -> SamplingParameters {
        var p = SamplingParameters()
        if let v = s.maxTokens {
            guard v <= state.configuration.maxTokens else {
                throw APIError.invalid("max_tokens must be at most \(state.configuration.maxTokens), got \(v)", param: "max_tokens")
            }
            p.maxTokens = v
        }
        if let v = s.temperature { p.temperature = Float(v) }
        if let v = s.topP { p.topP = Float(v) }
        if let v = s.topK { p.topK = v }
        if let v = s.minP { p.minP = Float(v) }
        if let v = s.repetitionPenalty { p.repetitionPenalty = Float(v) }
        if let v = s.seed { p.seed = UInt64(bitPattern: v) }
        if let v = s.stop { p.stop = v }
        do { try p.validate() } catch let e as SamplingParameters.Invalid { throw APIError.invalid(e.description, param: e.parameter) }
        return p
    }

    /// The prompt's tokens, within the server's limit.
    func tokens(_ text: String) throws -> [Int] {
        let ids = state.model.tokenizer.encode(text)
        guard !ids.isEmpty else { throw APIError.invalid("the prompt is empty", param: "prompt") }
        let limit = min(state.configuration.maxPromptTokens, state.model.configuration.maxPositionEmbeddings - 1)
        guard ids.count <= limit else {
            throw APIError.tooLarge("the prompt has \(ids.count) tokens; the limit is \(limit)", param: "prompt")
        }
        return ids
    }

    func render(_ messages: [Components.Schemas.ChatMessage]) throws -> String {
        guard !messages.isEmpty else { throw APIError.invalid("messages must not be empty", param: "messages") }
        return state.model.chatTemplate.render(messages.map { ChatMessage(role: $0.role.rawValue, content: $0.content) })
    }

    func submit(_ prompt: [Int], _ parameters: SamplingParameters) throws -> AsyncThrowingStream<GenerationEvent, Error> {
        do {
            return try state.engine.submit(prompt: prompt, parameters: parameters)
        } catch is BatchEngine.Overloaded {
            throw APIError.overloaded
        }
    }

    /// Waits for the whole generation.
    func collect(_ stream: AsyncThrowingStream<GenerationEvent, Error>) async throws -> GenerationResult {
        for try await event in stream {
            if case .finished(let result) = event { return result }
        }
        throw CancellationError()
    }

    static func json(_ value: some Encodable, status: HTTPResponse.Status = .ok) throws -> Response {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return Response(status: status, headers: [.contentType: "application/json"],
                        body: ResponseBody(byteBuffer: ByteBuffer(bytes: try encoder.encode(value))))
    }

    static func jsonObject(_ object: Any) -> String {
        String(decoding: (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])) ?? Data(),
               as: UTF8.self)
    }

    /// A server-sent-events response whose events `produce` writes.
    static func eventStream(_ produce: @escaping @Sendable (inout any ResponseBodyWriter) async throws -> Void) -> Response {
        Response(status: .ok,
                 headers: [.contentType: "text/event-stream", .cacheControl: "no-cache"],
                 body: ResponseBody { writer in
                     try await produce(&writer)
                     try await writer.finish(nil)
                 })
    }

    static func usage(_ r: GenerationResult) -> Components.Schemas.Usage {
        .init(promptTokens: r.promptTokens, completionTokens: r.tokens.count, totalTokens: r.promptTokens + r.tokens.count)
    }

    // MARK: /v1/generate

    func generate(_ request: Request, _ context: AppContext) async throws -> Response {
        _ = try RequestPrincipal.required()
        let body = try await decode(Components.Schemas.GenerateRequest.self, request)
        let r = body.value2
        guard !r.user.isEmpty else { throw APIError.invalid("user must not be empty", param: "user") }
        let text: String
        switch (r.prompt, r.messages) {
        case (let p?, nil): text = p
        case (nil, let m?): text = try render(m)
        default: throw APIError.invalid("give exactly one of prompt and messages", param: "prompt")
        }
        let parameters = try sampling(body.value1)
        let stream = try submit(try tokens(text), parameters)
        let id = "gen-" + UUID().uuidString.lowercased()
        let user = r.user
        let response: @Sendable (GenerationResult) -> Components.Schemas.GenerateResponse = { result in
            .init(id: id, user: user, text: result.text,
                  finishReason: result.finishReason == .stop ? .stop : .length,
                  usage: Self.usage(result), memoryVersion: 0)
        }
        guard r.stream == true else { return try Self.json(response(try await collect(stream))) }
        return Self.eventStream { writer in
            for try await event in stream {
                switch event {
                case .token(let t) where !t.text.isEmpty:
                    try await writer.write(ByteBuffer(string: "event: token\ndata: \(Self.jsonObject(["text": t.text]))\n\n"))
                case .token:
                    break
                case .finished(let result):
                    let data = try JSONEncoder().encode(response(result))
                    try await writer.write(ByteBuffer(string: "event: done\ndata: \(String(decoding: data, as: UTF8.self))\n\n"))
                }
            }
        }
    }

    // MARK: OpenAI-compatible

    func checkModel(_ name: String) throws {
        guard name == state.configuration.modelName else {
            throw APIError(.notFound, type: "invalid_request_error",
                           message: "the model '\(name)' does not exist; this server serves '\(state.configuration.modelName)'",
                           param: "model", code: "model_not_found")
        }
    }

    /// One server-sent event of an OpenAI stream: `data: {id, object, created, model, choices[, usage]}`.
    static func openAIChunk(id: String, object: String, created: Int64, model: String, choices: [[String: Any]],
                            usage: GenerationResult?) -> ByteBuffer {
        var o: [String: Any] = ["id": id, "object": object, "created": created, "model": model, "choices": choices]
        if let u = usage {
            o["usage"] = ["prompt_tokens": u.promptTokens, "completion_tokens": u.tokens.count,
                          "total_tokens": u.promptTokens + u.tokens.count]
        }
        return ByteBuffer(string: "data: \(jsonObject(o))\n\n")
    }

    func completion(_ request: Request, _ context: AppContext) async throws -> Response {
        _ = try RequestPrincipal.required()
        let body = try await decode(Components.Schemas.CompletionRequest.self, request)
        let r = body.value2
        try checkModel(r.model)
        let stream = try submit(try tokens(r.prompt), try sampling(body.value1))
        let id = "cmpl-" + UUID().uuidString.lowercased(), created = Int64(Date().timeIntervalSince1970), model = r.model
        guard r.stream == true else {
            let result = try await collect(stream)
            return try Self.json(Components.Schemas.Completion(
                id: id, object: .textCompletion, created: created, model: model,
                choices: [.init(index: 0, text: result.text, finishReason: result.finishReason == .stop ? .stop : .length)],
                usage: Self.usage(result)))
        }
        let includeUsage = r.streamOptions?.includeUsage == true
        return Self.eventStream { writer in
            func chunk(_ choices: [[String: Any]], usage: GenerationResult? = nil) -> ByteBuffer {
                Self.openAIChunk(id: id, object: "text_completion", created: created, model: model, choices: choices, usage: usage)
            }
            for try await event in stream {
                switch event {
                case .token(let t) where !t.text.isEmpty:
                    try await writer.write(chunk([["index": 0, "text": t.text, "finish_reason": NSNull()]]))
                case .token:
                    break
                case .finished(let result):
                    try await writer.write(chunk([["index": 0, "text": "", "finish_reason": result.finishReason.rawValue]]))
                    if includeUsage { try await writer.write(chunk([], usage: result)) }
                }
            }
            try await writer.write(ByteBuffer(string: "data: [DONE]\n\n"))
        }
    }

    func chatCompletion(_ request: Request, _ context: AppContext) async throws -> Response {
        _ = try RequestPrincipal.required()
        let body = try await decode(Components.Schemas.ChatCompletionRequest.self, request)
        let r = body.value2
        try checkModel(r.model)
        let stream = try submit(try tokens(try render(r.messages)), try sampling(body.value1))
        let id = "chatcmpl-" + UUID().uuidString.lowercased(), created = Int64(Date().timeIntervalSince1970), model = r.model
        guard r.stream == true else {
            let result = try await collect(stream)
            return try Self.json(Components.Schemas.ChatCompletion(
                id: id, object: .chat_completion, created: created, model: model,
                choices: [.init(index: 0, message: .init(role: .assistant, content: result.text),
                                finishReason: result.finishReason == .stop ? .stop : .length)],
                usage: Self.usage(result)))
        }
        let includeUsage = r.streamOptions?.includeUsage == true
        return Self.eventStream { writer in
            func chunk(_ choices: [[String: Any]], usage: GenerationResult? = nil) -> ByteBuffer {
                Self.openAIChunk(id: id, object: "chat.completion.chunk", created: created, model: model, choices: choices, usage: usage)
            }
            try await writer.write(chunk([["index": 0, "delta": ["role": "assistant", "content": ""], "finish_reason": NSNull()]]))
            for try await event in stream {
                switch event {
                case .token(let t) where !t.text.isEmpty:
                    try await writer.write(chunk([["index": 0, "delta": ["content": t.text], "finish_reason": NSNull()]]))
                case .token:
                    break
                case .finished(let result):
                    try await writer.write(chunk([["index": 0, "delta": [String: String](), "finish_reason": result.finishReason.rawValue]]))
                    if includeUsage { try await writer.write(chunk([], usage: result)) }
                }
            }
            try await writer.write(ByteBuffer(string: "data: [DONE]\n\n"))
        }
    }
}
