// LevelConfiguration: which continuum memory levels a user has, where they
// sit in the backbone, and how each learns (ARCHITECTURE.md §1).
import Foundation
import Yams

/// The ordered continuum memory levels (slowest first: they are applied in
/// this order after each adapted layer's frozen MLP). Decodes from JSON with
/// defaults for every optional key and is validated on decode.
public struct LevelConfiguration: Codable, Sendable, Equatable {
    public var levels: [Level]
    /// Surprise gate, in nats: a learnable token whose negative
    /// log-likelihood under the user's current model is below it contributes
    /// no gradient (it is already known; learning it again only moves the
    /// model). 0 learns every learnable token.
    public var minSurprise: Double

    enum CodingKeys: String, CodingKey {
        case levels
        case minSurprise = "min_surprise"
    }

    /// One level: a SwiGLU block h ← h + W_down(silu(W_gate u) ⊙ W_up u),
    /// u = RMSNorm(h)·gain, in each adapted layer, updated every `chunkSize`
    /// learnable tokens.
    public struct Level: Codable, Sendable, Equatable {
        /// Unique name ("mid", "fast").
        public var name: String
        /// Learnable tokens per update (the level's frequency).
        public var chunkSize: Int
        /// Hidden width r of the block.
        public var width: Int
        /// Backbone layers (0-based) the level adapts.
        public var layers: [Int]
        public var optimizer: Optimizer
        public var learningRate: Double
        /// Gradient-norm clip per update (0: off).
        public var gradientClip: Double
        /// Fraction of the level's learned contribution kept per update: the
        /// output projection is scaled by it and the gains pulled toward 1 by
        /// it (1: no decay; the fast level's forget gate is below 1).
        public var retention: Double
        /// Largest allowed norm of the level's output projection; an update
        /// that would exceed it is rejected (0: off).
        public var maxNorm: Double

        enum CodingKeys: String, CodingKey {
            case name, width, layers, optimizer, retention
            case chunkSize = "chunk_size"
            case learningRate = "learning_rate"
            case gradientClip = "gradient_clip"
            case maxNorm = "max_norm"
        }

