// Helpers shared by the test targets (not part of the product).

/// Central differences of f at x, in Double.
public func numericGradient(_ x: [Double], _ f: ([Double]) -> Double, h: Double = 1e-6) -> [Double] {
    (0..<x.count).map { i in
        var p = x, m = x
        p[i] += h
        m[i] -= h
        return (f(p) - f(m)) / (2 * h)
    }
}

/// max |a − b| relative to max |b|.
public func maxRelativeError(_ a: [Float], _ b: [Double]) -> Double {
    let scale = max(b.map(abs).max() ?? 0, 1e-12)
    return zip(a, b).map { abs(Double($0) - $1) }.max()! / scale
}
