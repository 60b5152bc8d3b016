// LearnableTokens: the one definition of which of a request's tokens are
// learned. Position i is a target, predicted from tokens 0..<i, when
// learnable[i] is true; token 0 has nothing before it to be predicted from,
// so it never is. The learner, the service (is there anything to learn, how
// many tokens did a job teach) and the benchmarks all ask here.

public enum LearnableTokens {
    /// The target positions of a request, in order.
    public static func targets(_ learnable: [Bool]) -> [Int] {
        learnable.indices.filter { $0 > 0 && learnable[$0] }
    }

    /// A raw text's flags: every token is learnable (token 0 never is a
    /// target, by the rule above).
    public static func text(count: Int) -> [Bool] {
        [Bool](repeating: true, count: count)
    }

    /// How many targets a request has.
    public static func count(_ learnable: [Bool]) -> Int {
        learnable.indices.reduce(0) { $0 + ($1 > 0 && learnable[$1] ? 1 : 0) }
    }
}