        public init(name: String, chunkSize: Int, width: Int, layers: [Int], optimizer: Optimizer = Optimizer(),
                    learningRate: Double, gradientClip: Double = 1.0, retention: Double = 1.0, maxNorm: Double = 0) {
            self.name = name
            self.chunkSize = chunkSize
            self.width = width
            self.layers = layers
            self.optimizer = optimizer
            self.learningRate = learningRate
            self.gradientClip = gradientClip
            self.retention = retention
            self.maxNorm = maxNorm
        }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            self.init(name: try c.decode(String.self, forKey: .name),
                      chunkSize: try c.decode(Int.self, forKey: .chunkSize),
                      width: try c.decodeIfPresent(Int.self, forKey: .width) ?? 32,
                      layers: try c.decode([Int].self, forKey: .layers),
                      optimizer: try c.decodeIfPresent(Optimizer.self, forKey: .optimizer) ?? Optimizer(),
                      learningRate: try c.decodeIfPresent(Double.self, forKey: .learningRate) ?? 1e-3,
                      gradientClip: try c.decodeIfPresent(Double.self, forKey: .gradientClip) ?? 1.0,
                      retention: try c.decodeIfPresent(Double.self, forKey: .retention) ?? 1.0,
                      maxNorm: try c.decodeIfPresent(Double.self, forKey: .maxNorm) ?? 0)
        }
    }

    /// An optimiser and its hyper-parameters.
    public struct Optimizer: Codable, Sendable, Equatable {
        public enum Kind: String, Codable, Sendable {
            case adamw, sgd, m3
        }

        public var kind: Kind = .adamw
        /// Adam β1 / SGD momentum / M3 weight of g added to M⁽¹⁾.
        public var beta1: Double = 0.9
        /// Adam second-moment decay; M3 weight of g² added to V.
        public var beta2: Double = 0.999
        public var epsilon: Double = 1e-8
        public var weightDecay: Double = 0
        /// M3: slow-momentum weight β3, its refresh period (updates), the
        /// slow direction's weight α, and Newton–Schulz iterations T.
        public var beta3: Double = 0.9
        public var slowPeriod: Int = 4
        public var alpha: Double = 0.5
        public var newtonSchulzSteps: Int = 5

        enum CodingKeys: String, CodingKey {
            case kind, beta1, beta2, epsilon, beta3, alpha
            case weightDecay = "weight_decay"
            case slowPeriod = "slow_period"
            case newtonSchulzSteps = "newton_schulz_steps"
        }

        public init(kind: Kind = .adamw) {
            self.kind = kind
        }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            kind = try c.decodeIfPresent(Kind.self, forKey: .kind) ?? kind
            beta1 = try c.decodeIfPresent(Double.self, forKey: .beta1) ?? beta1
            beta2 = try c.decodeIfPresent(Double.self, forKey: .beta2) ?? beta2
            epsilon = try c.decodeIfPresent(Double.self, forKey: .epsilon) ?? epsilon
            weightDecay = try c.decodeIfPresent(Double.self, forKey: .weightDecay) ?? weightDecay
            beta3 = try c.decodeIfPresent(Double.self, forKey: .beta3) ?? beta3
            slowPeriod = try c.decodeIfPresent(Int.self, forKey: .slowPeriod) ?? slowPeriod
            alpha = try c.decodeIfPresent(Double.self, forKey: .alpha) ?? alpha
            newtonSchulzSteps = try c.decodeIfPresent(Int.self, forKey: .newtonSchulzSteps) ?? newtonSchulzSteps
        }
    }

    public struct Invalid: Error, CustomStringConvertible {
        public let description: String
    }

    public init(levels: [Level], minSurprise: Double = 0) throws {
        self.levels = levels
        self.minSurprise = minSurprise
        try validate()
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        try self.init(levels: try c.decode([Level].self, forKey: .levels),
                      minSurprise: try c.decodeIfPresent(Double.self, forKey: .minSurprise) ?? 0)
    }

    /// The defaults, chosen with `continuum bench learn` (BENCHMARKS.md,
    /// "Personalisation"): both levels on the upper half of a `layers`-layer
    /// backbone, width 32; fast every 16 learnable tokens (AdamW, 3e-3,
    /// retention 0.99 per update), mid every 128 (AdamW, 1e-3); tokens the
    /// user's model already predicts within 0.7 nats are not learned.
    /// The levels sleep consolidates: the fastest (the smallest chunk size;
    /// the first of equals) into the next slower one. Nil with fewer than two levels.
    public var consolidation: (source: Int, target: Int)? {
        let order = levels.indices.sorted { (levels[$0].chunkSize, $0) < (levels[$1].chunkSize, $1) }
        return order.count >= 2 ? (order[0], order[1]) : nil
    }

    public static func defaults(layers: Int) -> LevelConfiguration {
        let upper = Array((layers / 2)..<layers)
        return try! LevelConfiguration(levels: [
            Level(name: "mid", chunkSize: 128, width: 32, layers: upper, learningRate: 1e-3),
            Level(name: "fast", chunkSize: 16, width: 32, layers: upper, learningRate: 3e-3, retention: 0.99),
        ], minSurprise: 0.7)
    }

    /// Reads a configuration from a JSON file, or a YAML file when the name
    /// ends in .yaml or .yml (same keys).
    public static func load(path: String) throws -> LevelConfiguration {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw Invalid(description: "\(path): cannot read the level configuration")
        }
        do {
            if path.hasSuffix(".yaml") || path.hasSuffix(".yml") {
                return try YAMLDecoder().decode(LevelConfiguration.self, from: data)
            }
            return try JSONDecoder().decode(LevelConfiguration.self, from: data)
        } catch let e as Invalid {
            throw Invalid(description: "\(path): \(e.description)")
        } catch {
            throw Invalid(description: "\(path): not a level configuration: \(error)")
        }
    }

    /// Upper bounds, so that a configuration read from a file (or from a
    /// user's state file) cannot size gigabytes or overflow a counter: at most
    /// `maxLevels` levels with names of at most `maxNameBytes` UTF-8 bytes,
    /// chunks of at most `maxChunkSize` tokens, widths of at most `maxWidth`,
    /// and (against a backbone's hidden size) at most `maxParameters` level
    /// weights in all.
    public static let maxLevels = 16
    public static let maxNameBytes = 64
    public static let maxChunkSize = 1 << 24
    public static let maxWidth = 4096
    public static let maxParameters = 1 << 24

    /// Checks the values on their own; `validate(layers:hiddenSize:)` also
    /// checks them against a backbone.
    public func validate() throws {
        func fail(_ m: String) throws -> Never { throw Invalid(description: "invalid level configuration: " + m) }
        if levels.isEmpty { try fail("at least one level is needed") }
        if levels.count > Self.maxLevels { try fail("at most \(Self.maxLevels) levels are allowed, got \(levels.count)") }
        if !(minSurprise >= 0 && minSurprise.isFinite) { try fail("min_surprise must be ≥ 0 (nats), got \(minSurprise)") }
        var names = Set<String>()
        for l in levels {
            let n = "level '\(l.name)'"
            if l.name.isEmpty { try fail("every level needs a name") }
            if l.name.utf8.count > Self.maxNameBytes { try fail("level names must have at most \(Self.maxNameBytes) bytes") }
            if !names.insert(l.name).inserted { try fail("two levels are named '\(l.name)'") }
            if l.chunkSize < 1 || l.chunkSize > Self.maxChunkSize {
                try fail("\(n): chunk_size must be in 1...\(Self.maxChunkSize), got \(l.chunkSize)")
            }
            if l.width < 1 || l.width > Self.maxWidth { try fail("\(n): width must be in 1...\(Self.maxWidth), got \(l.width)") }
            if l.layers.isEmpty { try fail("\(n): layers must list at least one layer") }
            if Set(l.layers).count != l.layers.count { try fail("\(n): layers lists a layer twice") }
            if l.layers.contains(where: { $0 < 0 }) { try fail("\(n): layer indices must be ≥ 0") }
            if !(l.learningRate > 0 && l.learningRate.isFinite) { try fail("\(n): learning_rate must be > 0, got \(l.learningRate)") }
            if !(l.gradientClip >= 0 && l.gradientClip.isFinite) { try fail("\(n): gradient_clip must be finite and ≥ 0, got \(l.gradientClip)") }
            if !(l.retention > 0 && l.retention <= 1) { try fail("\(n): retention must be in (0, 1], got \(l.retention)") }
            if !(l.maxNorm >= 0 && l.maxNorm.isFinite) { try fail("\(n): max_norm must be finite and ≥ 0, got \(l.maxNorm)") }
            let o = l.optimizer
            if !(0..<1).contains(o.beta1) || !(0..<1).contains(o.beta2) || !(0..<1).contains(o.beta3) {
                try fail("\(n): optimizer betas must be in [0, 1)")
            }
            if !(o.epsilon > 0 && o.epsilon.isFinite) { try fail("\(n): optimizer epsilon must be finite and > 0") }
            if o.slowPeriod < 1 { try fail("\(n): optimizer slow_period must be ≥ 1") }
            if !(0...20).contains(o.newtonSchulzSteps) { try fail("\(n): optimizer newton_schulz_steps must be in 0...20") }
            if !(o.alpha >= 0 && o.alpha.isFinite) || !(o.weightDecay >= 0 && o.weightDecay.isFinite) {
                try fail("\(n): optimizer alpha and weight_decay must be finite and ≥ 0")
            }
        }
    }

    /// Checks the levels fit a backbone of `layers` layers and, given its
    /// hidden size D, that they hold at most `maxParameters` weights (a
    /// block has D(1 + 3R): gain, gate, up, down).
    public func validate(layers: Int, hiddenSize: Int? = nil) throws {
        try validate()
        for l in levels {
            if let bad = l.layers.first(where: { $0 >= layers }) {
                throw Invalid(description: "invalid level configuration: level '\(l.name)' adapts layer \(bad), but the model has \(layers) layers (0..<\(layers))")
            }
        }
        if let d = hiddenSize {
            // Each factor is bounded (layers unique and < the model's, width ≤ maxWidth), so no product overflows.
            let parameters = levels.reduce(0) { $0 + $1.layers.count * d * (1 + 3 * $1.width) }
            if parameters > Self.maxParameters {
                throw Invalid(description: "invalid level configuration: the levels would hold \(parameters) weights over this backbone, more than \(Self.maxParameters)")
            }
        }
    }
}
