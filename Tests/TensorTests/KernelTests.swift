// Kernel tests: every fast kernel against the naive reference beside it.
import Foundation
import CKernels
import Testing
@testable import Tensor

/// Deterministic pseudo-random numbers for test data.
struct TestRNG {
    var state: UInt64
    mutating func next() -> UInt64 {
        state = state &* 6364136223846793005 &+ 1442695040888963407
        return state >> 11
    }
    mutating func float(_ lo: Float = -1, _ hi: Float = 1) -> Float {
        lo + (hi - lo) * Float(next() % 1_000_000) / 1_000_000
    }
    mutating func byte() -> UInt8 { UInt8(truncatingIfNeeded: next()) }
}

/// Owns the bytes of a random weight matrix of a given type.
final class RandomWeights {
    let bytes: UnsafeMutableRawPointer
    let matrix: WeightMatrix

    init(_ type: WeightType, rows: Int, cols: Int, seed: UInt64) {
        var rng = TestRNG(state: seed)
        let n = type.byteCount(elements: rows * cols)
        bytes = UnsafeMutableRawPointer.allocate(byteCount: n, alignment: 64)
        func half(_ x: Float) -> UInt16 { Float16(x).bitPattern }
        switch type {
        case .f32:
            for i in 0..<(rows * cols) { bytes.storeBytes(of: rng.float(), toByteOffset: 4 * i, as: Float.self) }
        case .f16:
            for i in 0..<(rows * cols) { bytes.storeBytes(of: half(rng.float()), toByteOffset: 2 * i, as: UInt16.self) }
        case .bf16:
            for i in 0..<(rows * cols) {
                bytes.storeBytes(of: UInt16(rng.float().bitPattern >> 16), toByteOffset: 2 * i, as: UInt16.self)
            }
        case .q4_0, .q4_1, .q8_0:
            for i in 0..<n { bytes.storeBytes(of: rng.byte(), toByteOffset: i, as: UInt8.self) }
            // Sensible scales (random bytes would give NaN/Inf halves).
            for b in 0..<(rows * cols / 32) {
                let o = b * type.bytesPerBlock
                bytes.storeBytes(of: half(rng.float(0.001, 0.05)), toByteOffset: o, as: UInt16.self)
                if type == .q4_1 { bytes.storeBytes(of: half(rng.float(-0.2, 0.2)), toByteOffset: o + 2, as: UInt16.self) }
            }
        }
        matrix = WeightMatrix(type: type, rows: rows, cols: cols, data: bytes, owner: nil)
    }

    deinit { bytes.deallocate() }
}

let allTypes: [WeightType] = [.f32, .f16, .bf16, .q4_0, .q4_1, .q8_0]

