// Perplexity: how well the model predicts a text, token by token.
import Foundation

/// Result of scoring a token sequence.
public struct PerplexityResult: Sendable {
    /// Summed negative log-likelihood (natural log) of the scored tokens.
    public let totalNLL: Double
    /// Tokens scored (every token after the first).
    public let count: Int
    public var meanNLL: Double { count > 0 ? totalNLL / Double(count) : .nan }
    public var perplexity: Double { exp(meanNLL) }
}

extension LlamaModel {
    /// Scores every token after the first given its prefix. Texts longer than
    /// `context` are cut into windows of `context` tokens, each starting at the
    /// previous window's last token, so every token is scored exactly once.
    public func perplexity(tokens: [Int], context: Int? = nil, adapter: (any LayerAdapter)? = nil) throws -> PerplexityResult {
        let window = min(context ?? configuration.maxPositionEmbeddings, configuration.maxPositionEmbeddings)
        guard window >= 2 else { throw ModelInputError.contextOverflow(needed: 2, limit: window) }
        guard tokens.count >= 2 else { return PerplexityResult(totalNLL: 0, count: 0) }
        var total = 0.0, count = 0
        var start = 0
        let d = configuration.hiddenSize, v = configuration.vocabSize
        while start < tokens.count - 1 {
            let end = min(start + window, tokens.count)
            let chunk = Array(tokens[start..<end])
            let hidden = try hiddenStates([Step(tokens: chunk, cache: makeCache(), adapter: adapter)])
            // Logits 64 rows at a time: [64, V].
            var row = 0
            while row < chunk.count - 1 {
                let n = min(64, chunk.count - 1 - row)
                let logits = hidden.withUnsafeBufferPointer { self.logits(hidden: $0.baseAddress! + row * d, count: n) }
                for i in 0..<n {
                    let target = chunk[row + i + 1]
                    total += logits.withUnsafeBufferPointer {
                        Self.negativeLogLikelihood($0.baseAddress! + i * v, count: v, target: target)
                    }
                }
                count += n
                row += n
            }
            start = end - 1
        }
        return PerplexityResult(totalNLL: total, count: count)
    }

    /// −log softmax(logits)[target], in Double.
    ///   logits: [V]
    public static func negativeLogLikelihood(_ logits: UnsafePointer<Float>, count v: Int, target: Int) -> Double {
        var m = -Float.infinity
        for j in 0..<v where logits[j] > m { m = logits[j] }
        var s = 0.0
        for j in 0..<v { s += exp(Double(logits[j] - m)) }
        return log(s) + Double(m) - Double(logits[target])
    }
}
