// WeightMatrix: a read-only [rows, cols] weight tensor in any supported
// format, and the matrix products the model needs from it.
import CKernels

/// A read-only 2-D weight tensor, row-major: `rows` rows of `cols` elements,
/// stored in `type`'s block layout at `data` (for example memory-mapped from a
/// GGUF file). `owner` keeps that storage alive.
public struct WeightMatrix: @unchecked Sendable {
    public let type: WeightType
    public let rows: Int
    public let cols: Int
    public let data: UnsafeRawPointer
    public let owner: AnyObject?
    /// The SIMD kernels' copy of a 32-block matrix (rows interleaved in
    /// groups of 16, `ck_pack`); nil for other formats and without SIMD.
    let packed: PackedWeights?

    /// Batches at least this large use dequantise-and-sgemm; smaller ones the
    /// quantised dot-product kernels, which read each weight byte once.
    /// Measured with `continuum bench --prompt-tokens N` (BENCHMARKS.md
    /// "Small batches on AVX2" and "Small batches with AVX-512"): the packed
    /// AVX-512 VNNI kernels beat dequantise + sgemm (all but one pair) up to 256
    /// rows on a Zen 4 EPYC (1.1–2.3× the prefill tokens/s) and tie at 512 (16
    /// was set before the packed kernels, when the two met at 16 rows); the
    /// AVX2 kernels (two digit planes, 3 vectors a pass) win up to 64–128
    /// rows on the AVX2-only EPYC and lose from 256.
    public static let gemmThreshold = KernelPath.available >= 2 ? 512 : 64

    public init(type: WeightType, rows: Int, cols: Int, data: UnsafeRawPointer, owner: AnyObject?) {
        precondition(cols % type.blockSize == 0, "row length \(cols) is not a multiple of \(type)'s block size")
        self.type = type
        self.rows = rows
        self.cols = cols
        self.data = data
        self.owner = owner
        packed = type.blockSize == 32 && KernelPath.available >= 1 ? PackedWeights(type: type, rows: rows, cols: cols, data: data) : nil
    }

    /// Bytes one row takes.
    public var rowBytes: Int { type.byteCount(elements: cols) }

    /// Bytes the whole matrix takes.
    public var byteCount: Int { rowBytes * rows }

    /// y = x · Wᵀ.
    ///   x: [n, cols] fp32, row-major
    ///   y: [n, rows] fp32, row-major (overwritten)
    ///   kernels: which kernel implementation to use (tests compare them all)
    public func matmul(_ x: UnsafePointer<Float>, count n: Int, into y: UnsafeMutablePointer<Float>,
                       kernels: KernelPath = .best) {
        if type == .f32 && kernels == .best {
            let w = data.assumingMemoryBound(to: Float.self)
            Gemm.sgemm(transB: true, m: n, n: rows, k: cols, x, lda: cols, w, ldb: cols, y, ldc: rows)
        } else if n < Self.gemmThreshold || kernels != .best {
            Self.matmulRows([self], x, count: n, into: [y], kernels: kernels)
        } else {
            gemmByChunks(x, count: n, into: y)
        }
    }

    /// Several products of the same input, y_i = x · W_iᵀ, in one parallel
    /// pass over all their rows when the batch is small (the Q/K/V and
    /// gate/up projections of a decode step), else one after another.
    ///   x: [n, cols]   outputs[i]: [n, ws[i].rows]
    public static func matmul(_ ws: [WeightMatrix], _ x: UnsafePointer<Float>, count n: Int,
                              into outputs: [UnsafeMutablePointer<Float>]) {
        precondition(ws.count == outputs.count)
        let fused = n < gemmThreshold && ws.allSatisfy { $0.type != .f32 && $0.type == ws[0].type && $0.cols == ws[0].cols }
        if fused {
            matmulRows(ws, x, count: n, into: outputs, kernels: .best)
        } else {
            for (w, y) in zip(ws, outputs) { w.matmul(x, count: n, into: y) }
        }
    }

    /// Products for a batch of sequences whose rows lie one after another,
    /// `segments[i]` rows each, such that every sequence gets the bits it
    /// would get alone: a sequence of at least `gemmThreshold` rows is
    /// multiplied on its own (sgemm's results depend on the batch's row
    /// count), runs of shorter ones together with the quantised kernels
    /// (each vector's result is independent of its batch), F32 weights one
    /// sequence at a time.
    ///   x: [Σ segments, cols]   outputs[i]: [Σ segments, ws[i].rows]
    public static func matmul(_ ws: [WeightMatrix], _ x: UnsafePointer<Float>, segments: [Int],
                              into outputs: [UnsafeMutablePointer<Float>]) {
        precondition(ws.count == outputs.count && !ws.isEmpty)
        let cols = ws[0].cols
        precondition(ws.allSatisfy { $0.cols == cols }, "one input for every matrix")
        let quantised = ws.allSatisfy { $0.type != .f32 && $0.type == ws[0].type }
        var row = 0, i = 0
        while i < segments.count {
            var n = segments[i]
            i += 1
            if n < gemmThreshold && quantised {
                while i < segments.count && segments[i] < gemmThreshold { n += segments[i]; i += 1 }
                if n > 0 { matmulRows(ws, x + row * cols, count: n, into: zip(ws, outputs).map { $1 + row * $0.rows }, kernels: .best) }
            } else if n > 0 {
                for (w, y) in zip(ws, outputs) { w.matmul(x + row * cols, count: n, into: y + row * w.rows) }
            }
            row += n
        }
    }