@Suite("Quantised kernels")
struct QuantKernelTests {
    @Test("dequantisation equals the reference exactly", arguments: allTypes)
    func dequantize(type: WeightType) {
        let w = RandomWeights(type, rows: 7, cols: 96, seed: 1)
        let reference = Reference.dequantize(type, w.matrix.data, count: 7 * 96)
        for path in KernelPath.allCases { #expect(w.matrix.dequantized(kernels: path) == reference, "\(path)") }
    }

    // The last count reaches `.best`'s dequantise + sgemm branch (the threshold depends on the CPU).
    @Test("matmul matches the Double reference on every path", arguments: allTypes, [1, 3, 9, 40, WeightMatrix.gemmThreshold])
    func matmul(type: WeightType, n: Int) {
        // 192 columns = an even number of blocks (the AVX-512 pairs); 160 odd.
        for cols in [192, 160] {
            matmul(type: type, n: n, cols: cols)
        }
    }

    func matmul(type: WeightType, n: Int, cols: Int) {
        let rows = 70
        let w = RandomWeights(type, rows: rows, cols: cols, seed: 2)
        var rng = TestRNG(state: 3)
        let x = (0..<(n * cols)).map { _ in rng.float() }
        let reference = Reference.matmul(w.matrix, x, count: n)
        let scale = reference.map(abs).max()!
        for path in KernelPath.allCases {
            var y = [Float](repeating: .nan, count: n * rows)
            w.matrix.matmul(x, count: n, into: &y, kernels: path)
            let bad = Self.outOfBounds(y, reference, Self.bounds(path, w.matrix, x, count: n, scale: scale))
            #expect(bad.isEmpty, "\(type) n=\(n) cols=\(cols) \(path): \(bad.count) outputs, first \(bad.first ?? "")")
        }
    }

    /// Whether `path` multiplies `type` with the packed SIMD kernels here.
    static func packedPath(_ path: KernelPath, type: WeightType, n: Int) -> Bool {
        type.blockSize == 32 && path != .scalar && KernelPath.available >= 1
            && (path != .best || n < WeightMatrix.gemmThreshold)
    }

    /// The most each output of `path` may differ from the Double reference
    /// here: fp32 rounding (1e-5 of the largest |y|) plus what rounding the
    /// activations can change on the packed kernels. Those round each
    /// 32-block of x to a multiple of s = max|x_block| / q, |error| ≤ s/2:
    /// q = 2^20 − 1 (three digit planes: Q8_0 on AVX2) or q = 32639 (two
    /// planes: Q4_0 and Q4_1, and Q8_0 on AVX-512). So |Δy_r| ≤
    /// Σ_blocks error_b · Σ_{c ∈ b} |W_rc|, which a kernel that mishandles a
    /// digit, a plane or a scale exceeds.
    ///   x: [n, cols]   result: [n, rows]
    static func bounds(_ path: KernelPath, _ w: WeightMatrix, _ x: [Float], count n: Int, scale: Float) -> [Float] {
        let fp32 = 1e-5 * scale
        guard packedPath(path, type: w.type, n: n) else { return [Float](repeating: fp32, count: n * w.rows) }
        let twoPlanes = w.type != .q8_0 || min(path.level, Int32(KernelPath.available)) == 2
        let perUnit = 0.5 / (twoPlanes ? 32639.0 : 1_048_575.0)
        let nb = w.cols / 32
        var bound = [Float](repeating: 0, count: n * w.rows)
        for r in 0..<w.rows {
            let row = Reference.dequantize(w.type, w.data + r * w.rowBytes, count: w.cols)
            for j in 0..<n {
                var total = 0.0
                for b in 0..<nb {
                    let xb = x[(j * w.cols + 32 * b)..<(j * w.cols + 32 * b + 32)]
                    let error = perUnit * Double(xb.map(abs).max()!)
                    total += error * row[(32 * b)..<(32 * b + 32)].reduce(0.0) { $0 + Double(abs($1)) }
                }
                bound[j * w.rows + r] = fp32 + Float(total)
            }
        }
        return bound
    }

    /// The outputs of `y` that differ from `reference` by more than `bounds`, described.
    static func outOfBounds(_ y: [Float], _ reference: [Float], _ bounds: [Float]) -> [String] {
        zip(zip(y, reference), bounds).enumerated().compactMap { i, e in
            let ((got, want), bound) = e
            return abs(got - want) <= bound ? nil : "y[\(i)] = \(got), reference \(want), bound \(bound)"
        }
    }

    @Test("packed kernels: each vector's result is independent of the others in its batch, bit for bit",
          arguments: [WeightType.q4_0, .q4_1, .q8_0])
    func batchIndependence(type: WeightType) {
        // 83 rows: a partial last group of 16; 15 vectors: two passes of the
        // AVX-512 kernel's 8 and five of the AVX2 kernel's 3.
        let rows = 83, cols = 576, n = 15
        let w = RandomWeights(type, rows: rows, cols: cols, seed: 11)
        var rng = TestRNG(state: 12)
        // Every 37th activation 50× larger: blocks with outliers keep their own scale.
        let x = (0..<(n * cols)).map { i in rng.float() * (i % 37 == 0 ? 50 : 1) }
        for path in [KernelPath.best, .avx2] {
            var together = [Float](repeating: .nan, count: n * rows)
            w.matrix.matmul(x, count: n, into: &together, kernels: path)
            for j in 0..<n {
                var alone = [Float](repeating: .nan, count: rows)
                x.withUnsafeBufferPointer { w.matrix.matmul($0.baseAddress! + j * cols, count: 1, into: &alone, kernels: path) }
                #expect(Array(together[(j * rows)..<((j + 1) * rows)]) == alone, "\(type) \(path) vector \(j)")
            }
            let reference = Reference.matmul(w.matrix, x, count: n)
            let scale = reference.map(abs).max()!
            let bad = Self.outOfBounds(together, reference, Self.bounds(path, w.matrix, x, count: n, scale: scale))
            #expect(bad.isEmpty, "\(type) \(path): \(bad.count) outputs, first \(bad.first ?? "")")
        }
    }

    @Test("packing keeps every weight byte: packed and GGUF layouts have the same size")
    func packedSize() {
        for type in [WeightType.q4_0, .q4_1, .q8_0] {
            #expect(ck_packed_bytes(Int32(type.rawValue), 64, 96) == type.byteCount(elements: 64 * 96))
            // A partial last group is padded to 16 rows.
            #expect(ck_packed_bytes(Int32(type.rawValue), 65, 96) == type.byteCount(elements: 80 * 96))
        }
        #expect(ck_packed_bytes(Int32(WeightType.f16.rawValue), 64, 96) == 0)
    }

    @Test("the SIMD kernels are in use on this machine")
    func simdAvailable() {
        #if arch(x86_64)
        #expect(KernelPath.available >= 1, "AVX2/FMA/F16C kernels were not selected")
        #endif
    }
}

@Suite("Block kernels")
struct BlockKernelTests {
    @Test("causal attention matches the textbook definition", arguments: [(1, 0), (1, 37), (5, 3), (24, 0), (20, 11), (300, 7)])
    func attention(t: Int, start: Int) {
        let heads = 6, kvHeads = 2, hs = 16
        var rng = TestRNG(state: UInt64(t * 100 + start))
        let l = start + t
        let q = (0..<(t * heads * hs)).map { _ in rng.float() }
        let k = (0..<(l * kvHeads * hs)).map { _ in rng.float() }
        let v = (0..<(l * kvHeads * hs)).map { _ in rng.float() }
        let ref = Attention.reference(q: q, k: k, v: v, tokens: t, start: start, heads: heads, kvHeads: kvHeads, headSize: hs)
        for path in KernelPath.allCases {
            var out = [Float](repeating: .nan, count: t * heads * hs)
            Attention.causal(q: q, k: k, v: v, tokens: t, start: start, heads: heads, kvHeads: kvHeads, headSize: hs,
                             out: &out, kernels: path)
            let err = zip(out, ref).map { abs($0 - $1) }.max()!
            #expect(err < 1e-5, "\(path): max |Δ| \(err)")
        }
    }

