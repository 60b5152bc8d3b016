// Newton–Schulz orthogonalisation (M3's update direction) against the naive
// Double reference, and the property that makes it useful.
import Testing
import TestSupport
@testable import Tensor

@Suite("Newton–Schulz")
struct OrthogonalisationTests {
    @Test("matches the Double reference on wide, tall and vector shapes",
          arguments: [(32, 576), (576, 32), (1, 576), (7, 7)])
    func reference(shape: (Int, Int)) {
        let (rows, cols) = shape
        var rng = TestRNG(state: UInt64(rows * 1000 + cols))
        let m = (0..<(rows * cols)).map { _ in rng.float() * 1e-3 }
        let fast = Ops.newtonSchulz(m, rows: rows, cols: cols)
        let slow = Reference.newtonSchulz(m.map(Double.init), rows: rows, cols: cols)
        #expect(maxRelativeError(fast, slow) < 1e-4)
    }

    @Test("the result is close to orthogonal; zero stays zero")
    func orthogonal() {
        let rows = 32, cols = 576
        var rng = TestRNG(state: 9)
        let m = (0..<(rows * cols)).map { _ in rng.float() }
        let x = Ops.newtonSchulz(m, rows: rows, cols: cols)
        // XXᵀ ≈ I: diagonal near 1, off-diagonal near 0.
        for i in 0..<rows {
            for j in 0..<rows {
                var s: Float = 0
                for k in 0..<cols { s += x[i * cols + k] * x[j * cols + k] }
                if i == j { #expect(s > 0.4 && s < 1.5, "row \(i): \(s)") } else { #expect(abs(s) < 0.2, "(\(i), \(j)): \(s)") }
            }
        }
        #expect(Ops.newtonSchulz([Float](repeating: 0, count: 12), rows: 3, cols: 4) == [Float](repeating: 0, count: 12))
    }
}
