// Level state files: exact round trips and clear refusals.
import Foundation
import Testing
import TestSupport
@testable import Memory
@testable import Model

@Suite("Level state files")
struct SerializationTests {
    static let levels: [LevelConfiguration.Level] = [
        .init(name: "mid", chunkSize: 8, width: 4, layers: [1], learningRate: 1e-2),
        .init(name: "fast", chunkSize: 4, width: 3, layers: [0, 1], learningRate: 1e-2, retention: 0.9),
    ]

    @Test("a saved state restores exactly and learns on identically")
    func roundTrip() throws {
        let model = try Fixtures.tinyLlama()
        let learner = try Tiny.learner(Self.levels)
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(1..<11))   // leaves open chunks
        let bytes = try LevelStateFile.encode(learner, backbone: model.fingerprint)
        let restored = try LevelStateFile.decode(bytes, model: model, expecting: learner.state.configuration)
        #expect(restored.state.blocks == learner.state.blocks)
        #expect(restored.accumulators == learner.accumulators)
        #expect(restored.moments == learner.moments)
        #expect(restored.tokenCounters == learner.tokenCounters && restored.accumulatedTokens == learner.accumulatedTokens)
        #expect(restored.updatesApplied == learner.updatesApplied)
        #expect(restored.recentTokens == learner.recentTokens && !restored.recentTokens.isEmpty)
        #expect(try LevelStateFile.encode(restored, backbone: model.fingerprint) == bytes)
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(12..<19))
        try restored.learn(tokens: Tiny.tokens, learnable: Tiny.mask(12..<19))
        #expect(restored.state.blocks == learner.state.blocks)
    }

    @Test("states from another configuration, backbone or version, or damaged bytes, are refused")
    func refusals() throws {
        let model = try Fixtures.tinyLlama()
        let learner = try Tiny.learner(Self.levels)
        let bytes = try LevelStateFile.encode(learner, backbone: model.fingerprint)
        var other = Self.levels
        other[1].chunkSize = 16
        let config = try LevelConfiguration(levels: other)
        let e1 = #expect(throws: LevelStateFile.Incompatible.self) { try LevelStateFile.decode(bytes, model: model, expecting: config) }
        #expect(e1?.description.contains("different level configuration") == true)
        let foreign = try LevelStateFile.encode(learner, backbone: "sha256:another")
        let e2 = #expect(throws: LevelStateFile.Incompatible.self) { try LevelStateFile.decode(foreign, model: model) }
        #expect(e2?.description.contains("another backbone") == true)
        // The header is JSON: patch the version in place.
        var patched = bytes
        if let r = patched.range(of: Data(#""version":"1""#.utf8)) {
            patched.replaceSubrange(r, with: Data(#""version":"9""#.utf8))
        }
        #expect(patched != bytes)
        let e3 = #expect(throws: LevelStateFile.Incompatible.self) { try LevelStateFile.decode(patched, model: model) }
        #expect(e3?.description.contains("version 9") == true)
        #expect(throws: LevelStateFile.Incompatible.self) { try LevelStateFile.decode(bytes.prefix(100), model: model) }
        #expect(throws: LevelStateFile.Incompatible.self) { try LevelStateFile.decode(Data("hello".utf8), model: model) }
        let e4 = #expect(throws: LevelStateFile.Incompatible.self) { try LevelStateFile.decode(bytes.prefix(bytes.count - 4), model: model) }
        #expect(e4?.description.contains("malformed") == true)
    }
}