    @Test("decode attention of several sequences (the model's head shape, long contexts split) matches the textbook definition",
          arguments: [[(1, 0)], [(1, 700)], [(1, 5), (3, 40), (1, 300), (2, 0)]])
    func decodeAttention(sequences: [(tokens: Int, start: Int)]) {
        Self.decodeAttention(sequences: sequences, heads: 9, kvHeads: 3, hs: 64)
    }

    @Test("decode attention of other head shapes (groups of 1, 2 and 4 query heads per key/value head; head sizes not a multiple of 32) matches the textbook definition",
          arguments: [(8, 2, 32), (4, 2, 96), (6, 6, 64), (5, 5, 40), (12, 3, 8)])
    func decodeAttentionShapes(shape: (heads: Int, kvHeads: Int, hs: Int)) {
        Self.decodeAttention(sequences: [(1, 37), (2, 130)], heads: shape.heads, kvHeads: shape.kvHeads, hs: shape.hs)
    }

    static func decodeAttention(sequences: [(tokens: Int, start: Int)], heads: Int, kvHeads: Int, hs: Int) {
        var rng = TestRNG(state: UInt64(sequences.count * 1000 + sequences[0].start + heads * 7 + hs))
        let data = sequences.map { s in
            let l = s.start + s.tokens
            return (q: (0..<(s.tokens * heads * hs)).map { _ in rng.float(-2, 2) },
                    k: (0..<(l * kvHeads * hs)).map { _ in rng.float() }, v: (0..<(l * kvHeads * hs)).map { _ in rng.float() })
        }
        for path in KernelPath.allCases {
            var outs = sequences.map { [Float](repeating: .nan, count: $0.tokens * heads * hs) }
            let q = data.map { UnsafeMutableBufferPointer<Float>.allocate(capacity: $0.q.count) }
            let k = data.map { UnsafeMutableBufferPointer<Float>.allocate(capacity: $0.k.count) }
            let v = data.map { UnsafeMutableBufferPointer<Float>.allocate(capacity: $0.v.count) }
            let o = outs.map { UnsafeMutableBufferPointer<Float>.allocate(capacity: $0.count) }
            defer { for b in q + k + v + o { b.deallocate() } }
            for i in data.indices {
                _ = q[i].initialize(from: data[i].q)
                _ = k[i].initialize(from: data[i].k)
                _ = v[i].initialize(from: data[i].v)
            }
            let queries = sequences.indices.map { i in
                Attention.Query(q: UnsafePointer(q[i].baseAddress!), k: UnsafePointer(k[i].baseAddress!),
                                v: UnsafePointer(v[i].baseAddress!), tokens: sequences[i].tokens, start: sequences[i].start,
                                out: o[i].baseAddress!)
            }
            Attention.decode(queries, heads: heads, kvHeads: kvHeads, headSize: hs, kernels: path)
            for i in sequences.indices {
                outs[i] = Array(o[i])
                let ref = Attention.reference(q: data[i].q, k: data[i].k, v: data[i].v, tokens: sequences[i].tokens,
                                              start: sequences[i].start, heads: heads, kvHeads: kvHeads, headSize: hs)
                let err = zip(outs[i], ref).map { abs($0 - $1) }.max()!
                #expect(err < 1e-5, "\(path) sequence \(i): max |Δ| \(err)")
            }
        }
    }

