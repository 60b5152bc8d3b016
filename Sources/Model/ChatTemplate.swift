// ChatTemplate: renders chat messages into the prompt text the model was
// trained on. Continuum implements ChatML (SmolLM2, Qwen, …) natively rather
// than running Jinja: the template string is recognised, not interpreted.
import Foundation

/// One chat message.
public struct ChatMessage: Codable, Sendable, Equatable {
    public var role: String
    public var content: String

    public init(role: String, content: String) {
        self.role = role
        self.content = content
    }
}

/// A recognised chat format.
public struct ChatTemplate: Sendable, Equatable {
    /// System message inserted when the conversation has none (the model's
    /// template defines it; nil for none).
    public var defaultSystemPrompt: String?

    public init(defaultSystemPrompt: String?) {
        self.defaultSystemPrompt = defaultSystemPrompt
    }

    /// Recognises a Jinja chat template. Returns nil when the template is not
    /// ChatML; a nil template means plain ChatML.
    public init?(jinja: String?) {
        guard let jinja else {
            defaultSystemPrompt = nil
            return
        }
        guard jinja.contains("<|im_start|>") && jinja.contains("<|im_end|>") else { return nil }
        // A literal default system turn: '<|im_start|>system\n…<|im_end|>'.
        let marker = "<|im_start|>system"
        if let start = jinja.range(of: marker + "\\n") ?? jinja.range(of: marker + "\n"),
           let end = jinja.range(of: "<|im_end|>", range: start.upperBound..<jinja.endIndex) {
            let body = String(jinja[start.upperBound..<end.lowerBound])
            defaultSystemPrompt = body.contains("{{") || body.contains("{%") ? nil : body.replacingOccurrences(of: "\\n", with: "\n")
        } else {
            defaultSystemPrompt = nil
        }
    }

    /// The prompt text for `messages`, ending with the assistant's turn
    /// opener when `addGenerationPrompt` is true.
    public func render(_ messages: [ChatMessage], addGenerationPrompt: Bool = true) -> String {
        pieces(messages, addGenerationPrompt: addGenerationPrompt).map(\.text).joined()
    }

    /// A chat's tokens, and which of them are the users' own words.
    public struct Tokens: Sendable, Equatable {
        public let tokens: [Int]
        /// True for the tokens of a user message's content; false for the
        /// template's markup, system prompts and assistant turns.
        public let userTokens: [Bool]
    }

    /// `render`'s text as tokens: the markup tokenized with its special
    /// tokens, each message's content on its own and as plain text (so a
    /// content cannot forge markup such as `<|im_end|>`, and its tokens are
    /// known exactly). This is how the server and the benchmarks turn chats
    /// into prompts and learnable tokens (the user's words).
    public func encode(_ messages: [ChatMessage], tokenizer: Tokenizer, addGenerationPrompt: Bool = true) -> Tokens {
        var tokens: [Int] = [], user: [Bool] = []
        for piece in pieces(messages, addGenerationPrompt: addGenerationPrompt) {
            let ids = tokenizer.encode(piece.text, parseSpecial: piece.content == nil)
            tokens += ids
            user += ids.map { _ in piece.content == "user" }
        }
        return Tokens(tokens: tokens, userTokens: user)
    }

    /// The contents of the `role` messages in a chat's tokens as `encode`
    /// makes them (each content's own tokens, found between the markup that
    /// opens a `role` turn and the next `<|im_end|>`). Empty when `tokens`
    /// hold no such turn (e.g. raw text).
    public func contents(of tokens: [Int], role: String = "user", tokenizer: Tokenizer) -> [[Int]] {
        let open = tokenizer.encode("<|im_start|>\(role)\n", parseSpecial: true)
        let close = tokenizer.encode("<|im_end|>", parseSpecial: true)
        guard !open.isEmpty, close.count == 1 else { return [] }
        var out: [[Int]] = [], i = 0
        while i + open.count <= tokens.count {
            if Array(tokens[i..<(i + open.count)]) == open {
                let start = i + open.count
                let end = tokens[start...].firstIndex(of: close[0]) ?? tokens.count
                if end > start { out.append(Array(tokens[start..<end])) }
                i = end
            } else {
                i += 1
            }
        }
        return out
    }

    /// The rendered text in order: markup (`content` nil) and message contents (`content`: the message's role).
    private func pieces(_ messages: [ChatMessage], addGenerationPrompt: Bool) -> [(text: String, content: String?)] {
        var out: [(String, String?)] = []
        if let sys = defaultSystemPrompt, messages.first?.role != "system" {
            out.append(("<|im_start|>system\n\(sys)<|im_end|>\n", nil))
        }
        for m in messages {
            out.append(("<|im_start|>\(m.role)\n", nil))
            out.append((m.content, m.role))
            out.append(("<|im_end|>\n", nil))
        }
        if addGenerationPrompt { out.append(("<|im_start|>assistant\n", nil)) }
        return out
    }
}
