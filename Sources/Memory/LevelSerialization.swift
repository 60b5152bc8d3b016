// Level state serialisation: a user's complete learning state as one
// safetensors file (https://github.com/huggingface/safetensors), so any
// safetensors reader can open it.
//
// Tensors (F32, little-endian), for level N and its i-th adapted layer L:
//   levels.N.L.{gain,gate,up,down}          weights     [D] [R,D] [R,D] [D,R]
//   moments.N.L.{gain,gate,up,down}.{m,v}   optimizer moments (same shapes)
//   accumulators.N.L.{gain,gate,up,down}    Σ gradients of the open chunk
//   moments.N.L.{…}.{slow,slow_direction,slow_sum}   M3 levels only: M⁽²⁾,
//                                           O⁽²⁾ and Σ g of the open slow period
// __metadata__ (strings):
//   format "continuum-levels", version "1",
//   configuration (the LevelConfiguration as JSON), configuration_sha256,
//   backbone (LlamaModel.fingerprint), counters (JSON: token_counters,
//   accumulated_tokens, updates_applied, updates_rejected, rejected_non_finite,
//   rejected_norm, optimizer_steps, consolidations), recent_tokens (JSON: the recent requests' token ids,
//   which consolidation distils on).
//
// The same state can be split into parts, which is how the store keeps it
// (a level's row is written only when that level changes):
//   a level part   format "continuum-level": levels.N.* and moments.N.* of one
//                  level; metadata level (its name), optimizer_steps (JSON,
//                  [block][tensor]) plus configuration/backbone as above;
//   a learner part format "continuum-learner": accumulators.*; metadata
//                  counters (optimizer_steps left empty) and recent_tokens.
// A level without a part is a fresh level, a missing learner part fresh counters.
import Foundation
import Model

public enum LevelStateFile {
    public static let format = "continuum-levels"
    public static let version = "1"

    public struct Incompatible: Error, CustomStringConvertible {
        public let description: String
    }

    struct Counters: Codable, Equatable {
        var tokenCounters: [Int]
        var accumulatedTokens: [Int]
        var updatesApplied: [Int]
        var updatesRejected: [Int]
        /// Of the rejections, by guard (absent in states written before they were counted).
        var rejectedNonFinite: [Int]?
        var rejectedNorm: [Int]?
        /// [level][block][tensor]
        var optimizerSteps: [[[Int]]]
        var consolidations: Int

        enum CodingKeys: String, CodingKey {
            case tokenCounters = "token_counters", accumulatedTokens = "accumulated_tokens"
            case updatesApplied = "updates_applied", updatesRejected = "updates_rejected"
            case rejectedNonFinite = "rejected_non_finite", rejectedNorm = "rejected_norm"
            case optimizerSteps = "optimizer_steps", consolidations
        }
    }

    static let tensorNames = ["gain", "gate", "up", "down"]

    /// Hex SHA-256 of bytes (configuration checksums; import provenance).
    public static func sha256(_ data: Data) -> String {
        var h = SHA256()
        data.withUnsafeBytes { h.update($0) }
        return h.finalizeHex()
    }

    static func configurationJSON(_ c: LevelConfiguration) throws -> Data {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return try e.encode(c)
    }

    public static let levelFormat = "continuum-level"
    public static let learnerFormat = "continuum-learner"

    typealias Tensor = (name: String, shape: [Int], values: [Float])

    /// Level l's tensors: weights, and moments when `moments`; accumulators when `accumulators`.
    static func tensors(_ learner: LevelLearner, level li: Int, weights: Bool, accumulators: Bool) -> [Tensor] {
        let level = learner.state.configuration.levels[li]
        let r = level.width, d = learner.state.hiddenSize
        let shapes = [[d], [r, d], [r, d], [d, r]]
        var out: [Tensor] = []
        for (bi, layer) in level.layers.enumerated() {
            let b = learner.state.blocks[li][bi], acc = learner.accumulators[li][bi]
            let w = b.tensors, a = acc.tensors
            for (k, name) in tensorNames.enumerated() {
                let base = "\(level.name).\(layer).\(name)"
                if weights {
                    let m = learner.moments[li][bi][k]
                    out.append(("levels." + base, shapes[k], w[k]))
                    out.append(("moments." + base + ".m", shapes[k], m.first))
                    out.append(("moments." + base + ".v", shapes[k], m.second))
                    if level.optimizer.kind == .m3 {
                        out.append(("moments." + base + ".slow", shapes[k], m.slow))
                        out.append(("moments." + base + ".slow_direction", shapes[k], m.slowDirection))
                        out.append(("moments." + base + ".slow_sum", shapes[k], m.slowSum))
                    }
                }
                if accumulators { out.append(("accumulators." + base, shapes[k], a[k])) }
            }
        }
        return out
    }