    @Test("RMSNorm matches a Double computation")
    func rmsNorm() {
        var rng = TestRNG(state: 9)
        let d = 100, t = 3
        let x = (0..<(t * d)).map { _ in rng.float(-3, 3) }
        let w = (0..<d).map { _ in rng.float(0.5, 1.5) }
        var out = [Float](repeating: 0, count: t * d)
        Ops.rmsNorm(x, weight: w, eps: 1e-5, rows: t, dim: d, out: &out)
        for r in 0..<t {
            let ms = (0..<d).reduce(0.0) { $0 + Double(x[r * d + $1]) * Double(x[r * d + $1]) } / Double(d)
            for i in 0..<d {
                let expected = Double(x[r * d + i]) / (ms + 1e-5).squareRoot() * Double(w[i])
                #expect(abs(Double(out[r * d + i]) - expected) < 1e-5)
            }
        }
    }

    @Test("RoPE layouts agree under llama.cpp's Q/K row permutation")
    func ropeLayouts() {
        let hs = 8, heads = 2
        var rng = TestRNG(state: 5)
        let x = (0..<(heads * hs)).map { _ in rng.float() }
        // llama.cpp stores HF row i (first half) at 2i and row i+HS/2 at 2i+1.
        var permuted = x
        for h in 0..<heads {
            for i in 0..<(hs / 2) {
                permuted[h * hs + 2 * i] = x[h * hs + i]
                permuted[h * hs + 2 * i + 1] = x[h * hs + i + hs / 2]
            }
        }
        var a = x, b = permuted
        Rope(headSize: hs, base: 10000, layout: .halfSplit).apply(&a, positions: [17], heads: heads)
        Rope(headSize: hs, base: 10000, layout: .adjacentPairs).apply(&b, positions: [17], heads: heads)
        for h in 0..<heads {
            for i in 0..<(hs / 2) {
                #expect(a[h * hs + i] == b[h * hs + 2 * i])
                #expect(a[h * hs + i + hs / 2] == b[h * hs + 2 * i + 1])
            }
        }
        // Position 0 is the identity.
        var c = x
        Rope(headSize: hs, base: 10000, layout: .halfSplit).apply(&c, positions: [0], heads: heads)
        #expect(c == x)
    }

    @Test("softmax sums to one and keeps order")
    func softmax() {
        var x: [Float] = [1, 3, 2, -100, 0]
        Ops.softmax(&x, x.count)
        #expect(abs(x.reduce(0, +) - 1) < 1e-6)
        #expect(x[1] > x[2] && x[2] > x[0] && x[0] > x[4] && x[4] > x[3])
    }
}
