// Seeded fuzzing of the level state file decoders (`decode(_:model:)` and the
// store's `decode(levels:moments:learner:…)`), on the tiny Llama with two small
// levels (mid: AdamW, fast: M3), so a state file is about 16 KB.
//
// Cases: random bytes of many lengths; every truncation of a valid export;
// single-bit flips in header and data; header lengths set to huge values;
// entries with huge, negative, overlapping or reversed data_offsets, huge,
// negative or overflowing shapes, other dtypes; counters negative, huge,
// miscounted, accumulated ≥ chunk; token ids outside the vocabulary;
// non-finite values in every tensor; configurations out of bounds. Crafted
// cases edit the header of a valid export, either through the codec's writer
// (a valid container with crafted contents) or as raw JSON and bytes
// (`Surgery`, in SafetensorsSurgery.swift).
//
// Every case must end as an `Incompatible`, or as a learner that then learns
// across chunk boundaries, is audited (drift), consolidates, resets a level
// and is encoded again, without trapping (a trap ends the test process).
// Crafted cases also state which of the two they must be.
import Foundation
import Testing
import TestSupport
@testable import Memory
@testable import Model

/// What a case must end as.
enum Outcome {
    case either
    case accepted
    /// Refused with a description containing this.
    case refused(String)
}

/// Runs cases against one decoder and counts them.
struct FuzzRun {
    let model: LlamaModel
    let decode: (Data) throws -> LevelLearner
    var cases = 0, refused = 0, decoded = 0

    mutating func check(_ bytes: Data, _ expect: Outcome = .either, _ label: @autoclosure () -> String) {
        cases += 1
        let learner: LevelLearner
        do {
            learner = try decode(bytes)
        } catch let e as LevelStateFile.Incompatible {
            refused += 1
            switch expect {
            case .accepted: Issue.record("\(label()): refused: \(e.description)")
            case .refused(let words) where !e.description.contains(words):
                Issue.record("\(label()): refused, but not for '\(words)': \(e.description)")
            default: break
            }
            return
        } catch {
            Issue.record("\(label()): an error other than Incompatible: \(error)")
            return
        }
        decoded += 1
        if case .refused(let words) = expect { Issue.record("\(label()): decoded, expected a refusal for '\(words)'") }
        do {
            // Consolidation is the costly step (≈15 ms here): every crafted case and every fourth blind one.
            let crafted = if case .either = expect { false } else { true }
            try StateFileFuzzTests.exercise(learner, model: model, consolidate: crafted || decoded % 4 == 1)
        } catch {
            Issue.record("\(label()): the decoded state failed: \(error)")
        }
    }
}

@Suite("Level state file fuzzing")
struct StateFileFuzzTests {
    static let levels: [LevelConfiguration.Level] = {
        var fast = LevelConfiguration.Level(name: "fast", chunkSize: 4, width: 1, layers: [0], learningRate: 1e-2, retention: 0.9)
        fast.optimizer = .init(kind: .m3)
        fast.optimizer.slowPeriod = 2
        return [.init(name: "mid", chunkSize: 8, width: 1, layers: [1], learningRate: 1e-2), fast]
    }()

    /// A learner with open chunks, applied updates on both levels and two recent contexts.
    static func taught() throws -> LevelLearner {
        let learner = try Tiny.learner(levels)
        try learner.learn(tokens: Tiny.tokens, learnable: Tiny.mask(1..<11))
        try learner.learn(tokens: Array(Tiny.tokens.prefix(12)), learnable: Array(Tiny.mask(3..<12).prefix(12)))
        return learner
    }

