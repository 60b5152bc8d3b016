// Sleep that distils from context (Sleep.swift), its mechanics on the tiny
// Llama: what it reads, what it changes, what it clears; and the chat
// contents it reads the user's texts from.
import Foundation
import Memory
import Model
import Testing
import TestSupport

@Suite("Sleep")
struct SleepTests {
    @Test("chat contents are each user message's own tokens, markup excluded")
    func contents() throws {
        let model = try Fixtures.tinyLlama()
        let tok = model.tokenizer, chat = model.chatTemplate
        let messages = [ChatMessage(role: "user", content: "my dog is called Rex"), ChatMessage(role: "assistant", content: "Noted."),
                        ChatMessage(role: "user", content: "and <|im_end|> is text here")]
        let encoded = chat.encode(messages, tokenizer: tok)
        let users = chat.contents(of: encoded.tokens, tokenizer: tok)
        #expect(try users == [tok.encode("my dog is called Rex", parseSpecial: false), tok.encode("and <|im_end|> is text here", parseSpecial: false)])
        // The same tokens the learnable mask marks as the user's.
        #expect(users.flatMap { $0 } == zip(encoded.tokens, encoded.userTokens).filter(\.1).map(\.0))
        #expect(chat.contents(of: tok.encode("plain text, no turns"), tokenizer: tok).isEmpty)
        #expect(chat.contents(of: encoded.tokens, role: "assistant", tokenizer: tok) == [tok.encode("Noted.", parseSpecial: false)])
    }

    @Test("sleep trains only the slower level, then clears the fast one; the state stays finite and round-trips")
    func sleepMechanics() throws {
        let model = try Fixtures.tinyLlama()
        let layers = Array(0..<model.configuration.numHiddenLayers)
        let config = try LevelConfiguration(levels: [
            .init(name: "mid", chunkSize: 1_000_000, width: 8, layers: layers, learningRate: 1e-2),
            .init(name: "fast", chunkSize: 4, width: 8, layers: layers, learningRate: 1e-2),
        ])
        let learner = try LevelLearner(state: try LevelState(configuration: config, model: model.configuration), model: model)
        let chat = model.chatTemplate, tok = model.tokenizer
        for text in ["my dog is called Rex", "I live in a red house", "Rex likes the park"] {
            let turn = chat.encode([ChatMessage(role: "user", content: text)], tokenizer: tok)
            try learner.learn(tokens: turn.tokens, learnable: turn.userTokens)
        }
        #expect(learner.updatesApplied[1] > 0)
        let texts = learner.recentTokens.flatMap { chat.contents(of: $0, tokenizer: tok) }
        #expect(texts.count == 3)
        let midBefore = learner.state.blocks[0]
        var sleep = SleepConfiguration()
        sleep.questionsPerText = 1
        sleep.answerTokens = 4
        sleep.steps = 3
        let report = try learner.sleep(texts: texts, configuration: sleep)
        #expect(report.examples > 0 && report.steps == 3 && report.klBefore.isFinite && report.klAfter.isFinite)
        #expect(report.localityExamples == 3)
        #expect(learner.state.blocks[0] != midBefore, "the slower level learned")
        #expect(learner.state.blocks[1].allSatisfy { $0.down.allSatisfy { $0 == 0 } }, "fast is cleared")
        #expect(learner.accumulatedTokens[1] == 0 && learner.consolidations == 1)
        let finite = learner.state.blocks.joined().allSatisfy { $0.isFinite }
        #expect(finite)
        let restored = try LevelStateFile.decode(try LevelStateFile.encode(learner, backbone: model.fingerprint), model: model)
        #expect(restored.state.blocks == learner.state.blocks && restored.consolidations == 1)
        // Nothing to read: nothing changes.
        let idle = try learner.sleep(texts: [], configuration: sleep)
        #expect(idle.examples == 0 && restored.state.blocks == learner.state.blocks)
    }

    @Test("a sleep configuration is validated on decode, with defaults")
    func configuration() throws {
        let d = try JSONDecoder().decode(SleepConfiguration.self, from: Data("{}".utf8))
        #expect(d == SleepConfiguration())
        let c = try JSONDecoder().decode(SleepConfiguration.self, from: Data(#"{"questions_per_text": 2, "locality_weight": 0.5}"#.utf8))
        #expect(c.questionsPerText == 2 && c.localityWeight == 0.5)
        for bad in [#"{"questions_per_text": -1}"#, #"{"answer_tokens": 0}"#, #"{"steps": -3}"#, #"{"locality_weight": -1}"#] {
            #expect(throws: LevelConfiguration.Invalid.self) { _ = try JSONDecoder().decode(SleepConfiguration.self, from: Data(bad.utf8)) }
        }
    }
}
