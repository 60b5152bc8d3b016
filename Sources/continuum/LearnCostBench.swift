// continuum bench learn-cost: what learning costs next to a forward pass
// (issue 13). For a chat-turn job (the service's shape: the chat template
// around a user message, whose words are the learnable tokens) and for a
// 1,153-token text with every token learnable, at each thread count, in one
// run: learning ms per learnable token (LevelLearner.learn on a user whose
// levels have learned something), forward-only ms per token over the same
// sequence (the perplexity forward with the same levels: every position's
// logits), and their ratio; medians over repetitions.
import ArgumentParser
import Foundation
import Memory
import Model
import Tensor

struct BenchLearnCost: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "learn-cost",
        abstract: "Learning cost per learnable token next to a forward pass, for a chat turn and a 1,153-token text; prints a table.")

    @Option(help: "A .gguf file or a Hugging Face model directory (default: $CONTINUUM_MODEL, else the cached default model).")
    var model: String?

    @Option(help: "Thread counts to measure, comma-separated (the kernels', fp32 products included).")
    var threads = "1,2"

    @Option(help: "Repetitions per measurement; medians are reported.")
    var repetitions = 3

    @Option(help: "Level configuration (JSON or YAML; default: the built-in defaults).")
    var levels: String?

    @Option(help: "The text workload, learned as one request with every token learnable.")
    var text = "Tests/ModelTests/Fixtures/perplexity.txt"

    @Option(help: "The chat-turn workload's user message.")
    var message = "My grandmother Wilhelmina grew up in a lighthouse on the Isle of Skerrivore, and she still bakes oatcakes for the whole village every Sunday."

    @Option(help: "Workloads to measure, comma-separated: chat, text.")
    var workloads = "chat,text"

    @Option(help: "Learning semantics to measure, comma-separated: streaming (the default rule), window (the rule before it: each piece re-runs up to 512 tokens of context).")
    var semantics = "streaming"

    func run() throws {
        let threadCounts = threads.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !threadCounts.isEmpty, threadCounts.allSatisfy({ $0 >= 1 }), repetitions >= 1 else {
            throw ValidationError("--threads needs counts ≥ 1 and --repetitions must be at least 1")
        }
        let rules: [(String, LevelLearner.Semantics)] = try semantics.split(separator: ",").map {
            switch $0.trimmingCharacters(in: .whitespaces) {
            case "streaming": ("streaming", .streaming)
            case "window": ("window 512", .recomputedPrefix(context: 512))
            default: throw ValidationError("unknown semantics '\($0)' (known: streaming, window)")
            }
        }
        guard let textData = FileManager.default.contents(atPath: text) else {
            throw CLIError("cannot read \(text) (run from the repository root or pass --text)")
        }
        let m = try ModelOptions.parse(model.map { ["--model", $0] } ?? []).load()
        let configuration = try levels.map { try LevelConfiguration.load(path: $0) } ?? .defaults(layers: m.configuration.numHiddenLayers)

        // The workloads: (name, tokens, learnable).
        let tok = m.tokenizer
        let turn = m.chatTemplate.encode([ChatMessage(role: "user", content: message)], tokenizer: tok)   // as the server does
        let chat = (name: "chat turn", tokens: turn.tokens, learnable: turn.userTokens)
        let textTokens = tok.encode(String(decoding: textData, as: UTF8.self))
        let document = (name: "text", tokens: textTokens, learnable: LearnableTokens.text(count: textTokens.count))
        let chosen = workloads.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        if let bad = chosen.first(where: { !["chat", "text"].contains($0) }) {
            throw ValidationError("unknown workload '\(bad)' (known: chat, text)")
        }
        let workloads = (chosen.contains("chat") ? [chat] : []) + (chosen.contains("text") ? [document] : [])

        Parallel.setThreads(threadCounts[0])
        // A user who has learned something (both levels updated at least
        // once), so that every level block runs: the benchmark's first turns.
        let warm = try LevelLearner(state: try LevelState(configuration: configuration, model: m.configuration), model: m)
        let bench = PersonalisationBench(model: m, set: try FactSet.load(FactSet.defaultPaths[0]), general: [])
        for turn in bench.turns where warm.updatesApplied.contains(0) { try warm.learn(tokens: turn.tokens, learnable: turn.learnable) }
        let snapshot = try LevelStateFile.encode(warm, backbone: m.fingerprint)

        let cpu = Self.cpuDescription()
        print("CPU: \(cpu.model); SIMD: \(cpu.flags)")
        #if DEBUG
        let build = "debug (compute modules -O)"
        #else
        let build = "release"
        #endif
        print("Date: \(ISO8601DateFormatter().string(from: Date())); build: \(build); model: \(m.source); repetitions: \(repetitions) (medians)")
        print("Levels: " + configuration.levels.map { "\($0.name) chunk \($0.chunkSize) width \($0.width) layers \($0.layers.first!)–\($0.layers.last!)" }.joined(separator: "; ") + String(format: "; min_surprise %.2f", configuration.minSurprise))
        for w in workloads {
            print("Workload \(w.name): \(w.tokens.count) tokens, \(LearnableTokens.count(w.learnable)) learnable")
        }
        print("")
        print("| workload | semantics | threads | forward ms / token | learning ms / learnable token | ratio | learning ÷ forward, whole job |")
        print("|---|---|---|---|---|---|---|")
        for n in threadCounts {
            Parallel.setThreads(n)
            _ = try m.perplexity(tokens: Array(chat.tokens), adapter: warm.state)   // warm-up
            for w in workloads {
                for (ruleName, rule) in rules {
                    let learnable = LearnableTokens.count(w.learnable)
                    var forward: [Double] = [], learning: [Double] = []
                    for r in 0..<repetitions {
                        let learner = try LevelStateFile.decode(snapshot, model: m)
                        learner.semantics = rule
                        let t0 = Date()
                        _ = try m.perplexity(tokens: w.tokens, adapter: learner.state)
                        let t1 = Date()
                        try learner.learn(tokens: w.tokens, learnable: w.learnable)
                        let t2 = Date()
                        forward.append(t1.timeIntervalSince(t0))
                        learning.append(t2.timeIntervalSince(t1))
                        log(String(format: "%@, %@, %d thread(s), repetition %d/%d: forward %.3f s, learning %.3f s",
                                   w.name, ruleName, n, r + 1, repetitions, forward.last!, learning.last!))
                    }
                    let f = Self.median(forward), l = Self.median(learning)
                    let fPer = f * 1000 / Double(w.tokens.count), lPer = l * 1000 / Double(learnable)
                    print(String(format: "| %@ | %@ | %d | %.2f | %.2f | %.2f× | %.2f× |", w.name, ruleName, n, fPer, lPer, lPer / fPer, l / f))
                }
            }
        }
        print("")
        print("forward: LlamaModel.perplexity over the whole sequence with the user's levels (every position's logits) ÷ its tokens; learning: LevelLearner.learn of the same request ÷ its learnable tokens; ratio = learning ms / learnable token ÷ forward ms / token.")
    }

    static func median(_ x: [Double]) -> Double {
        let s = x.sorted()
        return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
    }

    /// The CPU's model name and its SIMD flags, from /proc/cpuinfo.
    static func cpuDescription() -> (model: String, flags: String) {
        guard let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8) else { return ("unknown", "unknown") }
        func field(_ name: String) -> String? {
            info.split(separator: "\n").first { $0.hasPrefix(name) }.flatMap { $0.split(separator: ":", maxSplits: 1).last }
                .map { $0.trimmingCharacters(in: .whitespaces) }
        }
        let flags = (field("flags") ?? "").split(separator: " ").filter {
            $0.hasPrefix("avx") || $0.hasPrefix("amx") || ["fma", "f16c", "sse4_2"].contains(String($0))
        }
        return (field("model name") ?? "unknown", flags.joined(separator: " "))
    }
}
