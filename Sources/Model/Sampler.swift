// Sampler: turns logits into the next token (greedy, temperature, top-k,
// top-p, min-p, repetition penalty), reproducibly for a given seed.
import Foundation

/// How to pick tokens. Decodes from JSON with defaults and validates.
public struct SamplingParameters: Codable, Sendable, Equatable {
    /// 0 means greedy (argmax).
    public var temperature: Float = 0.8
    /// Keep the k most likely tokens; 0 disables.
    public var topK: Int = 40
    /// Keep the smallest set of tokens whose probability reaches p; 1 disables.
    public var topP: Float = 0.95
    /// Drop tokens less likely than minP × the most likely one; 0 disables.
    public var minP: Float = 0.05
    /// Hugging Face-style penalty on tokens already in the context; 1 disables.
    public var repetitionPenalty: Float = 1.0
    /// How many recent tokens the repetition penalty looks at.
    public var repetitionWindow: Int = 64
    /// Same seed, same prompt, same parameters ⇒ same text. nil: random.
    public var seed: UInt64?
    /// Most tokens to generate.
    public var maxTokens: Int = 256
    /// Generation stops before the first occurrence of any of these.
    public var stop: [String] = []

    public init() {}

    enum CodingKeys: String, CodingKey {
        case temperature, topK = "top_k", topP = "top_p", minP = "min_p"
        case repetitionPenalty = "repetition_penalty", repetitionWindow = "repetition_window"
        case seed, maxTokens = "max_tokens", stop
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        temperature = try c.decodeIfPresent(Float.self, forKey: .temperature) ?? temperature
        topK = try c.decodeIfPresent(Int.self, forKey: .topK) ?? topK
        topP = try c.decodeIfPresent(Float.self, forKey: .topP) ?? topP
        minP = try c.decodeIfPresent(Float.self, forKey: .minP) ?? minP
        repetitionPenalty = try c.decodeIfPresent(Float.self, forKey: .repetitionPenalty) ?? repetitionPenalty
        repetitionWindow = try c.decodeIfPresent(Int.self, forKey: .repetitionWindow) ?? repetitionWindow
        seed = try c.decodeIfPresent(UInt64.self, forKey: .seed)
        maxTokens = try c.decodeIfPresent(Int.self, forKey: .maxTokens) ?? maxTokens
        stop = try c.decodeIfPresent([String].self, forKey: .stop) ?? stop
        try validate()
    }

    public struct Invalid: Error, CustomStringConvertible {
        public let parameter: String
        public let description: String
    }

    public func validate() throws {
        func fail(_ p: String, _ m: String) throws -> Never { throw Invalid(parameter: p, description: "\(p): \(m)") }
        if !(temperature >= 0 && temperature.isFinite) { try fail("temperature", "must be a finite number ≥ 0, got \(temperature)") }
        if topK < 0 { try fail("top_k", "must be ≥ 0, got \(topK)") }
        if !(topP > 0 && topP <= 1) { try fail("top_p", "must be in (0, 1], got \(topP)") }
        if !(minP >= 0 && minP < 1) { try fail("min_p", "must be in [0, 1), got \(minP)") }
        if !(repetitionPenalty > 0 && repetitionPenalty.isFinite) { try fail("repetition_penalty", "must be > 0, got \(repetitionPenalty)") }
        if repetitionWindow < 0 { try fail("repetition_window", "must be ≥ 0, got \(repetitionWindow)") }
        if maxTokens < 0 { try fail("max_tokens", "must be ≥ 0, got \(maxTokens)") }
        if stop.contains(where: \.isEmpty) { try fail("stop", "stop strings must not be empty") }
    }
}

/// xoshiro256** seeded through SplitMix64: fast, reproducible.
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    private var s: (UInt64, UInt64, UInt64, UInt64)

    public init(seed: UInt64) {
        var z = seed
        func splitmix() -> UInt64 {
            z &+= 0x9E37_79B9_7F4A_7C15
            var x = z
            x = (x ^ (x >> 30)) &* 0xBF58_476D_1CE4_E5B9
            x = (x ^ (x >> 27)) &* 0x94D0_49BB_1331_11EB
            return x ^ (x >> 31)
        }
        s = (splitmix(), splitmix(), splitmix(), splitmix())
    }

    public mutating func next() -> UInt64 {
        let result = ((s.1 &* 5) << 7 | (s.1 &* 5) >> 57) &* 9
        let t = s.1 << 17
        s.2 ^= s.0
        s.3 ^= s.1
        s.1 ^= s.2
        s.0 ^= s.3
        s.2 ^= t
        s.3 = s.3 << 45 | s.3 >> 19
        return result
    }
}

/// Picks tokens from logits according to `SamplingParameters`.
public struct Sampler: Sendable {
    public let parameters: SamplingParameters
    private var rng: SeededGenerator

    public init(_ parameters: SamplingParameters) {
        self.parameters = parameters
        rng = SeededGenerator(seed: parameters.seed ?? UInt64.random(in: 0...UInt64.max))
    }

    /// Index of the largest value (the first on ties).
    public static func argmax(_ x: [Float]) -> Int {
        var best = 0
        for i in 1..<x.count where x[i] > x[best] { best = i }
        return best
    }

    /// Indices of the k largest values, largest first (lower index first on
    /// ties): one pass with a small sorted buffer.
    static func topK(_ x: [Float], _ k: Int) -> [Int] {
        var best: [Int] = []
        best.reserveCapacity(k + 1)
        for i in x.indices {
            if best.count == k, x[i] <= x[best[k - 1]] { continue }
            var j = best.count
            while j > 0 && x[best[j - 1]] < x[i] { j -= 1 }
            best.insert(i, at: j)
            if best.count > k { best.removeLast() }
        }
        return best
    }

    /// The next token given the logits [V] and the tokens so far.
    public mutating func sample(_ logits: [Float], history: [Int]) -> Int {
        let p = parameters
        var logits = logits
        if p.repetitionPenalty != 1 && p.repetitionWindow > 0 {
            for t in Set(history.suffix(p.repetitionWindow)) where t >= 0 && t < logits.count {
                logits[t] = logits[t] > 0 ? logits[t] / p.repetitionPenalty : logits[t] * p.repetitionPenalty
            }
        }
        if p.temperature == 0 { return Self.argmax(logits) }
        let order: [Int]
        if p.topK > 0 && p.topK < logits.count {
            order = Self.topK(logits, p.topK)
        } else {
            order = logits.indices.sorted { logits[$0] > logits[$1] || (logits[$0] == logits[$1] && $0 < $1) }
        }
        let maxLogit = logits[order[0]]
        var probs = order.map { Double(expf((logits[$0] - maxLogit) / p.temperature)) }
        var total = probs.reduce(0, +)
        var keep = probs.count
        if p.topP < 1 {
            var cum = 0.0
            for (i, q) in probs.enumerated() {
                cum += q / total
                if cum >= Double(p.topP) { keep = i + 1; break }
            }
        }
        if p.minP > 0 {
            let floor = probs[0] * Double(p.minP)
            keep = min(keep, probs.prefix(keep).firstIndex { $0 < floor } ?? keep)
        }
        keep = max(1, keep)
        probs.removeLast(probs.count - keep)
        total = probs.reduce(0, +)
        var u = Double(rng.next() >> 11) / Double(1 << 53) * total
        for (i, q) in probs.enumerated() {
            u -= q
            if u < 0 { return order[i] }
        }
        return order[keep - 1]
    }
}
