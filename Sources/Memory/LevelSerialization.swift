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
//   accumulated_tokens, updates_applied, updates_rejected, optimizer_steps,
//   consolidations), recent_tokens (JSON: the recent requests' token ids,
//   which consolidation distils on).
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
        /// [level][block][tensor]
        var optimizerSteps: [[[Int]]]
        var consolidations: Int

        enum CodingKeys: String, CodingKey {
            case tokenCounters = "token_counters", accumulatedTokens = "accumulated_tokens"
            case updatesApplied = "updates_applied", updatesRejected = "updates_rejected"
            case optimizerSteps = "optimizer_steps", consolidations
        }
    }

    static let tensorNames = ["gain", "gate", "up", "down"]

    static func sha256(_ data: Data) -> String {
        var h = SHA256()
        data.withUnsafeBytes { h.update($0) }
        return h.finalizeHex()
    }

    static func configurationJSON(_ c: LevelConfiguration) throws -> Data {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return try e.encode(c)
    }

    /// The learner's complete state as safetensors bytes.
    public static func encode(_ learner: LevelLearner, backbone: String) throws -> Data {
        let config = learner.state.configuration
        var tensors: [(String, [Int], [Float])] = []
        for (li, level) in config.levels.enumerated() {
            let r = level.width, d = learner.state.hiddenSize
            let shapes = [[d], [r, d], [r, d], [d, r]]
            for (bi, layer) in level.layers.enumerated() {
                let b = learner.state.blocks[li][bi], acc = learner.accumulators[li][bi]
                let weights = [b.gain, b.gate, b.up, b.down], accs = [acc.gain, acc.gate, acc.up, acc.down]
                for (k, name) in tensorNames.enumerated() {
                    let base = "\(level.name).\(layer).\(name)"
                    tensors.append(("levels." + base, shapes[k], weights[k]))
                    tensors.append(("moments." + base + ".m", shapes[k], learner.moments[li][bi][k].first))
                    tensors.append(("moments." + base + ".v", shapes[k], learner.moments[li][bi][k].second))
                    tensors.append(("accumulators." + base, shapes[k], accs[k]))
                    if level.optimizer.kind == .m3 {
                        let m = learner.moments[li][bi][k]
                        tensors.append(("moments." + base + ".slow", shapes[k], m.slow))
                        tensors.append(("moments." + base + ".slow_direction", shapes[k], m.slowDirection))
                        tensors.append(("moments." + base + ".slow_sum", shapes[k], m.slowSum))
                    }
                }
            }
        }
        let counters = Counters(tokenCounters: learner.tokenCounters, accumulatedTokens: learner.accumulatedTokens,
                                updatesApplied: learner.updatesApplied, updatesRejected: learner.updatesRejected,
                                optimizerSteps: learner.moments.map { $0.map { $0.map(\.steps) } },
                                consolidations: learner.consolidations)
        let configData = try configurationJSON(config)
        let metadata: [String: String] = [
            "format": format, "version": version,
            "configuration": String(decoding: configData, as: UTF8.self),
            "configuration_sha256": sha256(configData),
            "backbone": backbone,
            "counters": String(decoding: try JSONEncoder().encode(counters), as: UTF8.self),
            "recent_tokens": String(decoding: try JSONEncoder().encode(learner.recentTokens), as: UTF8.self),
        ]
        var header: [String: Any] = ["__metadata__": metadata]
        var offset = 0
        for (name, shape, values) in tensors {
            header[name] = ["dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * values.count]]
            offset += 4 * values.count
        }
        var headerData = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while headerData.count % 8 != 0 { headerData.append(0x20) }
        var out = Data()
        withUnsafeBytes(of: UInt64(headerData.count).littleEndian) { out.append(contentsOf: $0) }
        out.append(headerData)
        for (_, _, values) in tensors {
            values.withUnsafeBytes { out.append(contentsOf: $0) }   // little-endian hosts
        }
        return out
    }

    /// Restores a learner from `encode`'s bytes. Fails, saying why, when the
    /// bytes are not such a file, were written by another format version,
    /// under another level configuration, or for another backbone.
    public static func decode(_ data: Data, model: LlamaModel, expecting configuration: LevelConfiguration? = nil)
        throws -> LevelLearner {
        func fail(_ m: String) -> Incompatible { Incompatible(description: "level state: " + m) }
        guard data.count >= 8 else { throw fail("truncated (\(data.count) bytes)") }
        let headerLength = Int(data.prefix(8).withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) })
        guard headerLength <= data.count - 8,
              let header = try? JSONSerialization.jsonObject(with: data.subdata(in: 8..<(8 + headerLength))) as? [String: Any],
              let meta = header["__metadata__"] as? [String: String]
        else { throw fail("not a safetensors file with metadata") }
        guard meta["format"] == format else { throw fail("format is '\(meta["format"] ?? "none")', expected '\(format)'") }
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
        guard let countersText = meta["counters"],
              let counters = try? JSONDecoder().decode(Counters.self, from: Data(countersText.utf8)) else {
            throw fail("the counters are missing")
        }
        let body = data.subdata(in: (8 + headerLength)..<data.count)
        func tensor(_ name: String, _ count: Int) throws -> [Float] {
            guard let e = header[name] as? [String: Any], (e["dtype"] as? String) == "F32",
                  let offs = e["data_offsets"] as? [Int], offs.count == 2, offs[1] - offs[0] == 4 * count,
                  offs[0] >= 0, offs[1] <= body.count
            else { throw fail("tensor '\(name)' is missing or malformed") }
            return body.subdata(in: offs[0]..<offs[1]).withUnsafeBytes { raw in
                (0..<count).map { raw.loadUnaligned(fromByteOffset: 4 * $0, as: Float.self) }
            }
        }
        let state = try LevelState(configuration: config, model: model.configuration)
        let learner = try LevelLearner(state: state, model: model)
        var accumulators = learner.accumulators
        var moments = learner.moments
        for (li, level) in config.levels.enumerated() {
            for (bi, layer) in level.layers.enumerated() {
                let counts = [state.blocks[li][bi].gain.count, state.blocks[li][bi].gate.count,
                              state.blocks[li][bi].up.count, state.blocks[li][bi].down.count]
                var w: [[Float]] = [], a: [[Float]] = []
                for (k, name) in tensorNames.enumerated() {
                    let base = "\(level.name).\(layer).\(name)"
                    w.append(try tensor("levels." + base, counts[k]))
                    a.append(try tensor("accumulators." + base, counts[k]))
                    moments[li][bi][k].first = try tensor("moments." + base + ".m", counts[k])
                    moments[li][bi][k].second = try tensor("moments." + base + ".v", counts[k])
                    moments[li][bi][k].steps = counters.optimizerSteps[li][bi][k]
                    if level.optimizer.kind == .m3 {
                        moments[li][bi][k].slow = try tensor("moments." + base + ".slow", counts[k])
                        moments[li][bi][k].slowDirection = try tensor("moments." + base + ".slow_direction", counts[k])
                        moments[li][bi][k].slowSum = try tensor("moments." + base + ".slow_sum", counts[k])
                    }
                }
                state.blocks[li][bi] = LevelState.Block(gain: w[0], gate: w[1], up: w[2], down: w[3])
                accumulators[li][bi] = LevelState.Block(gain: a[0], gate: a[1], up: a[2], down: a[3])
            }
        }
        learner.restore(tokenCounters: counters.tokenCounters, accumulators: accumulators,
                        accumulatedTokens: counters.accumulatedTokens, moments: moments,
                        updatesApplied: counters.updatesApplied, updatesRejected: counters.updatesRejected,
                        consolidations: counters.consolidations)
        if let recent = meta["recent_tokens"] {
            guard let tokens = try? JSONDecoder().decode([[Int]].self, from: Data(recent.utf8)) else {
                throw fail("recent_tokens is malformed")
            }
            learner.restore(recentTokens: tokens)
        }
        return learner
    }
}