    /// Products with the quantised kernels: the activations are prepared
    /// once, then all matrices' rows are split across threads (in groups of
    /// 16 for packed weights, each group multiplied with every vector before
    /// the next is read). All `ws` share type and cols.
    private static func matmulRows(_ ws: [WeightMatrix], _ x: UnsafePointer<Float>, count n: Int,
                                   into outputs: [UnsafeMutablePointer<Float>], kernels: KernelPath) {
        let type = Int32(ws[0].type.rawValue), cols = ws[0].cols
        let packed = kernels.level >= 1 && ws.allSatisfy { $0.packed != nil }
        // Unpacked 32-block weights take the scalar kernels.
        let level = packed || ws[0].type.blockSize == 1 ? kernels.level : 0
        let bytes = ck_prepared_bytes(type, cols, n, level)
        let prepared = UnsafeMutableRawPointer.allocate(byteCount: max(bytes, 1), alignment: 64)
        defer { prepared.deallocate() }
        ck_prepare(type, cols, x, cols, n, prepared, level)
        let unit = packed ? Int(CK_PACK_ROWS) : 1
        var starts = [0]
        for w in ws { starts.append(starts.last! + (w.rows + unit - 1) / unit) }
        Parallel.forEachChunk(starts.last!, minChunk: 32 / unit) { range in
            for (i, w) in ws.enumerated() {
                let lo = (max(range.lowerBound, starts[i]) - starts[i]) * unit
                let hi = min((min(range.upperBound, starts[i + 1]) - starts[i]) * unit, w.rows)
                guard lo < hi else { continue }
                if packed {
                    ck_matmul_packed(type, w.packed!.bytes, cols, w.rows, lo, hi, n, prepared, outputs[i], w.rows, level)
                } else {
                    ck_matmul_rows(type, w.data, cols, lo, hi, x, cols, n, prepared, outputs[i], w.rows, level)
                }
            }
        }
    }

    /// Backward batches of at most this many rows take the transposed
    /// product of the block formats with the weights unpacked in registers
    /// (`ck_matmul_t`); larger ones dequantise row blocks for sgemm. On the
    /// benchmark machine (BENCHMARKS.md, "Learning cost") the AVX-512 kernel
    /// took 0.3–0.65× the time of dequantise + sgemm from 4 to 256 rows at
    /// one thread (about 1× at 128–256 rows with two); the AVX2 kernel wins
    /// only below about 12 rows.
    public static let transposedThreshold = KernelPath.available >= 2 ? 128 : 8

    /// Backward of `matmul` with respect to its input (the weights are
    /// frozen): dx (+)= dy · W. Small batches of the block formats read each
    /// weight block once per group of rows, unpacked in registers (the
    /// threads split W's columns); larger batches and the other formats
    /// dequantise row blocks for sgemm (F32 weights are used in place).
    ///   dy: [n, rows]   dx: [n, cols] (overwritten unless accumulate)
    ///   kernels: `.best` chooses by batch size; a lower path forces the
    ///   transposed kernel at that SIMD level (tests compare them all)
    public func matmulBackward(_ dy: UnsafePointer<Float>, count n: Int, into dx: UnsafeMutablePointer<Float>,
                               accumulate: Bool = false, kernels: KernelPath = .best) {
        let blocks = [.q4_0, .q4_1, .q8_0].contains(type)
        if kernels != .best || (blocks && n <= Self.transposedThreshold) {
            transposedProduct(dy, count: n, into: dx, accumulate: accumulate, kernels: kernels)
        } else {
            dequantizedBackward(dy, count: n, into: dx, accumulate: accumulate)
        }
    }

    /// `matmulBackward` through `ck_matmul_t`.
    func transposedProduct(_ dy: UnsafePointer<Float>, count n: Int, into dx: UnsafeMutablePointer<Float>,
                           accumulate: Bool, kernels: KernelPath) {
        if !accumulate { dx.update(repeating: 0, count: n * cols) }
        // Threads take whole 32-column blocks (any column for the element formats).
        let unit = cols % 32 == 0 ? 32 : 1
        let t = Int32(type.rawValue), level = kernels.level
        Parallel.forEachChunk(cols / unit, minChunk: max(1, 64 / unit)) { r in
            ck_matmul_t(t, data, cols, rows, r.lowerBound * unit, r.upperBound * unit, dy, rows, n, dx, cols, level)
        }
    }