    static func counters(_ learner: LevelLearner, steps: Bool) -> Counters {
        Counters(tokenCounters: learner.tokenCounters, accumulatedTokens: learner.accumulatedTokens,
                 updatesApplied: learner.updatesApplied, updatesRejected: learner.updatesRejected,
                 rejectedNonFinite: learner.rejectedNonFinite, rejectedNorm: learner.rejectedNorm,
                 optimizerSteps: steps ? learner.moments.map { $0.map { $0.map(\.steps) } } : [],
                 consolidations: learner.consolidations)
    }

    static func commonMetadata(_ learner: LevelLearner, format: String, backbone: String) throws -> [String: String] {
        let configData = try configurationJSON(learner.state.configuration)
        return ["format": format, "version": version,
                "configuration": String(decoding: configData, as: UTF8.self),
                "configuration_sha256": sha256(configData), "backbone": backbone]
    }

    static func json(_ value: some Encodable) throws -> String {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return String(decoding: try e.encode(value), as: UTF8.self)
    }

    /// The learner's complete state as safetensors bytes.
    public static func encode(_ learner: LevelLearner, backbone: String) throws -> Data {
        try encode(learner, format: format, weights: true, backbone: backbone)
    }

    /// One level's weights and optimizer moments (the part written when that level changes).
    public static func encodeLevel(_ learner: LevelLearner, level li: Int, backbone: String) throws -> Data {
        var meta = try commonMetadata(learner, format: levelFormat, backbone: backbone)
        meta["level"] = learner.state.configuration.levels[li].name
        meta["optimizer_steps"] = try json(learner.moments[li].map { $0.map(\.steps) })
        return try write(tensors(learner, level: li, weights: true, accumulators: false), metadata: meta)
    }

    /// Everything but the levels' weights and moments: accumulators, counters
    /// and recent contexts (the part that changes with every learned request).
    public static func encodeLearner(_ learner: LevelLearner, backbone: String) throws -> Data {
        try encode(learner, format: learnerFormat, weights: false, backbone: backbone)
    }

    /// Accumulators, counters and recent contexts, with every level's weights
    /// and moments (and optimizer steps in the counters) when `weights`.
    static func encode(_ learner: LevelLearner, format: String, weights: Bool, backbone: String) throws -> Data {
        var meta = try commonMetadata(learner, format: format, backbone: backbone)
        meta["counters"] = try json(counters(learner, steps: weights))
        meta["recent_tokens"] = try json(learner.recentTokens)
        let all = learner.state.configuration.levels.indices.flatMap {
            tensors(learner, level: $0, weights: weights, accumulators: true)
        }
        return try write(all, metadata: meta)
    }

