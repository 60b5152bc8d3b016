// Level state files, decoding (the format is described in LevelSerialization.swift).
//
// Decoding trusts nothing (a file may come from anyone, through the import
// endpoint or the CLI) and checks everything before the learner is used, so a
// state that decodes can learn, reset, consolidate, be audited and be
// exported again without trapping. Every refusal is an `Incompatible` saying
// what is wrong:
//   * the container is valid safetensors (the codec's rules);
//   * the metadata holds only the keys of its format (all of them, but a
//     full file's recent_tokens), each value at most 4 MiB; format, version,
//     checksum and backbone match; the configuration decodes,
//     passes LevelConfiguration's validation (with its upper bounds) and fits
//     the backbone (layers, at most maxParameters weights);
//   * the tensors are exactly the names of the format (no more, no fewer),
//     each F32 with exactly its shape, every value finite, second moments
//     (which AdamW and M3 take the square root of) ≥ 0;
//   * counters: one per level (blocks × 4 optimizer steps per level), every
//     one in 0...2^53 (so counting on cannot overflow), accumulated_tokens <
//     chunk_size and ≤ token_counters, rejected_non_finite + rejected_norm ≤
//     updates_rejected (both or neither present), no optimizer steps in a
//     learner part;
//   * recent_tokens: every id in 0..<vocabulary, at most
//     LevelLearner.recentLimit tokens and contexts in all.
import Foundation
import Model

extension LevelStateFile {
    /// The largest counter a file may hold: beyond any real count, and far
    /// enough below Int.max that adding a request's tokens cannot overflow.
    static let maxCount = 1 << 53
    /// The longest metadata value accepted (real ones are a few KB).
    static let maxMetadataBytes = 4 << 20

    static func fail(_ m: String) -> Incompatible { Incompatible(description: "level state: " + m) }

    /// A metadata value for a message: "none" when absent, its start when long.
    static func quoted(_ s: String?) -> String {
        guard let s else { return "none" }
        return s.count <= 80 ? s : s.prefix(80) + "…"
    }

    /// Runs `body`, turning any other error into an `Incompatible` (the
    /// checks below throw their own; this keeps the promise for the rest).
    static func refusing<T>(_ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let e as Incompatible {
            throw e
        } catch {
            throw fail("\(error)")
        }
    }

    /// A safetensors file of one of the formats above whose metadata has been
    /// checked: format, version, keys, configuration (valid, fitting the
    /// backbone, equal to the expected one when given) and backbone.
    struct Parsed {
        let data: Data
        let header: Safetensors.Header
        let configuration: LevelConfiguration
        var meta: [String: String] { header.metadata }

        init(_ data: Data, format expectedFormat: String, model: LlamaModel, expecting configuration: LevelConfiguration?) throws {
            let header: Safetensors.Header
            do {
                header = try Safetensors.parse(data)
            } catch {
                throw fail("malformed safetensors file: \(error)")
            }
            let meta = header.metadata
            if meta.keys.contains(where: { $0.utf8.count > 64 }) { throw fail("a metadata key is longer than 64 bytes") }
            if let long = meta.keys.sorted().first(where: { meta[$0]!.utf8.count > maxMetadataBytes }) {
                throw fail("metadata '\(long)' is longer than \(maxMetadataBytes) bytes")
            }
            guard meta["format"] == expectedFormat else {
                throw fail("format is '\(quoted(meta["format"]))', expected '\(expectedFormat)'")
            }
            guard meta["version"] == version else { throw fail("version \(quoted(meta["version"])) is not supported (this build reads \(version))") }
            let allowed = metadataKeys(expectedFormat)
            if let extra = meta.keys.sorted().first(where: { !allowed.contains($0) }) {
                throw fail("unexpected metadata key '\(extra)' for format '\(expectedFormat)'")
            }
            guard let configText = meta["configuration"], meta["configuration_sha256"] == sha256(Data(configText.utf8)) else {
                throw fail("the configuration is missing or does not match its checksum")
            }
            let config: LevelConfiguration
            do {
                config = try JSONDecoder().decode(LevelConfiguration.self, from: Data(configText.utf8))
            } catch let e as LevelConfiguration.Invalid {
                throw fail("the configuration is not valid: \(e.description)")
            } catch {
                throw fail("the configuration is not a level configuration")
            }
            if let expected = configuration, try configurationJSON(expected) != configurationJSON(config) {
                throw fail("made under a different level configuration (sha256 \(meta["configuration_sha256"]!.prefix(12))…, expected \(sha256(try configurationJSON(expected)).prefix(12))…)")
            }
            guard meta["backbone"] == model.fingerprint else {
                throw fail("made for another backbone (\(quoted(meta["backbone"])), this one is \(model.fingerprint))")
            }
            do {
                try config.validate(layers: model.configuration.numHiddenLayers, hiddenSize: model.configuration.hiddenSize)
            } catch {
                throw fail("the configuration does not fit this backbone: \(error)")
            }
            self.data = data
            self.header = header
            self.configuration = config
        }

