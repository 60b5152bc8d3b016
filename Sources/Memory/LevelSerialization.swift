// Level state serialisation: a user's complete learning state as one
// safetensors file (https://github.com/huggingface/safetensors), so any
// safetensors reader can open it. The container is read and written by
// Model's `Safetensors` codec; this file fixes what is inside it.
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
// The same state can be split into parts, which is how the store keeps it:
//   a level part   format "continuum-level": levels.N.* (the weights) of one
//                  level; metadata level (its name) plus configuration/backbone
//                  as above. A version names one per stored level, written
//                  only when that level changes. (Parts written before the
//                  optimizer's state moved out also hold moments.N.* and
//                  optimizer_steps; they still decode.)
//   a moments part format "continuum-moments": moments.N.* of one level;
//                  metadata level, optimizer_steps (JSON, [block][tensor]).
//                  The optimizer's state: kept for the current version only.
//   a learner part format "continuum-learner": counters (optimizer_steps left
//                  empty) and recent_tokens, with accumulators.* of every
//                  level (the user's current part) or none (a version's part:
//                  its open chunks start empty when it is restored).
// A level without a part is a fresh level, a level without moments a fresh
// optimizer, a missing learner part fresh counters.
//
// Decoding, which checks every value of a file, is in LevelStateDecoding.swift.
import Digest
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
        /// Per level: the open chunk met a non-finite gradient (absent in states written before it was kept).
        var nonFiniteChunk: [Bool]?
        /// [level][block][tensor]
        var optimizerSteps: [[[Int]]]
        var consolidations: Int

        enum CodingKeys: String, CodingKey {
            case tokenCounters = "token_counters", accumulatedTokens = "accumulated_tokens"
            case updatesApplied = "updates_applied", updatesRejected = "updates_rejected"
            case rejectedNonFinite = "rejected_non_finite", rejectedNorm = "rejected_norm", nonFiniteChunk = "non_finite_chunk"
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
    public static let momentsFormat = "continuum-moments"
    public static let learnerFormat = "continuum-learner"

    /// What a tensor of the file holds for its block and tensor.
    enum Role {
        case weight, first, second, slow, slowDirection, slowSum, accumulator
    }

    /// One tensor of a file: tensor k (gain, gate, up, down) of block b of level l, in `role`.
    struct Slot {
        let name: String
        let shape: [Int]
        let level, block, tensor: Int
        let role: Role
    }

    /// Level l's tensors in the order they are written: per block and
    /// tensor, the weight when `weights`, its optimizer moments when
    /// `moments`, the accumulator when `accumulators`. Writing and reading
    /// both follow it, so the names a file must hold are exactly those a file
    /// is written with.
    static func slots(_ c: LevelConfiguration, hiddenSize d: Int, level l: Int, weights: Bool, moments: Bool,
                      accumulators: Bool) -> [Slot] {
        let level = c.levels[l], r = level.width
        let shapes = [[d], [r, d], [r, d], [d, r]]
        var out: [Slot] = []
        for (b, layer) in level.layers.enumerated() {
            for (k, name) in tensorNames.enumerated() {
                let base = "\(level.name).\(layer).\(name)"
                func add(_ name: String, _ role: Role) {
                    out.append(Slot(name: name, shape: shapes[k], level: l, block: b, tensor: k, role: role))
                }
                if weights { add("levels." + base, .weight) }
                if moments {
                    add("moments." + base + ".m", .first)
                    add("moments." + base + ".v", .second)
                    if level.optimizer.kind == .m3 {
                        add("moments." + base + ".slow", .slow)
                        add("moments." + base + ".slow_direction", .slowDirection)
                        add("moments." + base + ".slow_sum", .slowSum)
                    }
                }
                if accumulators { add("accumulators." + base, .accumulator) }
            }
        }
        return out
    }

    /// The learner's values for a slot.
    static func values(_ learner: LevelLearner, _ s: Slot) -> [Float] {
        let m = learner.moments[s.level][s.block][s.tensor]
        return switch s.role {
        case .weight: learner.state.blocks[s.level][s.block].tensors[s.tensor]
        case .first: m.first
        case .second: m.second
        case .slow: m.slow
        case .slowDirection: m.slowDirection
        case .slowSum: m.slowSum
        case .accumulator: learner.accumulators[s.level][s.block].tensors[s.tensor]
        }
    }

    static func counters(_ learner: LevelLearner, steps: Bool) -> Counters {
        Counters(tokenCounters: learner.tokenCounters, accumulatedTokens: learner.accumulatedTokens,
                 updatesApplied: learner.updatesApplied, updatesRejected: learner.updatesRejected,
                 rejectedNonFinite: learner.rejectedNonFinite, rejectedNorm: learner.rejectedNorm,
                 nonFiniteChunk: learner.nonFiniteChunk,
                 optimizerSteps: steps ? learner.moments.map { $0.map { $0.map(\.steps) } } : [],
                 consolidations: learner.consolidations)
    }

    static let commonKeys: Set = ["format", "version", "configuration", "configuration_sha256", "backbone"]

    /// The metadata keys a file of `format` may hold.
    static func metadataKeys(_ format: String) -> Set<String> {
        switch format {
        case levelFormat, momentsFormat: commonKeys.union(["level", "optimizer_steps"])
        default: commonKeys.union(["counters", "recent_tokens"])
        }
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
        try encode(learner, format: format, weights: true, accumulators: true, backbone: backbone)
    }

    /// One level's weights (the part a version names, written when that level changes).
    public static func encodeLevel(_ learner: LevelLearner, level li: Int, backbone: String) throws -> Data {
        var meta = try commonMetadata(learner, format: levelFormat, backbone: backbone)
        meta["level"] = learner.state.configuration.levels[li].name
        let s = slots(learner.state.configuration, hiddenSize: learner.state.hiddenSize, level: li, weights: true, moments: false,
                      accumulators: false)
        return try write(learner, s, metadata: meta)
    }

    /// One level's optimizer moments and step counts (the current version's
    /// optimizer state, written when that level takes a step).
    public static func encodeMoments(_ learner: LevelLearner, level li: Int, backbone: String) throws -> Data {
        var meta = try commonMetadata(learner, format: momentsFormat, backbone: backbone)
        meta["level"] = learner.state.configuration.levels[li].name
        meta["optimizer_steps"] = try json(learner.moments[li].map { $0.map(\.steps) })
        let s = slots(learner.state.configuration, hiddenSize: learner.state.hiddenSize, level: li, weights: false, moments: true,
                      accumulators: false)
        return try write(learner, s, metadata: meta)
    }

    /// Everything but the levels' weights and moments: counters and recent
    /// contexts, with the open chunks' accumulators when `accumulators` (the
    /// user's current part; a version keeps its part without them).
    public static func encodeLearner(_ learner: LevelLearner, accumulators: Bool = true, backbone: String) throws -> Data {
        try encode(learner, format: learnerFormat, weights: false, accumulators: accumulators, backbone: backbone)
    }

    /// Counters and recent contexts, with the accumulators when
    /// `accumulators`, and every level's weights and moments (and optimizer
    /// steps in the counters) when `weights`.
    static func encode(_ learner: LevelLearner, format: String, weights: Bool, accumulators: Bool = true,
                       backbone: String) throws -> Data {
        var meta = try commonMetadata(learner, format: format, backbone: backbone)
        meta["counters"] = try json(counters(learner, steps: weights))
        meta["recent_tokens"] = try json(learner.recentTokens)
        let c = learner.state.configuration
        let all = c.levels.indices.flatMap {
            slots(c, hiddenSize: learner.state.hiddenSize, level: $0, weights: weights, moments: weights, accumulators: accumulators)
        }
        return try write(learner, all, metadata: meta)
    }

    static func write(_ learner: LevelLearner, _ slots: [Slot], metadata: [String: String]) throws -> Data {
        try Safetensors.write(slots.map { Safetensors.Tensor(name: $0.name, shape: $0.shape, values: values(learner, $0)) },
                              metadata: metadata)
    }
}