    /// `matmulBackward` by dequantised row blocks and sgemm.
    func dequantizedBackward(_ dy: UnsafePointer<Float>, count n: Int, into dx: UnsafeMutablePointer<Float>,
                             accumulate: Bool) {
        forEachFloatChunk { start, count, w in
            // dx[n, cols] (+)= dy[:, start..<start+count] · W[start..<start+count, :]
            Gemm.sgemm(m: n, n: cols, k: count, dy + start, lda: rows, w, ldb: cols, beta: accumulate || start > 0 ? 1 : 0,
                       dx, ldc: cols)
        }
    }

    /// Multiplies each fp32 row block with sgemm: the prefill path.
    private func gemmByChunks(_ x: UnsafePointer<Float>, count n: Int, into y: UnsafeMutablePointer<Float>) {
        forEachFloatChunk { start, count, w in
            Gemm.sgemm(transB: true, m: n, n: count, k: cols, x, lda: cols, w, ldb: cols, y + start, ldc: rows)
        }
    }

    /// Calls body(start, count, W[start..<start+count, :] as fp32) over row
    /// blocks of at most 4 MiB, dequantised into one scratch buffer (F32
    /// weights are used in place).
    private func forEachFloatChunk(_ body: (Int, Int, UnsafePointer<Float>) -> Void) {
        let chunkRows = min(rows, max(64, (1 << 20) / cols))
        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: type == .f32 ? 1 : chunkRows * cols)
        defer { scratch.deallocate() }
        var start = 0
        while start < rows {
            let count = min(chunkRows, rows - start)
            if type == .f32 {
                body(start, count, data.assumingMemoryBound(to: Float.self) + start * cols)
            } else {
                dequantizeRows(start..<(start + count), into: scratch)
                body(start, count, scratch)
            }
            start += count
        }
    }

    /// Dequantises rows `range` into `out`: [range.count, cols] fp32.
    public func dequantizeRows(_ range: Range<Int>, into out: UnsafeMutablePointer<Float>,
                               kernels: KernelPath = .best) {
        precondition(range.lowerBound >= 0 && range.upperBound <= rows)
        let t = Int32(type.rawValue), simd = kernels.level
        Parallel.forEachChunk(range.count, minChunk: 64) { r in
            ck_dequantize_rows(t, data, cols, range.lowerBound + r.lowerBound, range.lowerBound + r.upperBound,
                               out + r.lowerBound * cols, simd)
        }
    }

    /// Dequantises one row (an embedding lookup): out is [cols] fp32.
    public func row(_ r: Int, into out: UnsafeMutablePointer<Float>) {
        precondition(r >= 0 && r < rows, "row \(r) out of range 0..<\(rows)")
        ck_dequantize_rows(Int32(type.rawValue), data, cols, r, r + 1, out, KernelPath.best.level)
    }

    /// The whole matrix as fp32, row-major [rows, cols].
    public func dequantized(kernels: KernelPath = .best) -> [Float] {
        [Float](unsafeUninitializedCapacity: rows * cols) { buf, count in
            dequantizeRows(0..<rows, into: buf.baseAddress!, kernels: kernels)
            count = rows * cols
        }
    }
}

/// A 32-block matrix repacked for the SIMD kernels (see ck_pack): the same
/// bytes as the GGUF layout, rows interleaved in groups of 16.
final class PackedWeights: @unchecked Sendable {
    let bytes: UnsafeMutableRawPointer

    init(type: WeightType, rows: Int, cols: Int, data: UnsafeRawPointer) {
        let t = Int32(type.rawValue)
        bytes = UnsafeMutableRawPointer.allocate(byteCount: ck_packed_bytes(t, rows, cols), alignment: 64)
        ck_pack(t, data, rows, cols, bytes)
    }

    deinit { bytes.deallocate() }
}

/// Which implementation of the quantised kernels to run.
public enum KernelPath: Sendable, CaseIterable, CustomStringConvertible {
    /// The best this CPU has (AVX-512 VNNI, else AVX2), sgemm for batches.
    case best
    /// At most AVX2/FMA/F16C, no sgemm.
    case avx2
    /// The portable scalar C loops, row by row on the GGUF layout (the fallback).
    case scalar

    /// The best level this CPU runs: 2 AVX-512 VNNI, 1 AVX2, 0 scalar.
    public static var available: Int { Int(ck_simd_level()) }

    var level: Int32 {
        switch self {
        case .best: 2
        case .avx2: 1
        case .scalar: 0
        }
    }

    public var description: String {
        switch self {
        case .best: "best"
        case .avx2: "avx2"
        case .scalar: "scalar"
        }
    }
}
