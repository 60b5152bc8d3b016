// continuum bench: prefill and decode throughput of the engine.
import ArgumentParser
import Foundation
import Model
import Tensor

/// `continuum bench` runs the engine benchmark; `continuum bench learn` the
/// personalisation benchmark.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks: engine throughput (default), personalisation (`bench learn`) and learning cost (`bench learn-cost`).",
        subcommands: [BenchEngine.self, BenchLearn.self, BenchLearnCost.self, BenchAudit.self], defaultSubcommand: BenchEngine.self)
}

struct BenchEngine: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "engine",
        abstract: "Measure prefill and decode tokens/s; prints a table (medians over repetitions).")

    @OptionGroup var modelOptions: ModelOptions

    @Option(help: "Prompt length for the prefill measurement.")
    var promptTokens: Int = 512

    @Option(help: "Tokens decoded one at a time after the prompt.")
    var genTokens: Int = 128

    @Option(help: "Repetitions; the median is reported.")
    var repetitions: Int = 3

    @Flag(help: "Print one JSON object instead of a table.")
    var json = false

    @Option(help: "Also measure decode with this many sequences stepped together (aggregate tokens/s); 0 skips it.")
    var batch: Int = 0

    func run() throws {
        guard promptTokens >= 1, genTokens >= 1, repetitions >= 1 else {
            throw ValidationError("--prompt-tokens, --gen-tokens and --repetitions must be at least 1")
        }
        let m = try modelOptions.load()
        let v = m.configuration.vocabSize
        // A fixed, model-independent token sequence (no special tokens).
        let prompt = (0..<promptTokens).map { (1000 + $0 * 7919) % (v - 1000) + 1000 }
        var prefill: [Double] = [], decode: [Double] = []
        _ = try m.forward(tokens: Array(prompt.prefix(16)), cache: m.makeCache())  // warm-up
        for _ in 0..<repetitions {
            let cache = m.makeCache()
            let t0 = Date()
            var logits = try m.forward(tokens: prompt, cache: cache)
            let t1 = Date()
            for _ in 0..<genTokens {
                let next = Sampler.argmax(logits)
                logits = try m.forward(tokens: [next], cache: cache)
            }
            let t2 = Date()
            prefill.append(Double(promptTokens) / t1.timeIntervalSince(t0))
            decode.append(Double(genTokens) / t2.timeIntervalSince(t1))
        }
        func median(_ x: [Double]) -> Double {
            let s = x.sorted()
            return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
        }
        let pf = median(prefill), dc = median(decode)
        var batched = 0.0
        if batch > 0 {
            // `batch` sequences with short, different prompts, then decode
            // steps in which every sequence advances by one token together.
            var rates: [Double] = []
            for _ in 0..<repetitions {
                let caches = (0..<batch).map { _ in m.makeCache() }
                var steps = caches.enumerated().map { i, c in
                    LlamaModel.Step(tokens: (i..<(i + 16)).map { (1000 + $0 * 7919) % (v - 1000) + 1000 }, cache: c)
                }
                var logits = try m.forward(steps)
                let t0 = Date()
                for _ in 0..<genTokens {
                    for i in steps.indices { steps[i].tokens = [Sampler.argmax(logits[i])] }
                    logits = try m.forward(steps)
                }
                rates.append(Double(batch * genTokens) / Date().timeIntervalSince(t0))
            }
            batched = median(rates)
        }
        if json {
            print(String(format: "{\"threads\": %d, \"prompt_tokens\": %d, \"gen_tokens\": %d, \"prefill_tps\": %.2f, \"decode_tps\": %.2f, \"batch\": %d, \"batch_decode_tps\": %.2f, \"weight_bytes_per_token\": %d, \"multiply_adds_per_token\": %d}",
                         Parallel.threads, promptTokens, genTokens, pf, dc, batch, batched, m.weights.bytesPerToken,
                         m.weights.multiplyAddsPerToken))
        } else {
            print("| engine | threads | prefill \(promptTokens) (tokens/s) | decode \(genTokens) (tokens/s) |")
            print("|---|---|---|---|")
            print(String(format: "| continuum | %d | %.1f | %.1f |", Parallel.threads, pf, dc))
            if batch > 0 {
                print("")
                print("| sequences decoded together | aggregate decode (tokens/s) |")
                print("|---|---|")
                print(String(format: "| %d | %.1f |", batch, batched))
            }
        }
    }
}