    static func write(_ tensors: [Tensor], metadata: [String: String]) throws -> Data {
        var header: [String: Any] = ["__metadata__": metadata]
        var offset = 0
        for t in tensors {
            header[t.name] = ["dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + 4 * t.values.count]]
            offset += 4 * t.values.count
        }
        var headerData = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while headerData.count % 8 != 0 { headerData.append(0x20) }
        var out = Data()
        out.reserveCapacity(8 + headerData.count + offset)
        withUnsafeBytes(of: UInt64(headerData.count).littleEndian) { out.append(contentsOf: $0) }
        out.append(headerData)
        for t in tensors {
            t.values.withUnsafeBytes { out.append(contentsOf: $0) }   // little-endian hosts
        }
        return out
    }

    static func fail(_ m: String) -> Incompatible { Incompatible(description: "level state: " + m) }

    /// A parsed safetensors file of one of the formats above, checked against
    /// the configuration (when given) and the backbone.
    struct Parsed {
        let header: [String: Any]
        let meta: [String: String]
        let body: Data
        let configuration: LevelConfiguration

        init(_ data: Data, format expectedFormat: String, model: LlamaModel, expecting configuration: LevelConfiguration?) throws {
            guard data.count >= 8 else { throw fail("truncated (\(data.count) bytes)") }
            let headerLength = Int(data.prefix(8).withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) })
            guard headerLength <= data.count - 8,
                  let header = try? JSONSerialization.jsonObject(with: data.subdata(in: 8..<(8 + headerLength))) as? [String: Any],
                  let meta = header["__metadata__"] as? [String: String]
            else { throw fail("not a safetensors file with metadata") }
            guard meta["format"] == expectedFormat else {
                throw fail("format is '\(meta["format"] ?? "none")', expected '\(expectedFormat)'")
            }
            guard meta["version"] == version else { throw fail("version \(meta["version"] ?? "none") is not supported (this build reads \(version))") }
            guard let configText = meta["configuration"], meta["configuration_sha256"] == sha256(Data(configText.utf8)) else {
                throw fail("the configuration is missing or does not match its checksum")
            }
            let config = try JSONDecoder().decode(LevelConfiguration.self, from: Data(configText.utf8))
            if let expected = configuration, try configurationJSON(expected) != configurationJSON(config) {
                throw fail("made under a different level configuration (sha256 \(meta["configuration_sha256"]!.prefix(12))…, expected \(sha256(try configurationJSON(expected)).prefix(12))…)")
            }
            guard meta["backbone"] == model.fingerprint else {
                throw fail("made for another backbone (\(meta["backbone"] ?? "none"), this one is \(model.fingerprint))")
            }
            self.header = header
            self.meta = meta
            self.configuration = config
            body = data.subdata(in: (8 + headerLength)..<data.count)
        }

        func tensor(_ name: String, _ count: Int) throws -> [Float] {
            guard let e = header[name] as? [String: Any], (e["dtype"] as? String) == "F32",
                  let offs = e["data_offsets"] as? [Int], offs.count == 2, offs[1] - offs[0] == 4 * count,
                  offs[0] >= 0, offs[1] <= body.count
            else { throw fail("tensor '\(name)' is missing or malformed") }
            return body.withUnsafeBytes { raw in
                [Float](unsafeUninitializedCapacity: count) { buffer, n in
                    for i in 0..<count { buffer[i] = raw.loadUnaligned(fromByteOffset: offs[0] + 4 * i, as: Float.self) }
                    n = count
                }
            }
        }

