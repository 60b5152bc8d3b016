// The engine against Hugging Face transformers (PyTorch CPU) on the same GGUF:
// logits, greedy continuations, perplexity. Fixtures: scripts/make-fixtures.py.
import Foundation
import Testing
import TestSupport
import Tensor
@testable import Model

@Suite("SmolLM2 against transformers")
struct ReferenceTests {
    struct Prompt {
        let name: String
        let ids: [Int]
        let positions: [Int]
        let logits: [Float]
        let greedy: [Int]
    }

    static func prompts() throws -> [Prompt] {
        let ref = try Fixtures.json("ModelTests/Fixtures/smollm2-reference.json")
        return try #require(ref["prompts"] as? [[String: Any]]).map { p in
            Prompt(name: p["name"] as! String, ids: p["ids"] as! [Int], positions: p["positions"] as! [Int],
                   logits: try Fixtures.floats("ModelTests/Fixtures/" + (p["logits"] as! String)), greedy: p["greedy"] as! [Int])
        }
    }

    @Test("prompt ids equal the reference tokenizer's")
    func promptIDs() throws {
        let model = try Fixtures.backbone()
        let ref = try Fixtures.json("ModelTests/Fixtures/smollm2-reference.json")
        for p in try #require(ref["prompts"] as? [[String: Any]]) {
            #expect(model.tokenizer.encode(p["text"] as! String) == p["ids"] as! [Int], "\(p["name"]!)")
        }
    }

    @Test("logits within 1e-3 × max|logit| at first, middle and last positions")
    func logits() throws {
        let model = try Fixtures.backbone()
        let v = model.configuration.vocabSize, d = model.configuration.hiddenSize
        for p in try Self.prompts() {
            let hidden = try model.hiddenStates([LlamaModel.Step(tokens: p.ids, cache: model.makeCache())])
            for (i, pos) in p.positions.enumerated() {
                let ours = hidden.withUnsafeBufferPointer { model.logits(hidden: $0.baseAddress! + pos * d, count: 1) }
                let theirs = p.logits[(i * v)..<((i + 1) * v)]
                let scale = theirs.map(abs).max()!
                let err = maxAbsDiff(ours[...], theirs)
                print("reference logits \(p.name) position \(pos): max |Δ| \(err) = \(err / scale) × max|logit| (\(scale))")
                #expect(err <= 1e-3 * scale, "\(p.name) position \(pos): max |Δ| \(err), max |logit| \(scale)")
                #expect(Sampler.argmax(ours) == Sampler.argmax(Array(theirs)), "\(p.name) position \(pos): top token differs")
            }
        }
    }

    @Test("greedy 64-token continuations identical token for token")
    func greedy() throws {
        let model = try Fixtures.backbone()
        var params = SamplingParameters()
        params.temperature = 0
        params.maxTokens = 64
        for p in try Self.prompts() {
            let result = try Generator(model: model).generate(prompt: p.ids, parameters: params)
            // transformers lists the end-of-sequence token it stopped at; we report it as finish reason.
            let endedAtEOS = p.greedy.last.map { model.tokenizer.eosIDs.contains($0) } ?? false
            let expected = endedAtEOS ? Array(p.greedy.dropLast()) : p.greedy
            #expect(result.finishReason == (endedAtEOS ? .stop : .length), "\(p.name)")
            #expect(result.tokens == expected, "\(p.name): ours \(model.tokenizer.decode(result.tokens).debugDescription) vs \(model.tokenizer.decode(expected).debugDescription)")
        }
    }

    @Test("perplexity within 0.5% of transformers")
    func perplexity() throws {
        let model = try Fixtures.backbone()
        let ref = try #require(try Fixtures.json("ModelTests/Fixtures/smollm2-reference.json")["perplexity"] as? [String: Any])
        let text = try String(contentsOf: Fixtures.url("ModelTests/Fixtures/perplexity.txt"), encoding: .utf8)
        let result = try model.perplexity(tokens: model.tokenizer.encode(text))
        let expected = ref["perplexity"] as! Double
        #expect(result.count == ref["tokens"] as! Int)
        print("reference perplexity: ours \(result.perplexity), transformers \(expected), relative difference \(result.perplexity / expected - 1)")
        #expect(abs(result.perplexity / expected - 1) < 0.005, "ours \(result.perplexity), transformers \(expected)")
    }

    @Test("windows: every token after the first is scored exactly once")
    func perplexityWindows() throws {
        let model = try Fixtures.backbone()
        let text = try String(contentsOf: Fixtures.url("ModelTests/Fixtures/perplexity.txt"), encoding: .utf8)
        let ids = Array(model.tokenizer.encode(text).prefix(300))
        let whole = try model.perplexity(tokens: ids)
        let windowed = try model.perplexity(tokens: ids, context: 128)
        #expect(whole.count == ids.count - 1 && windowed.count == ids.count - 1)
        // Shorter context loses information: higher perplexity, same order of magnitude.
        #expect(windowed.perplexity > whole.perplexity * 0.99 && windowed.perplexity < whole.perplexity * 2)
    }
}