        /// Checks the file holds exactly these tensors.
        func expect(_ slots: [Slot]) throws {
            let names = Set(slots.map(\.name))
            if let extra = header.entries.keys.sorted().first(where: { !names.contains($0) }) {
                throw fail("unexpected tensor '\(quoted(extra))'")
            }
            if let missing = slots.first(where: { header.entries[$0.name] == nil }) {
                throw fail("tensor '\(missing.name)' is missing")
            }
        }

        /// A slot's values: F32 of exactly its shape, every value finite, and
        /// ≥ 0 when `nonNegative`.
        func tensor(_ s: Slot, nonNegative: Bool) throws -> [Float] {
            guard let e = header.entries[s.name] else { throw fail("tensor '\(s.name)' is missing") }
            guard e.dtype == .f32 else { throw fail("tensor '\(s.name)' has dtype \(e.dtype.rawValue), expected F32") }
            guard e.shape == s.shape else {
                let found = e.shape.count <= 8 ? "\(e.shape)" : "of \(e.shape.count) dimensions"
                throw fail("tensor '\(s.name)' has shape \(found), expected \(s.shape)")
            }
            // The codec checked the range: inside the data, 4 bytes per element of the shape.
            let count = e.range.count / 4, start = header.dataStart + e.range.lowerBound
            let values = data.withUnsafeBytes { raw in
                [Float](unsafeUninitializedCapacity: count) { buffer, n in
                    for i in 0..<count {
                        buffer[i] = Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: start + 4 * i, as: UInt32.self)))
                    }
                    n = count
                }
            }
            if let i = values.firstIndex(where: { !$0.isFinite }) {
                throw fail("tensor '\(s.name)' holds a non-finite value (\(values[i]) at \(i))")
            }
            if nonNegative, let i = values.firstIndex(where: { $0 < 0 }) {
                throw fail("tensor '\(s.name)' is a second moment but holds a negative value (\(values[i]) at \(i))")
            }
            return values
        }

        func decoded<T: Decodable>(_ key: String, as type: T.Type) throws -> T {
            guard let text = meta[key], let value = try? JSONDecoder().decode(T.self, from: Data(text.utf8)) else {
                throw fail("\(key) is missing or malformed")
            }
            return value
        }
    }

    /// Reads the slots' tensors from `p` into the learner's arrays (not yet
    /// into the learner: the caller restores them once everything is checked).
    static func read(_ p: Parsed, _ slots: [Slot], blocks: inout [[LevelState.Block]], moments: inout [[[OptimizerMoments]]],
                     accumulators: inout [[LevelState.Block]]) throws {
        for s in slots {
            let kind = p.configuration.levels[s.level].optimizer.kind
            let v = try p.tensor(s, nonNegative: s.role == .second && kind != .sgd)
            switch s.role {
            case .weight: blocks[s.level][s.block].set(s.tensor, v)
            case .first: moments[s.level][s.block][s.tensor].first = v
            case .second: moments[s.level][s.block][s.tensor].second = v
            case .slow: moments[s.level][s.block][s.tensor].slow = v
            case .slowDirection: moments[s.level][s.block][s.tensor].slowDirection = v
            case .slowSum: moments[s.level][s.block][s.tensor].slowSum = v
            case .accumulator: accumulators[s.level][s.block].set(s.tensor, v)
            }
        }
    }

    /// Checks one count.
    static func checkCount(_ v: Int, _ what: @autoclosure () -> String) throws {
        guard v >= 0 && v <= maxCount else { throw fail("\(what()) is \(v), outside 0...2^53") }
    }

    /// Checks a level's optimizer steps: [block][tensor], each a count.
    static func checkSteps(_ steps: [[Int]], level: LevelConfiguration.Level) throws {
        guard steps.count == level.layers.count, steps.allSatisfy({ $0.count == tensorNames.count }) else {
            throw fail("optimizer steps of level '\(level.name)' do not match its layers")
        }
        for s in steps.joined() { try checkCount(s, "an optimizer step count of level '\(level.name)'") }
    }

    /// Checks counters against the configuration (with optimizer steps when
    /// `steps`, without them for a learner part).
    static func check(_ c: Counters, _ config: LevelConfiguration, steps: Bool) throws {
        let n = config.levels.count
        guard (c.rejectedNonFinite == nil) == (c.rejectedNorm == nil) else {
            throw fail("counters: rejected_non_finite and rejected_norm must come together")
        }
        let lists = [("token_counters", c.tokenCounters), ("accumulated_tokens", c.accumulatedTokens),
                     ("updates_applied", c.updatesApplied), ("updates_rejected", c.updatesRejected)]
            + [c.rejectedNonFinite.map { ("rejected_non_finite", $0) }, c.rejectedNorm.map { ("rejected_norm", $0) }].compactMap { $0 }
        for (key, values) in lists {
            guard values.count == n else { throw fail("counters: \(key) has \(values.count) values for \(n) levels") }
            for v in values { try checkCount(v, "counters: a value of \(key)") }
        }
        try checkCount(c.consolidations, "counters: consolidations")
        if let flags = c.nonFiniteChunk, flags.count != n {
            throw fail("counters: non_finite_chunk has \(flags.count) values for \(n) levels")
        }
        for (l, level) in config.levels.enumerated() {
            let a = c.accumulatedTokens[l], t = c.tokenCounters[l]
            guard a < level.chunkSize, a <= t else {
                throw fail("counters: level '\(level.name)' has \(a) accumulated tokens, which must be below its chunk_size (\(level.chunkSize)) and at most its token counter (\(t))")
            }
            if let nonFinite = c.rejectedNonFinite?[l], let norm = c.rejectedNorm?[l], nonFinite + norm > c.updatesRejected[l] {
                throw fail("counters: level '\(level.name)' has more rejections by guard (\(nonFinite) + \(norm)) than rejections (\(c.updatesRejected[l]))")
            }
        }
        if steps {
            guard c.optimizerSteps.count == n else { throw fail("counters: optimizer_steps do not match the levels") }
            for (l, level) in config.levels.enumerated() { try checkSteps(c.optimizerSteps[l], level: level) }
        } else if !c.optimizerSteps.isEmpty {
            throw fail("counters: a learner part must hold no optimizer_steps")
        }
    }

    /// Checks recent contexts: ids of the vocabulary, within the learner's limit.
    static func checkRecent(_ recent: [[Int]], vocabulary v: Int) throws {
        let total = recent.reduce(0) { $0 + $1.count }
        guard recent.count <= LevelLearner.recentLimit, total <= LevelLearner.recentLimit else {
            throw fail("recent_tokens holds \(total) tokens in \(recent.count) contexts, more than \(LevelLearner.recentLimit)")
        }
        if let bad = recent.joined().first(where: { $0 < 0 || $0 >= v }) {
            throw fail("recent_tokens holds token id \(bad), outside the vocabulary (0..<\(v))")
        }
    }

    /// Counters of a learner that has learned nothing.
    static func zeroCounters(_ config: LevelConfiguration) -> Counters {
        let zeros = [Int](repeating: 0, count: config.levels.count)
        return Counters(tokenCounters: zeros, accumulatedTokens: zeros, updatesApplied: zeros, updatesRejected: zeros,
                        rejectedNonFinite: zeros, rejectedNorm: zeros, nonFiniteChunk: zeros.map { _ in false },
                        optimizerSteps: [], consolidations: 0)
    }

    /// A learner of `state` holding what was read; `steps[level][block][tensor]` (nil: a level not read, steps 0).
    static func learner(_ state: LevelState, model: LlamaModel, blocks: [[LevelState.Block]], moments: [[[OptimizerMoments]]],
                        steps: [[[Int]]?], accumulators: [[LevelState.Block]], counters c: Counters, recent: [[Int]])
        throws -> LevelLearner {
        let learner = try LevelLearner(state: state, model: model)
        var moments = moments
        for (l, s) in steps.enumerated() {
            guard let s else { continue }
            for b in s.indices { for k in s[b].indices { moments[l][b][k].steps = s[b][k] } }
        }
        state.blocks = blocks
        learner.restore(tokenCounters: c.tokenCounters, accumulators: accumulators, accumulatedTokens: c.accumulatedTokens,
                        moments: moments, updatesApplied: c.updatesApplied, updatesRejected: c.updatesRejected,
                        consolidations: c.consolidations, rejectedNonFinite: c.rejectedNonFinite, rejectedNorm: c.rejectedNorm,
                        nonFiniteChunk: c.nonFiniteChunk)
        learner.restore(recentTokens: recent)
        return learner
    }

    /// Restores a learner from `encode`'s bytes. Fails with `Incompatible`,
    /// saying why, when the bytes are not such a file, were written by
    /// another format version, under another level configuration or for
    /// another backbone, or break any rule of the file header above.
    public static func decode(_ data: Data, model: LlamaModel, expecting configuration: LevelConfiguration? = nil)
        throws -> LevelLearner {
        try refusing {
            let p = try Parsed(data, format: format, model: model, expecting: configuration)
            let config = p.configuration, d = model.configuration.hiddenSize
            let all = config.levels.indices.flatMap {
                slots(config, hiddenSize: d, level: $0, weights: true, moments: true, accumulators: true)
            }
            try p.expect(all)
            let counters = try p.decoded("counters", as: Counters.self)
            try check(counters, config, steps: true)
            let recent = p.meta["recent_tokens"] == nil ? [] : try p.decoded("recent_tokens", as: [[Int]].self)
            try checkRecent(recent, vocabulary: model.configuration.vocabSize)
            let state = try LevelState(configuration: config, model: model.configuration)
            var blocks = state.blocks, moments = fresh(state), accumulators = state.zeroGradients()
            try read(p, all, blocks: &blocks, moments: &moments, accumulators: &accumulators)
            return try learner(state, model: model, blocks: blocks, moments: moments, steps: counters.optimizerSteps,
                               accumulators: accumulators, counters: counters, recent: recent)
        }
    }

    /// Fresh optimizer moments for every block of `state`.
    static func fresh(_ state: LevelState) -> [[[OptimizerMoments]]] {
        zip(state.blocks, state.configuration.levels).map { blocks, level in
            blocks.map { b in b.tensors.map { OptimizerMoments(count: $0.count, kind: level.optimizer.kind) } }
        }
    }

    /// Restores a learner from parts (`encodeLevel` and `encodeMoments` per
    /// level name, `encodeLearner`), all made under `configuration` for this
    /// backbone. A level without a part starts fresh, a level without moments
    /// with a fresh optimizer (unless its part is one written before moments
    /// had parts of their own, which holds them); without a learner part the
    /// counters start at zero, and a learner part without accumulators
    /// leaves them at zero. Every part is checked as `decode` checks a whole
    /// file; a failure is an `Incompatible`.
    public static func decode(levels: [String: Data], moments momentParts: [String: Data] = [:], learner learnerPart: Data?,
                              model: LlamaModel, configuration: LevelConfiguration) throws -> LevelLearner {
        try refusing {
            let state: LevelState
            do {
                state = try LevelState(configuration: configuration, model: model.configuration)
            } catch {
                throw fail("the configuration does not fit this backbone: \(error)")
            }
            let d = model.configuration.hiddenSize
            var blocks = state.blocks, moments = fresh(state), accumulators = state.zeroGradients()
            var steps = [[[Int]]?](repeating: nil, count: configuration.levels.count)
            func index(_ name: String) throws -> Int {
                guard let li = configuration.levels.firstIndex(where: { $0.name == name }) else {
                    throw fail("no level named '\(name)' in the configuration")
                }
                return li
            }
            func parsed(_ data: Data, _ format: String, level name: String) throws -> Parsed {
                let p = try Parsed(data, format: format, model: model, expecting: configuration)
                guard p.meta["level"] == name else { throw fail("the part for level '\(name)' holds level '\(quoted(p.meta["level"]))'") }
                return p
            }
            func readSteps(_ p: Parsed, _ li: Int) throws {
                let levelSteps = try p.decoded("optimizer_steps", as: [[Int]].self)
                try checkSteps(levelSteps, level: configuration.levels[li])
                steps[li] = levelSteps
            }
            for (name, data) in levels.sorted(by: { $0.key < $1.key }) {
                let li = try index(name)
                let p = try parsed(data, levelFormat, level: name)
                // Weights only, or (written before moments had parts of their own) weights and moments.
                let weights = slots(configuration, hiddenSize: d, level: li, weights: true, moments: false, accumulators: false)
                let both = slots(configuration, hiddenSize: d, level: li, weights: true, moments: true, accumulators: false)
                let legacy = p.header.entries.count == both.count && p.meta["optimizer_steps"] != nil
                try p.expect(legacy ? both : weights)
                if legacy { try readSteps(p, li) } else if p.meta["optimizer_steps"] != nil {
                    throw fail("the part for level '\(name)' holds optimizer_steps but no moments")
                }
                try read(p, legacy ? both : weights, blocks: &blocks, moments: &moments, accumulators: &accumulators)
            }
            for (name, data) in momentParts.sorted(by: { $0.key < $1.key }) {
                let li = try index(name)
                let p = try parsed(data, momentsFormat, level: name)
                let s = slots(configuration, hiddenSize: d, level: li, weights: false, moments: true, accumulators: false)
                try p.expect(s)
                try readSteps(p, li)
                try read(p, s, blocks: &blocks, moments: &moments, accumulators: &accumulators)
            }
            var counters = zeroCounters(configuration), recent: [[Int]] = []
            if let data = learnerPart {
                let p = try Parsed(data, format: learnerFormat, model: model, expecting: configuration)
                let s = configuration.levels.indices.flatMap {
                    slots(configuration, hiddenSize: d, level: $0, weights: false, moments: false, accumulators: true)
                }
                // All the accumulators (the user's current part) or none (a version's).
                let withAccumulators = !p.header.entries.isEmpty
                try p.expect(withAccumulators ? s : [])
                counters = try p.decoded("counters", as: Counters.self)
                try check(counters, configuration, steps: false)
                recent = try p.decoded("recent_tokens", as: [[Int]].self)
                try checkRecent(recent, vocabulary: model.configuration.vocabSize)
                if withAccumulators {
                    try read(p, s, blocks: &blocks, moments: &moments, accumulators: &accumulators)
                } else {
                    // The open chunks start empty: no tokens are counted as accumulated in them.
                    counters.accumulatedTokens = counters.accumulatedTokens.map { _ in 0 }
                    counters.nonFiniteChunk = counters.nonFiniteChunk?.map { _ in false }
                }
            }
            return try learner(state, model: model, blocks: blocks, moments: moments, steps: steps,
                               accumulators: accumulators, counters: counters, recent: recent)
        }
    }
}

extension LevelState.Block {
    /// Replaces tensor k of `tensors`' order (gain, gate, up, down).
    mutating func set(_ k: Int, _ values: [Float]) {
        switch k {
        case 0: gain = values
        case 1: gate = values
        case 2: up = values
        default: down = values
        }
    }
}
