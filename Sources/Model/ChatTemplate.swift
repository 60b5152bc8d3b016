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
        var s = ""
        if let sys = defaultSystemPrompt, messages.first?.role != "system" {
            s += "<|im_start|>system\n\(sys)<|im_end|>\n"
        }
        for m in messages { s += "<|im_start|>\(m.role)\n\(m.content)<|im_end|>\n" }
        if addGenerationPrompt { s += "<|im_start|>assistant\n" }
        return s
    }
}