        func decoded<T: Decodable>(_ key: String, as type: T.Type) throws -> T {
            guard let text = meta[key], let value = try? JSONDecoder().decode(T.self, from: Data(text.utf8)) else {
                throw fail("\(key) is missing or malformed")
            }
            return value
        }
    }

    /// Level li's weights and moments from `p` into the learner's arrays.
    static func readLevel(_ p: Parsed, level li: Int, steps: [[Int]], state: LevelState,
                          moments: inout [[[OptimizerMoments]]]) throws {
        let level = state.configuration.levels[li]
        guard steps.count == level.layers.count, steps.allSatisfy({ $0.count == tensorNames.count }) else {
            throw fail("optimizer steps of level '\(level.name)' do not match its layers")
        }
        for (bi, layer) in level.layers.enumerated() {
            let counts = state.blocks[li][bi].tensors.map(\.count)
            var w: [[Float]] = []
            for (k, name) in tensorNames.enumerated() {
                let base = "\(level.name).\(layer).\(name)"
                w.append(try p.tensor("levels." + base, counts[k]))
                moments[li][bi][k].first = try p.tensor("moments." + base + ".m", counts[k])
                moments[li][bi][k].second = try p.tensor("moments." + base + ".v", counts[k])
                moments[li][bi][k].steps = steps[bi][k]
                if level.optimizer.kind == .m3 {
                    moments[li][bi][k].slow = try p.tensor("moments." + base + ".slow", counts[k])
                    moments[li][bi][k].slowDirection = try p.tensor("moments." + base + ".slow_direction", counts[k])
                    moments[li][bi][k].slowSum = try p.tensor("moments." + base + ".slow_sum", counts[k])
                }
            }
            state.blocks[li][bi] = LevelState.Block(tensors: w)
        }
    }

    static func readAccumulators(_ p: Parsed, state: LevelState) throws -> [[LevelState.Block]] {
        try state.configuration.levels.enumerated().map { li, level in
            try level.layers.enumerated().map { bi, layer in
                let counts = state.blocks[li][bi].tensors.map(\.count)
                return LevelState.Block(tensors: try tensorNames.enumerated().map { k, name in
                    try p.tensor("accumulators.\(level.name).\(layer).\(name)", counts[k])
                })
            }
        }
    }

    /// Restores a learner from `encode`'s bytes. Fails, saying why, when the
    /// bytes are not such a file, were written by another format version,
    /// under another level configuration, or for another backbone.
    public static func decode(_ data: Data, model: LlamaModel, expecting configuration: LevelConfiguration? = nil)
        throws -> LevelLearner {
        let p = try Parsed(data, format: format, model: model, expecting: configuration)
        let counters = try p.decoded("counters", as: Counters.self)
        let state = try LevelState(configuration: p.configuration, model: model.configuration)
        let learner = try LevelLearner(state: state, model: model)
        var moments = learner.moments
        guard counters.optimizerSteps.count == p.configuration.levels.count else { throw fail("the counters do not match the levels") }
        for li in p.configuration.levels.indices {
            try readLevel(p, level: li, steps: counters.optimizerSteps[li], state: state, moments: &moments)
        }
        try restoreCounters(learner, counters, accumulators: try readAccumulators(p, state: state), moments: moments)
        if p.meta["recent_tokens"] != nil { learner.restore(recentTokens: try p.decoded("recent_tokens", as: [[Int]].self)) }
        return learner
    }

    static func restoreCounters(_ learner: LevelLearner, _ c: Counters, accumulators: [[LevelState.Block]],
                                moments: [[[OptimizerMoments]]]) throws {
        let n = learner.state.configuration.levels.count
        guard [c.tokenCounters, c.accumulatedTokens, c.updatesApplied, c.updatesRejected].allSatisfy({ $0.count == n }) else {
            throw fail("the counters do not match the levels")
        }
        learner.restore(tokenCounters: c.tokenCounters, accumulators: accumulators, accumulatedTokens: c.accumulatedTokens,
                        moments: moments, updatesApplied: c.updatesApplied, updatesRejected: c.updatesRejected,
                        consolidations: c.consolidations, rejectedNonFinite: c.rejectedNonFinite, rejectedNorm: c.rejectedNorm)
    }

    /// Restores a learner from parts (`encodeLevel` per level name,
    /// `encodeLearner`), all made under `configuration` for this backbone. A
    /// level without a part starts fresh; without a learner part the counters
    /// and accumulators start at zero.
    public static func decode(levels: [String: Data], learner learnerPart: Data?, model: LlamaModel,
                              configuration: LevelConfiguration) throws -> LevelLearner {
        let state = try LevelState(configuration: configuration, model: model.configuration)
        let learner = try LevelLearner(state: state, model: model)
        var moments = learner.moments
        for (name, data) in levels {
            guard let li = configuration.levels.firstIndex(where: { $0.name == name }) else {
                throw fail("no level named '\(name)' in the configuration")
            }
            let p = try Parsed(data, format: levelFormat, model: model, expecting: configuration)
            guard p.meta["level"] == name else { throw fail("the part for level '\(name)' holds level '\(p.meta["level"] ?? "none")'") }
            try readLevel(p, level: li, steps: try p.decoded("optimizer_steps", as: [[Int]].self), state: state, moments: &moments)
        }
        if let data = learnerPart {
            let p = try Parsed(data, format: learnerFormat, model: model, expecting: configuration)
            try restoreCounters(learner, try p.decoded("counters", as: Counters.self),
                                accumulators: try readAccumulators(p, state: state), moments: moments)
            learner.restore(recentTokens: try p.decoded("recent_tokens", as: [[Int]].self))
        } else {
            learner.restore(tokenCounters: learner.tokenCounters, accumulators: learner.accumulators,
                            accumulatedTokens: learner.accumulatedTokens, moments: moments,
                            updatesApplied: learner.updatesApplied, updatesRejected: learner.updatesRejected,
                            consolidations: 0, rejectedNonFinite: learner.rejectedNonFinite, rejectedNorm: learner.rejectedNorm)
        }
        return learner
    }
}
