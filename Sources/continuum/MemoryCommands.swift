// continuum learn / score, and the --state option: a user's memory levels
// from the shell.
import ArgumentParser
import Foundation
import Memory
import Model

/// A level state file for commands that read or write one.
struct StateOptions: ParsableArguments {
    @Option(help: "A level state file (safetensors) holding one user's memory levels.")
    var state: String?

    @Option(help: "Level configuration (JSON) for a new state file (default: mid and fast levels on the upper half of the layers).")
    var levels: String?

    /// The learner stored in `state`, a new one when the file does not exist
    /// (and `create`), or nil when no --state was given.
    func load(model: LlamaModel, create: Bool) throws -> LevelLearner? {
        guard let state else {
            if levels != nil { throw ValidationError("--levels needs --state") }
            return nil
        }
        let configuration = try levels.map { try LevelConfiguration.load(path: $0) }
        if FileManager.default.fileExists(atPath: state) {
            guard let data = FileManager.default.contents(atPath: state) else { throw CLIError("cannot read \(state)") }
            do {
                return try LevelStateFile.decode(data, model: model, expecting: configuration)
            } catch let e as LevelStateFile.Incompatible {
                throw CLIError("\(state): \(e.description)")
            }
        }
        guard create else { throw CLIError("\(state): no such level state file (create one with `continuum learn`)") }
        let config = configuration ?? LevelConfiguration.defaults(layers: model.configuration.numHiddenLayers)
        return try LevelLearner(state: try LevelState(configuration: config, model: model.configuration), model: model)
    }

    /// Writes the learner to `state` atomically (a temporary file, then rename).
    func save(_ learner: LevelLearner, model: LlamaModel) throws {
        guard let state else { return }
        let data = try LevelStateFile.encode(learner, backbone: model.fingerprint)
        try data.write(to: URL(fileURLWithPath: state), options: .atomic)
    }
}

struct Learn: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Teach a memory state a text: apply the CMS rule to its tokens as one request, then save the state.")

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var stateOptions: StateOptions

    @Option(help: "Text to learn.")
    var text: String?

    @Option(help: "File whose text to learn.")
    var file: String?

    func run() throws {
        guard stateOptions.state != nil else { throw ValidationError("learn needs --state FILE") }
        guard (text == nil) != (file == nil) else { throw ValidationError("give exactly one of --text and --file") }
        let body: String
        if let file {
            guard let data = FileManager.default.contents(atPath: file) else { throw CLIError("cannot read \(file)") }
            body = String(decoding: data, as: UTF8.self)
        } else {
            body = text!
        }
        let model = try modelOptions.load()
        let learner = try stateOptions.load(model: model, create: true)!
        let tokens = model.tokenizer.encode(body)
        guard tokens.count >= 2 else { throw ValidationError("the text has fewer than 2 tokens: nothing to learn") }
        let before = learner.updatesApplied
        let limit = model.configuration.maxPositionEmbeddings
        for start in stride(from: 0, to: tokens.count - 1, by: limit - 1) {   // windows sharing one token
            let window = Array(tokens[start..<min(tokens.count, start + limit)])
            try learner.learn(tokens: window, learnable: LearnableTokens.text(count: window.count))
        }
        try stateOptions.save(learner, model: model)
        let names = learner.state.configuration.levels.map(\.name)
        let updates = zip(names, zip(learner.updatesApplied, before)).map { "\($0.0) +\($0.1.0 - $0.1.1)" }
        print("learned \(tokens.count - 1) tokens; updates: \(updates.joined(separator: ", ")); token counters: \(zip(names, learner.tokenCounters).map { "\($0.0) \($0.1)" }.joined(separator: ", "))")
    }
}

struct Score: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Mean negative log-likelihood per completion token given the prompt; prints `nll: X`.")

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var stateOptions: StateOptions

    @Option(help: "The prompt (context, not scored).")
    var prompt: String

    @Option(help: "The completion whose tokens are scored.")
    var completion: String

    func run() throws {
        let model = try modelOptions.load()
        let learner = try stateOptions.load(model: model, create: false)
        let p = model.tokenizer.encode(prompt), c = model.tokenizer.encode(completion)
        guard !p.isEmpty, !c.isEmpty else { throw ValidationError("prompt and completion must both have tokens") }
        let tokens = p + c
        let learnable = p.map { _ in false } + c.map { _ in true }
        let r = try LevelTrainer(model: model).loss(tokens: tokens, learnable: learnable, state: learner?.state)
        print(String(format: "nll: %.6f", r.total / Double(r.count)))
    }
}

struct Consolidate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Sleep: move the fast level into mid (transplant, or distil on the user's recent texts), clear fast, save the state.")

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var stateOptions: StateOptions

    @Option(help: "transplant (write fast's units into mid's least-used units, then --steps) or distill.")
    var method: String = "transplant"

    @Option(help: "Distillation steps on the mid level (default: 0 for transplant, 16 for distill).")
    var steps: Int?

    @Option(help: "Tokens the current model generates after each recent text (default: 0 for transplant, 32 for distill).")
    var generatedTokens: Int?

    func run() throws {
        guard stateOptions.state != nil else { throw ValidationError("consolidate needs --state FILE") }
        guard method == "transplant" || method == "distill" else { throw ValidationError("--method is transplant or distill") }
        let transplant = method == "transplant"
        let steps = self.steps ?? (transplant ? 0 : 16), generatedTokens = self.generatedTokens ?? (transplant ? 0 : 32)
        guard steps >= (transplant ? 0 : 1), generatedTokens >= 0 else {
            throw ValidationError("--steps must be ≥ \(transplant ? 0 : 1) and --generated-tokens ≥ 0")
        }
        let model = try modelOptions.load()
        let learner = try stateOptions.load(model: model, create: false)!
        guard !learner.recentTokens.isEmpty else { throw CLIError("the state has no recent texts to consolidate on: teach it with `continuum learn` first") }
        guard let pair = learner.state.configuration.consolidation else { throw CLIError("consolidation needs at least two levels") }
        let report = try learner.consolidate(contexts: learner.recentTokens, level: pair.source, into: pair.target,
                                             budget: ConsolidationBudget(steps: steps, generatedTokens: generatedTokens),
                                             transplant: transplant)
        try stateOptions.save(learner, model: model)
        print(String(format: "consolidated %d positions: %d units written, %d steps; KL(teacher‖student) %.4f (fast silenced) → %.4f",
                     report.positions, report.written, report.steps, report.klBefore, report.klAfter))
    }
}