    /// What every decoded state must survive: encode/decode again to the same
    /// state, learn 9 tokens (crossing both levels' boundaries), a drift
    /// audit, a consolidation (when `consolidate`), a level reset, and every
    /// encoder.
    static func exercise(_ learner: LevelLearner, model: LlamaModel, consolidate: Bool) throws {
        let bytes = try LevelStateFile.encode(learner, backbone: model.fingerprint)
        let again = try LevelStateFile.decode(bytes, model: model)
        #expect(again.state.blocks == learner.state.blocks && again.moments == learner.moments
            && again.tokenCounters == learner.tokenCounters && again.recentTokens == learner.recentTokens)
        let tokens = Array(Tiny.tokens.prefix(10))
        try learner.learn(tokens: tokens, learnable: (0..<10).map { $0 > 0 })
        _ = Drift.norms(learner.state)
        _ = try Drift.behaviour(model: model, probes: [Array(tokens.prefix(5))], state: learner.state)
        if consolidate {
            _ = try learner.consolidate(contexts: learner.recentTokens, budget: ConsolidationBudget(steps: 1, generatedTokens: 1))
        }
        try learner.reset(level: 0)
        _ = try LevelStateFile.encode(learner, backbone: model.fingerprint)
        _ = try LevelStateFile.encodeLearner(learner, backbone: model.fingerprint)
        _ = try LevelStateFile.encodeLearner(learner, accumulators: false, backbone: model.fingerprint)
        for l in levels.indices {
            _ = try LevelStateFile.encodeLevel(learner, level: l, backbone: model.fingerprint)
            _ = try LevelStateFile.encodeMoments(learner, level: l, backbone: model.fingerprint)
        }
    }

    /// Cases that need no knowledge of the format: random bytes, truncations,
    /// bit flips and header lengths.
    static func blind(_ run: inout FuzzRun, valid: Data, flips: Int, rng: inout SeededGenerator, name: String) {
        // Random bytes: every length to 64, then longer ones, some with a plausible header length.
        for n in 0...64 { run.check(Data((0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }), .either, "\(name) random \(n)") }
        run.check(Data(repeating: 0xFF, count: 8), .refused("malformed"), "\(name) 8 × 0xFF")
        for i in 0..<200 {
            let n = Int.random(in: 65...8192, using: &rng)
            var bytes = Data((0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) })
            if i % 2 == 0 { bytes.replaceSubrange(0..<8, with: Surgery.withLength(UInt64.random(in: 0...UInt64(n - 8), using: &rng))) }
            run.check(bytes, .either, "\(name) random \(n) bytes #\(i)")
        }
        // Every truncation of the valid file.
        for n in 0..<valid.count { run.check(valid.prefix(n), .refused("level state"), "\(name) truncated to \(n)") }
        run.check(valid, .accepted, "\(name) as exported")
        // Single-bit flips, half in the header, half in the data (all in the header of a file without tensors).
        let headerEnd = 8 + Int(valid.prefix(8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
        for i in 0..<flips {
            let at = i % 2 == 0 || headerEnd == valid.count
                ? Int.random(in: 0..<headerEnd, using: &rng) : Int.random(in: headerEnd..<valid.count, using: &rng)
            var bytes = valid
            bytes[at] ^= 1 << UInt8.random(in: 0..<8, using: &rng)
            run.check(bytes, .either, "\(name) bit flip at \(at)")
        }
        // Header lengths.
        let c = UInt64(valid.count)
        for n: UInt64 in [.max, UInt64(Int.max), UInt64(Int.max) + 1, 1 << 63, 1 << 32, c - 7, c - 8, c - 9, c, 0, 1, 7, 8,
                          UInt64(headerEnd - 8) - 1, UInt64(headerEnd - 8) + 1, UInt64(headerEnd - 8) + 8, UInt64(headerEnd - 8) - 8,
                          100_000_000, 100_000_001] where n != UInt64(headerEnd - 8) {   // c - 8 is the length itself when no tensor follows
            run.check(Surgery.settingLength(valid, n), .refused("level state"), "\(name) header length \(n)")
        }
    }

    /// Raw surgery on the entries: offsets, shapes, dtypes, names; and
    /// non-finite values in every tensor.
    static func entries(_ run: inout FuzzRun, valid: Data, rng: inout SeededGenerator, name: String) {
        let h = try! Safetensors.parse(valid)
        let sorted = h.entries.values.sorted { $0.range.lowerBound < $1.range.lowerBound }
        var picked = [sorted.first!, sorted.last!]
        for _ in 0..<6 { picked.append(sorted.randomElement(using: &rng)!) }
        for e in picked {
            let (b, end) = (e.range.lowerBound, e.range.upperBound)
            let offsets: [Any] = [[Int.max - 3, Int.max], [-4, 0], [end, b], [b - 4, end - 4], [b + 4, end + 4], [b, end + 4],
                                  [b, end - 4], [0, 1e20], [Double(b) + 0.5, end], [b], [b, end, end], "x", NSNull(),
                                  [Int.min, b], [b, Int.max]]
            for o in offsets {
                run.check(Surgery.editEntry(valid, e.name) { $0["data_offsets"] = o }, .refused("level state"), "\(name) \(e.name) data_offsets \(o)")
            }
            let n = e.shape.reduce(1, *)
            let shapes: [Any] = [[Int.max, 2], [-1, n], [1 << 32, 1 << 32], [1 << 62, 4], [], [0], [1, n], [n, 1, 1],
                                 Array(e.shape.reversed()) + [1, 1], [1.5], "64", [Int.min]]
            for s in shapes where (s as? [Int]) != e.shape {
                run.check(Surgery.editEntry(valid, e.name) { $0["shape"] = s }, .refused("level state"), "\(name) \(e.name) shape \(s)")
            }
            if e.shape.count == 2 && e.shape[0] != e.shape[1] {
                run.check(Surgery.editEntry(valid, e.name) { $0["shape"] = Array(e.shape.reversed()) }, .refused("has shape"),
                          "\(name) \(e.name) transposed")
            }
            for d: Any in ["F16", "I32", "BF16", "F64", "X", 5] {
                run.check(Surgery.editEntry(valid, e.name) { $0["dtype"] = d }, .refused("level state"), "\(name) \(e.name) dtype \(d)")
            }
            // Renamed, removed, and a second name for the same bytes.
            var (header, body) = Surgery.split(valid)
            let entry = header.removeValue(forKey: e.name)!
            run.check(Surgery.join(header, body), .refused("level state"), "\(name) without \(e.name)")
            header[e.name + ".x"] = entry
            run.check(Surgery.join(header, body), .refused("unexpected tensor"), "\(name) \(e.name) renamed")
        }
        var (header, body) = Surgery.split(valid)
        header["levels.extra"] = ["dtype": "F32", "shape": [0], "data_offsets": [body.count, body.count]]
        run.check(Surgery.join(header, body), .refused("unexpected tensor 'levels.extra'"), "\(name) extra tensor")
        // Non-finite values in every tensor (and negative second moments).
        for e in sorted {
            let count = e.range.count / 4
            for v: Float in [.nan, .infinity, -.infinity, Float(bitPattern: 0x7FC0_0001)] {
                let i = Int.random(in: 0..<count, using: &rng)
                run.check(Surgery.settingValue(valid, e.name, i, v), .refused("non-finite"), "\(name) \(e.name)[\(i)] = \(v)")
            }
            if e.name.hasSuffix(".v") {
                run.check(Surgery.settingValue(valid, e.name, 0, -1e-3), .refused("negative"), "\(name) \(e.name) negative")
                run.check(Surgery.settingValue(valid, e.name, 0, -0.0), .accepted, "\(name) \(e.name) -0")
            } else {
                run.check(Surgery.settingValue(valid, e.name, count - 1, -3e30), .accepted, "\(name) \(e.name) huge")
            }
        }
    }

    /// Valid containers with crafted metadata: keys, configuration, format.
    /// `expected`: the decoder is given the configuration (the parts decoder),
    /// so every valid configuration but the file's own is refused as different.
    static func metadata(_ run: inout FuzzRun, valid: Data, expected: Bool, name: String) {
        run.check(Surgery.rewrite(valid) { _ in }, .accepted, "\(name) rewritten unchanged")
        run.check(Surgery.rewrite(valid) { $0["extra"] = "x" }, .refused("unexpected metadata key 'extra'"), "\(name) extra key")
        for key in ["format", "version", "configuration", "configuration_sha256", "backbone"] {
            run.check(Surgery.rewrite(valid) { $0[key] = nil }, .refused("level state"), "\(name) without \(key)")
            run.check(Surgery.rewrite(valid) { $0[key] = "x" }, .refused("level state"), "\(name) \(key) x")
        }
        run.check(Surgery.rewrite(valid) { $0["version"] = String(repeating: "9", count: 5 << 20) }, .refused("version"), "\(name) long version")
        run.check(Surgery.rewrite(valid) { $0["backbone"] = $0["backbone"]! + String(repeating: " ", count: 5 << 20) },
                  .refused("longer than"), "\(name) long backbone")
        // Raw: metadata not an object of strings.
        var (header, body) = Surgery.split(valid)
        var meta = header["__metadata__"] as! [String: Any]
        meta["version"] = 1
        header["__metadata__"] = meta
        run.check(Surgery.join(header, body), .refused("__metadata__"), "\(name) numeric version")
        header["__metadata__"] = ["a", "b"]
        run.check(Surgery.join(header, body), .refused("__metadata__"), "\(name) metadata array")
        (header, body) = Surgery.split(valid)
        header["__metadata__"] = nil
        run.check(Surgery.join(header, body), .refused("format"), "\(name) no metadata")
        // Configurations, with matching checksums.
        let config = (try! Safetensors.parse(valid)).metadata["configuration"]!
        func level(_ n: String, _ extra: String) -> String {
            #"{"name": "\#(n)", "chunk_size": 4, "layers": [0]\#(extra)}"#
        }
        for (a, b) in [("\"m3\"", "\"adamw\""), ("\"adamw\"", "\"m3\""), ("\"learning_rate\":0.01", "\"learning_rate\":0.5")] {
            #expect(config.replacingOccurrences(of: a, with: b) != config, "the configuration holds \(a)")
        }
        let configurations: [(String, Outcome)] = [
            ("not json", .refused("not a level configuration")),
            ("{}", .refused("not a level configuration")),
            (#"{"levels": []}"#, .refused("at least one level")),
            (#"{"levels": [\#(level("mid", #", "width": 1000000000"#))]}"#, .refused("width")),
            (#"{"levels": [{"name": "mid", "chunk_size": 9223372036854775807, "layers": [0]}]}"#, .refused("chunk_size")),
            (#"{"levels": [{"name": "mid", "chunk_size": 0, "layers": [0]}]}"#, .refused("chunk_size")),
            (#"{"levels": [{"name": "mid", "chunk_size": 4, "layers": [99]}]}"#, .refused("does not fit")),
            (#"{"levels": [{"name": "mid", "chunk_size": 4, "layers": [-1]}]}"#, .refused("≥ 0")),
            (#"{"levels": [{"name": "mid", "chunk_size": 4, "layers": [0], "learning_rate": 1e999}]}"#, .refused("configuration")),
            ("{\"levels\": [" + (0..<17).map { level("l\($0)", "") }.joined(separator: ",") + "]}", .refused("at most 16 levels")),
            ("{\"levels\": [" + (0..<16).map { #"{"name": "l\#($0)", "chunk_size": 4, "width": 4096, "layers": [0, 1]}"# }
                .joined(separator: ",") + "]}", .refused("weights over this backbone")),
            (#"{"levels": [{"name": "\#(String(repeating: "n", count: 65))", "chunk_size": 4, "layers": [0]}]}"#, .refused("names")),
            // Valid configurations that do not describe the file's tensors.
            (#"{"levels": [{"name": "mid", "chunk_size": 8, "width": 2, "layers": [1]}]}"#, .refused("level state")),
            (config.replacingOccurrences(of: "\"m3\"", with: "\"adamw\""), .refused("unexpected tensor")),
            (config.replacingOccurrences(of: "\"adamw\"", with: "\"m3\""), .refused("missing")),
            // The same tensors under other hyper-parameters: a valid state.
            (config.replacingOccurrences(of: "\"learning_rate\":0.01", with: "\"learning_rate\":0.5"), .accepted),
        ]
        for (i, (text, expect)) in configurations.enumerated() {
            let decodes = (try? JSONDecoder().decode(LevelConfiguration.self, from: Data(text.utf8))) != nil
            run.check(Surgery.configuring(valid, text), expected && decodes ? .refused("different level configuration") : expect,
                      "\(name) configuration #\(i)")
        }
    }

    /// Crafted counters and recent tokens (a full file or a learner part).
    static func counters(_ run: inout FuzzRun, valid: Data, steps: Bool, name: String) {
        func edit(_ e: @escaping (inout [String: Any]) -> Void) -> Data { Surgery.editJSON(valid, "counters", e) }
        let lists = ["token_counters", "accumulated_tokens", "updates_applied", "updates_rejected", "rejected_non_finite", "rejected_norm"]
        for key in lists {
            for v: Any in [-1, Int.max, Int.min, (1 << 53) + 1, 1.5, "1", NSNull()] {
                run.check(edit { var a = $0[key] as! [Any]; a[1] = v; $0[key] = a }, .refused("level state"), "\(name) \(key)[1] = \(v)")
            }
            run.check(edit { $0[key] = Array(($0[key] as! [Any]).dropLast()) }, .refused("level state"), "\(name) \(key) short")
            run.check(edit { $0[key] = ($0[key] as! [Any]) + [0] }, .refused("level state"), "\(name) \(key) long")
            run.check(edit { $0[key] = nil }, key.hasPrefix("rejected") ? .refused("come together") : .refused("counters"),
                      "\(name) without \(key)")
        }
        run.check(edit { $0["rejected_non_finite"] = nil; $0["rejected_norm"] = nil }, .accepted, "\(name) without rejections by guard")
        for v: Any in [-1, Int.max, 1.5, "x"] {
            run.check(edit { $0["consolidations"] = v }, .refused("level state"), "\(name) consolidations \(v)")
        }
        run.check(edit { $0["consolidations"] = 1 << 53 }, .accepted, "\(name) consolidations 2^53")
        run.check(edit { $0["updates_applied"] = [1 << 53, 1 << 53] }, .accepted, "\(name) updates 2^53")
        // accumulated_tokens against chunk_size (mid 8, fast 4) and token_counters.
        run.check(edit { $0["accumulated_tokens"] = [8, 0] }, .refused("accumulated"), "\(name) accumulated = chunk")
        run.check(edit { $0["accumulated_tokens"] = [0, 5] }, .refused("accumulated"), "\(name) accumulated > chunk")
        run.check(edit { $0["token_counters"] = [1, 1]; $0["accumulated_tokens"] = [2, 2] }, .refused("accumulated"),
                  "\(name) accumulated > token counter")
        run.check(edit { $0["token_counters"] = [(1 << 53) - 2, 8003] }, .accepted, "\(name) large token counters")
        run.check(edit { $0["updates_rejected"] = [0, 1]; $0["rejected_non_finite"] = [0, 1]; $0["rejected_norm"] = [0, 1] },
                  .refused("rejections by guard"), "\(name) rejections by guard > rejections")
        run.check(edit { $0["updates_rejected"] = [0, 3]; $0["rejected_non_finite"] = [0, 1]; $0["rejected_norm"] = [0, 1] },
                  .accepted, "\(name) some rejections of unknown guard")
        // Optimizer steps: [level][block][tensor] in a full file, none in a learner part.
        if steps {
            for v: Any in [-1, Int.max, 1.5] {
                run.check(edit { $0["optimizer_steps"] = [[[0, 0, 0, 0]], [[0, v, 0, 0]]] }, .refused("level state"), "\(name) step \(v)")
            }
            for s: Any in [[[[0, 0, 0, 0]]], [[[0, 0, 0]], [[0, 0, 0, 0]]], [[], [[0, 0, 0, 0]]], [[[0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]], []] {
                run.check(edit { $0["optimizer_steps"] = s }, .refused("optimizer"), "\(name) steps \(s)")
            }
            run.check(edit { $0["optimizer_steps"] = [[[1 << 53, 0, 7, 0]], [[3, 3, 3, 3]]] }, .accepted, "\(name) other steps")
        } else {
            run.check(edit { $0["optimizer_steps"] = [[[0, 0, 0, 0]], [[0, 0, 0, 0]]] }, .refused("optimizer_steps"), "\(name) steps")
        }
        for text in ["x", "{}", "[]", "null", #"{"token_counters": [0, 0]}"#] {
            run.check(Surgery.rewrite(valid) { $0["counters"] = text }, .refused("counters"), "\(name) counters \(text)")
        }
        // Recent tokens: ids of the 420-token vocabulary, at most 2048 tokens and contexts.
        let recent: [(String, Outcome)] = [
            ("[[-1]]", .refused("outside the vocabulary")), ("[[420]]", .refused("outside the vocabulary")),
            ("[[9223372036854775807]]", .refused("outside the vocabulary")), ("[[1, 2], [3, 1000000]]", .refused("outside")),
            ("[[1.5]]", .refused("recent_tokens")), ("[1, 2]", .refused("recent_tokens")), ("x", .refused("recent_tokens")),
            ("[" + [String](repeating: "[1]", count: 2049).joined(separator: ",") + "]", .refused("more than 2048")),
            ("[" + [String](repeating: "[]", count: 2049).joined(separator: ",") + "]", .refused("more than 2048")),
            ("[[" + [String](repeating: "7", count: 2049).joined(separator: ",") + "]]", .refused("more than 2048")),
            ("[[" + [String](repeating: "7", count: 2048).joined(separator: ",") + "]]", .accepted),
            ("[[419, 0], [], [5]]", .accepted), ("[]", .accepted),
        ]
        for (text, expect) in recent {
            run.check(Surgery.rewrite(valid) { $0["recent_tokens"] = text }, expect, "\(name) recent_tokens \(text.prefix(40))")
        }
        run.check(Surgery.rewrite(valid) { $0["recent_tokens"] = nil }, steps ? .accepted : .refused("recent_tokens"),
                  "\(name) without recent_tokens")
    }

    @Test("the state-file decoder ends every damaged, crafted or random file as Incompatible or as a state that works")
    func fullFile() throws {
        let model = try Fixtures.tinyLlama()
        let valid = try LevelStateFile.encode(try Self.taught(), backbone: model.fingerprint)
        var rng = SeededGenerator(seed: 0x5EED_F11E)
        var run = FuzzRun(model: model) { try LevelStateFile.decode($0, model: model) }
        let start = ContinuousClock.now
        Self.blind(&run, valid: valid, flips: 2000, rng: &rng, name: "full")
        Self.entries(&run, valid: valid, rng: &rng, name: "full")
        Self.metadata(&run, valid: valid, expected: false, name: "full")
        Self.counters(&run, valid: valid, steps: true, name: "full")
        // Formats: a part is not a full file.
        let learner = try Self.taught()
        run.check(try LevelStateFile.encodeLearner(learner, backbone: model.fingerprint), .refused("format"), "learner part as full")
        run.check(try LevelStateFile.encodeLevel(learner, level: 0, backbone: model.fingerprint), .refused("format"), "level part as full")
        // Under an expected configuration, another one is refused even when valid.
        var strict = FuzzRun(model: model) { try LevelStateFile.decode($0, model: model, expecting: try LevelConfiguration(levels: Self.levels)) }
        strict.check(valid, .accepted, "expected configuration")
        let config = (try Safetensors.parse(valid)).metadata["configuration"]!
        strict.check(Surgery.configuring(valid, config.replacingOccurrences(of: "\"learning_rate\":0.01", with: "\"learning_rate\":0.5")),
                     .refused("different level configuration"), "other configuration")
        let elapsed = ContinuousClock.now - start
        print("state-file fuzz, full file (\(valid.count) bytes): \(run.cases + strict.cases) cases, \(run.refused + strict.refused) refused, \(run.decoded + strict.decoded) decoded and exercised, in \(elapsed)")
        #expect(run.cases > 15_000 && run.decoded > 500, "the cases reach both outcomes")
    }

    /// A level part as written before moments had parts of their own: the
    /// level's weights and moments, with its optimizer steps.
    static func legacyLevelPart(_ learner: LevelLearner, level l: Int, model: LlamaModel) throws -> Data {
        var meta = try LevelStateFile.commonMetadata(learner, format: LevelStateFile.levelFormat, backbone: model.fingerprint)
        meta["level"] = learner.state.configuration.levels[l].name
        meta["optimizer_steps"] = try LevelStateFile.json(learner.moments[l].map { $0.map(\.steps) })
        return try LevelStateFile.write(learner, LevelStateFile.slots(learner.state.configuration, hiddenSize: learner.state.hiddenSize,
                                                                      level: l, weights: true, moments: true, accumulators: false),
                                        metadata: meta)
    }

    @Test("the parts decoder (level, moments and learner parts, as the store keeps them) does the same")
    func parts() throws {
        let model = try Fixtures.tinyLlama()
        let learner = try Self.taught()
        let configuration = learner.state.configuration
        let mid = try LevelStateFile.encodeLevel(learner, level: 0, backbone: model.fingerprint)
        let fast = try LevelStateFile.encodeLevel(learner, level: 1, backbone: model.fingerprint)
        let midMoments = try LevelStateFile.encodeMoments(learner, level: 0, backbone: model.fingerprint)
        let fastMoments = try LevelStateFile.encodeMoments(learner, level: 1, backbone: model.fingerprint)
        let learnerPart = try LevelStateFile.encodeLearner(learner, backbone: model.fingerprint)
        let versionPart = try LevelStateFile.encodeLearner(learner, accumulators: false, backbone: model.fingerprint)
        let levelParts = ["mid": mid, "fast": fast], momentParts = ["mid": midMoments, "fast": fastMoments]
        var rng = SeededGenerator(seed: 0x9A27_5EED)
        let start = ContinuousClock.now
        var total = (cases: 0, refused: 0, decoded: 0)
        func tally(_ r: FuzzRun) { total = (total.cases + r.cases, total.refused + r.refused, total.decoded + r.decoded) }
        // The five parts decode to the learner.
        let whole = try LevelStateFile.decode(levels: levelParts, moments: momentParts, learner: learnerPart, model: model,
                                              configuration: configuration)
        #expect(whole.state.blocks == learner.state.blocks && whole.moments == learner.moments
            && whole.accumulators == learner.accumulators && whole.tokenCounters == learner.tokenCounters
            && whole.accumulatedTokens == learner.accumulatedTokens)
        #expect(learner.accumulatedTokens.contains { $0 > 0 } && learner.moments.joined().joined().contains { $0.steps > 0 },
                "the taught learner is mid-chunk and has taken steps, so what follows can tell parts apart")
        // A version's parts (weights, counters): the same weights and counters, a fresh optimizer, empty open chunks.
        let version = try LevelStateFile.decode(levels: levelParts, learner: versionPart, model: model, configuration: configuration)
        let fresh = try Tiny.learner(Self.levels)
        #expect(version.state.blocks == learner.state.blocks && version.tokenCounters == learner.tokenCounters
            && version.updatesApplied == learner.updatesApplied && version.recentTokens == learner.recentTokens)
        #expect(version.moments == fresh.moments && version.accumulators == fresh.accumulators
            && version.accumulatedTokens == [0, 0])
        // Level parts written before moments had parts of their own still decode, with their moments.
        let legacy = ["mid": try Self.legacyLevelPart(learner, level: 0, model: model),
                      "fast": try Self.legacyLevelPart(learner, level: 1, model: model)]
        let old = try LevelStateFile.decode(levels: legacy, learner: learnerPart, model: model, configuration: configuration)
        #expect(old.state.blocks == learner.state.blocks && old.moments == learner.moments)
        for (name, part) in [("mid", mid), ("fast", fast)] {
            var run = FuzzRun(model: model) {
                try LevelStateFile.decode(levels: levelParts.merging([name: $0]) { $1 }, moments: momentParts, learner: learnerPart,
                                          model: model, configuration: configuration)
            }
            Self.blind(&run, valid: part, flips: 600, rng: &rng, name: "\(name) part")
            Self.entries(&run, valid: part, rng: &rng, name: "\(name) part")
            Self.metadata(&run, valid: part, expected: true, name: "\(name) part")
            run.check(Surgery.rewrite(part) { $0["optimizer_steps"] = "[[0, 0, 0, 0]]" }, .refused("optimizer_steps but no moments"),
                      "\(name) part with steps")
            run.check(Surgery.rewrite(part) { $0["level"] = name == "mid" ? "fast" : "mid" }, .refused("holds level"), "\(name) part of the other level")
            run.check(Surgery.rewrite(part) { $0["counters"] = "{}" }, .refused("unexpected metadata key"), "\(name) part with counters")
            run.check(learnerPart, .refused("format"), "learner part as \(name) part")
            run.check(momentParts[name]!, .refused("format"), "moments part as \(name) part")
            Self.blind(&run, valid: legacy[name]!, flips: 200, rng: &rng, name: "\(name) part, legacy")
            run.check(Surgery.rewrite(legacy[name]!) { $0["optimizer_steps"] = nil }, .refused("unexpected tensor"),
                      "\(name) legacy part without steps")
            tally(run)
            var moments = FuzzRun(model: model) {
                try LevelStateFile.decode(levels: levelParts, moments: momentParts.merging([name: $0]) { $1 }, learner: learnerPart,
                                          model: model, configuration: configuration)
            }
            let valid = momentParts[name]!
            Self.blind(&moments, valid: valid, flips: 300, rng: &rng, name: "\(name) moments")
            Self.entries(&moments, valid: valid, rng: &rng, name: "\(name) moments")
            Self.metadata(&moments, valid: valid, expected: true, name: "\(name) moments")
            for (text, expect) in [("[[0, 0, 0, 0]]", Outcome.accepted), ("[[5, 9, 1, 9007199254740992]]", .accepted),
                                   ("[[0, 0, 0]]", .refused("optimizer steps")), ("[[0, 0, 0, 0], [0, 0, 0, 0]]", .refused("optimizer steps")),
                                   ("[]", .refused("optimizer steps")), ("[[-1, 0, 0, 0]]", .refused("optimizer step count")),
                                   ("[[9223372036854775807, 0, 0, 0]]", .refused("optimizer step count")), ("[[0.5, 0, 0, 0]]", .refused("optimizer_steps")),
                                   ("x", .refused("optimizer_steps")), (nil, .refused("optimizer_steps"))] {
                moments.check(Surgery.rewrite(valid) { $0["optimizer_steps"] = text }, expect, "\(name) moments steps \(text ?? "none")")
            }
            moments.check(Surgery.rewrite(valid) { $0["level"] = name == "mid" ? "fast" : "mid" }, .refused("holds level"), "\(name) moments of the other level")
            moments.check(part, .refused("format"), "level part as \(name) moments")
            tally(moments)
        }
        for (what, valid) in [("learner part", learnerPart), ("version's learner part", versionPart)] {
            var run = FuzzRun(model: model) {
                try LevelStateFile.decode(levels: levelParts, moments: momentParts, learner: $0, model: model, configuration: configuration)
            }
            Self.blind(&run, valid: valid, flips: 600, rng: &rng, name: what)
            if valid == learnerPart { Self.entries(&run, valid: valid, rng: &rng, name: what) }
            Self.metadata(&run, valid: valid, expected: true, name: what)
            Self.counters(&run, valid: valid, steps: false, name: what)
            run.check(mid, .refused("format"), "level part as \(what)")
            tally(run)
        }
        // Names the configuration does not have; parts only (fresh levels, fresh counters).
        var other = FuzzRun(model: model) { try LevelStateFile.decode(levels: ["slow": $0], learner: nil, model: model, configuration: configuration) }
        other.check(mid, .refused("no level named 'slow'"), "a part for an unknown level")
        var otherMoments = FuzzRun(model: model) {
            try LevelStateFile.decode(levels: [:], moments: ["slow": $0], learner: nil, model: model, configuration: configuration)
        }
        otherMoments.check(midMoments, .refused("no level named 'slow'"), "moments for an unknown level")
        var partial = FuzzRun(model: model) { try LevelStateFile.decode(levels: ["fast": $0], learner: nil, model: model, configuration: configuration) }
        partial.check(fast, .accepted, "one level part only")
        tally(other)
        tally(otherMoments)
        tally(partial)
        let elapsed = ContinuousClock.now - start
        print("state-file fuzz, parts (\(mid.count), \(fast.count), \(midMoments.count), \(learnerPart.count) bytes): \(total.cases) cases, \(total.refused) refused, \(total.decoded) decoded and exercised, in \(elapsed)")
        #expect(total.cases > 15_000 && total.decoded > 500, "the cases reach both outcomes")
    }
}
