// Safetensors: Hugging Face's tensor container
// (https://github.com/huggingface/safetensors), the one reader and writer of
// it in this project: model files (memory-mapped, below), users' level state
// files (Memory) and the store's shape summaries (Store) all go through it.
//
// Layout: [8 bytes] N, the header length (UInt64, little-endian)
//         [N bytes] the header: a JSON object (UTF-8, may end in spaces)
//         [rest]    the data: raw little-endian tensor bytes
// The header maps each tensor name to {"dtype", "shape", "data_offsets":
// [begin, end]} (byte offsets into the data) and may hold "__metadata__", an
// object of strings.
//
// Invariants of a parsed `Safetensors.Header` (each broken rule is a
// `Safetensors.Malformed` naming what is wrong; nothing here traps on any
// input):
//   * N ≤ maxHeaderLength (100 MB, Hugging Face's limit) and N ≤ the bytes
//     after the length, both compared as UInt64 before N becomes an Int;
//   * every entry has a known dtype, a shape of integers ≥ 0 whose element
//     count × dtype size (overflow-checked) is its byte length, and offsets
//     0 ≤ begin ≤ end;
//   * the entries, sorted by begin, cover the data exactly: the first begins
//     at 0, each begins where the one before ends, the last ends at the end of
//     the file (no holes, overlaps or trailing bytes, as Hugging Face's reader
//     requires). So every entry's range lies inside the data.
// JSON numbers must be exact integers: 1.5, 1e300 or "12" are refused.
import Foundation
import Tensor

public enum Safetensors {
    /// The largest header accepted (Hugging Face's MAX_HEADER_SIZE).
    public static let maxHeaderLength: UInt64 = 100_000_000

    /// The element types of the format (those of whole bytes; the sub-byte
    /// F4/F6 types are refused as unknown).
    public enum DType: String, Sendable, CaseIterable {
        case bool = "BOOL", u8 = "U8", i8 = "I8", f8e5m2 = "F8_E5M2", f8e4m3 = "F8_E4M3", f8e8m0 = "F8_E8M0"
        case i16 = "I16", u16 = "U16", f16 = "F16", bf16 = "BF16"
        case i32 = "I32", u32 = "U32", f32 = "F32"
        case i64 = "I64", u64 = "U64", f64 = "F64", c64 = "C64"

        /// Bytes per element.
        public var byteSize: Int {
            switch self {
            case .bool, .u8, .i8, .f8e5m2, .f8e4m3, .f8e8m0: 1
            case .i16, .u16, .f16, .bf16: 2
            case .i32, .u32, .f32: 4
            case .i64, .u64, .f64, .c64: 8
            }
        }
    }

    /// One tensor of a parsed container.
    public struct Entry: Sendable, Equatable {
        public let name: String
        public let dtype: DType
        public let shape: [Int]
        /// Byte range in the data, relative to its start (`Header.dataStart`).
        public let range: Range<Int>
    }

    /// A parsed container: where its data starts and what lies there.
    public struct Header: Sendable {
        /// Entries by name.
        public let entries: [String: Entry]
        /// The "__metadata__" strings (empty when absent).
        public let metadata: [String: String]
        /// Offset of the data in the bytes parsed (8 + the header length).
        public let dataStart: Int
        /// Bytes of data (the entries cover all of them).
        public let dataCount: Int
    }

    /// Why bytes are not a safetensors container, or tensors cannot be written as one.
    public enum Malformed: Error, CustomStringConvertible, Equatable {
        case tooShort(bytes: Int)
        case headerTooLarge(length: UInt64)
        case headerPastEnd(length: UInt64, available: Int)
        case headerNotJSON
        case headerNotObject
        case badMetadata
        case badEntry(tensor: String, problem: String)
        case unknownDType(tensor: String, dtype: String)
        case sizeOverflow(tensor: String, shape: [Int])
        case sizeMismatch(tensor: String, bytes: Int, shapeBytes: Int)
        case pastEnd(tensor: String, end: Int, dataBytes: Int)
        /// Sorted by begin, `tensor` begins at `begin` where the data so far ended at `expected`.
        case notContiguous(tensor: String, begin: Int, expected: Int)
        case trailingBytes(covered: Int, dataBytes: Int)

        /// A name or value for a message: its start when long (a crafted header's names can be megabytes).
        static func short(_ s: String) -> String { s.count <= 80 ? s : s.prefix(80) + "…" }
        /// A shape or offsets for a message: its start when long.
        static func short(_ a: [Int]) -> String { a.count <= 8 ? "\(a)" : "\(Array(a.prefix(8)))… (\(a.count) values)" }

        public var description: String {
            switch self {
            case .tooShort(let n): "\(n) bytes is too short for a safetensors file (8 bytes of header length first)"
            case .headerTooLarge(let n): "the header length \(n) exceeds the limit of \(Safetensors.maxHeaderLength) bytes"
            case .headerPastEnd(let n, let a): "the header length \(n) runs past the end of the file (\(a) bytes follow the length)"
            case .headerNotJSON: "the header is not valid JSON (UTF-8)"
            case .headerNotObject: "the header is not a JSON object"
            case .badMetadata: "__metadata__ is not an object of strings"
            case .badEntry(let t, let p): "tensor '\(Self.short(t))': \(p)"
            case .unknownDType(let t, let d): "tensor '\(Self.short(t))' has an unknown dtype '\(Self.short(d))'"
            case .sizeOverflow(let t, let s): "tensor '\(Self.short(t))': the byte size of shape \(Self.short(s)) overflows"
            case .sizeMismatch(let t, let b, let s): "tensor '\(Self.short(t))' holds \(b) bytes, its shape and dtype need \(s)"
            case .pastEnd(let t, let e, let d): "the data of tensor '\(Self.short(t))' ends at byte \(e), past the end of the data (\(d) bytes)"
            case .notContiguous(let t, let b, let e):
                b > e ? "the data has a hole before tensor '\(Self.short(t))' (it begins at byte \(b), the tensors before end at \(e))"
                      : "tensor '\(Self.short(t))' overlaps the tensor before it (it begins at byte \(b), the one before ends at \(e))"
            case .trailingBytes(let c, let d): "the tensors cover \(c) bytes of data but \(d) follow the header"
            }
        }
    }

    /// Parses and checks a container held in `data`.
    public static func parse(_ data: Data) throws(Malformed) -> Header {
        let result: Result<Header, Malformed> = data.withUnsafeBytes { raw in Result { () throws(Malformed) in try parse(raw) } }
        return try result.get()
    }

    /// Parses and checks a container held in `bytes` (a memory-mapped file).
    public static func parse(_ bytes: UnsafeRawBufferPointer) throws(Malformed) -> Header {
        guard bytes.count >= 8 else { throw .tooShort(bytes: bytes.count) }
        let length = UInt64(littleEndian: bytes.loadUnaligned(as: UInt64.self))
        guard length <= maxHeaderLength else { throw .headerTooLarge(length: length) }
        guard length <= UInt64(bytes.count - 8) else { throw .headerPastEnd(length: length, available: bytes.count - 8) }
        let dataStart = 8 + Int(length), dataCount = bytes.count - dataStart
        let raw: RawHeader
        do {
            raw = try JSONDecoder().decode(RawHeader.self, from: Data(UnsafeRawBufferPointer(rebasing: bytes[8..<dataStart])))
        } catch let e as Malformed {
            throw e
        } catch DecodingError.typeMismatch(_, _), DecodingError.valueNotFound(_, _) {
            throw .headerNotObject
        } catch {
            throw .headerNotJSON
        }
        var entries: [String: Entry] = [:]
        for (name, e) in raw.entries.sorted(by: { $0.key < $1.key }) {
            guard let dtype = DType(rawValue: e.dtype) else { throw .unknownDType(tensor: name, dtype: e.dtype) }
            guard e.shape.allSatisfy({ $0 >= 0 }) else { throw .badEntry(tensor: name, problem: "shape \(Malformed.short(e.shape)) has a negative dimension") }
            guard e.offsets.count == 2 else { throw .badEntry(tensor: name, problem: "data_offsets must be two integers, got \(Malformed.short(e.offsets))") }
            let (begin, end) = (e.offsets[0], e.offsets[1])
            guard begin >= 0, begin <= end else {
                throw .badEntry(tensor: name, problem: "data_offsets [\(begin), \(end)] are not 0 ≤ begin ≤ end")
            }
            guard end <= dataCount else { throw .pastEnd(tensor: name, end: end, dataBytes: dataCount) }
            guard let size = byteSize(shape: e.shape, dtype: dtype) else { throw .sizeOverflow(tensor: name, shape: e.shape) }
            guard size == end - begin else { throw .sizeMismatch(tensor: name, bytes: end - begin, shapeBytes: size) }
            entries[name] = Entry(name: name, dtype: dtype, shape: e.shape, range: begin..<end)
        }
        // Sorted by begin (ties: empty tensors, by name), each must start where the last ended.
        var covered = 0
        for e in entries.values.sorted(by: { ($0.range.lowerBound, $0.range.upperBound, $0.name) < ($1.range.lowerBound, $1.range.upperBound, $1.name) }) {
            guard e.range.lowerBound == covered else { throw .notContiguous(tensor: e.name, begin: e.range.lowerBound, expected: covered) }
            covered = e.range.upperBound
        }
        guard covered == dataCount else { throw .trailingBytes(covered: covered, dataBytes: dataCount) }
        return Header(entries: entries, metadata: raw.metadata ?? [:], dataStart: dataStart, dataCount: dataCount)
    }

    /// Elements × bytes per element, or nil when it overflows.
    public static func byteSize(shape: [Int], dtype: DType) -> Int? {
        var n = dtype.byteSize
        for d in shape {
            let (p, overflow) = n.multipliedReportingOverflow(by: d)
            if overflow { return nil }
            n = p
        }
        return n
    }

    /// The header as JSON decodes it: entries are checked field by field so
    /// each refusal says which field of which tensor is wrong.
    struct RawHeader: Decodable {
        struct Key: CodingKey {
            let stringValue: String
            init(stringValue: String) { self.stringValue = stringValue }
            var intValue: Int? { nil }
            init?(intValue: Int) { nil }
        }
        struct RawEntry { let dtype: String, shape: [Int], offsets: [Int] }

        var metadata: [String: String]?
        var entries: [String: RawEntry] = [:]

        init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: Key.self)
            for key in c.allKeys {
                let name = key.stringValue
                if name == "__metadata__" {
                    guard let m = try? c.decode([String: String].self, forKey: key) else { throw Malformed.badMetadata }
                    metadata = m
                    continue
                }
                guard let e = try? c.nestedContainer(keyedBy: Key.self, forKey: key) else {
                    throw Malformed.badEntry(tensor: name, problem: "the entry is not an object")
                }
                func field<T: Decodable>(_ k: String, _ what: String) throws -> T {
                    guard let v = try? e.decode(T.self, forKey: Key(stringValue: k)) else {
                        throw Malformed.badEntry(tensor: name, problem: "\(k) must be \(what)")
                    }
                    return v
                }
                entries[name] = RawEntry(dtype: try field("dtype", "a string"),
                                         shape: try field("shape", "an array of integers"),
                                         offsets: try field("data_offsets", "two integers"))
            }
        }
    }

    /// One tensor to write: its bytes, little-endian, in row-major order.
    public struct Tensor: Sendable {
        public var name: String
        public var dtype: DType
        public var shape: [Int]
        public var bytes: Data

        public init(name: String, dtype: DType, shape: [Int], bytes: Data) {
            self.name = name
            self.dtype = dtype
            self.shape = shape
            self.bytes = bytes
        }

        /// An F32 tensor of `values` (little-endian hosts).
        public init(name: String, shape: [Int], values: [Float]) {
            self.init(name: name, dtype: .f32, shape: shape, bytes: values.withUnsafeBytes { Data($0) })
        }
    }

    /// The container holding `tensors`, their data in the order given, and
    /// `metadata`. The header's keys are sorted and it is padded with spaces
    /// to a multiple of 8 bytes, so the same input gives the same bytes.
    /// Refuses tensors whose bytes do not match their shape, repeated names
    /// and the reserved name "__metadata__".
    /// The tensors' dtypes and shapes, as JSON ({"name": {"dtype", "shape"}},
    /// keys sorted), for a stored part's metadata; "{}" when `data` is not a
    /// valid container.
    public static func shapesJSON(_ data: Data) -> String {
        guard let header = try? parse(data) else { return "{}" }
        let out: [String: Any] = header.entries.mapValues { ["dtype": $0.dtype.rawValue, "shape": $0.shape] }
        let json = (try? JSONSerialization.data(withJSONObject: out, options: [.sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: json, as: UTF8.self)
    }

    public static func write(_ tensors: [Tensor], metadata: [String: String]) throws(Malformed) -> Data {
        var header: [String: Any] = metadata.isEmpty ? [:] : ["__metadata__": metadata]
        var offset = 0
        for t in tensors {
            guard t.name != "__metadata__", header[t.name] == nil else {
                throw .badEntry(tensor: t.name, problem: "the name is reserved or repeated")
            }
            guard t.shape.allSatisfy({ $0 >= 0 }) else { throw .badEntry(tensor: t.name, problem: "shape \(Malformed.short(t.shape)) has a negative dimension") }
            guard let size = byteSize(shape: t.shape, dtype: t.dtype) else { throw .sizeOverflow(tensor: t.name, shape: t.shape) }
            guard size == t.bytes.count else { throw .sizeMismatch(tensor: t.name, bytes: t.bytes.count, shapeBytes: size) }
            header[t.name] = ["dtype": t.dtype.rawValue, "shape": t.shape, "data_offsets": [offset, offset + size]]
            offset += size
        }
        guard var headerData = try? JSONSerialization.data(withJSONObject: header, options: [.sortedKeys]) else {
            throw .headerNotJSON
        }
        while headerData.count % 8 != 0 { headerData.append(0x20) }
        var out = Data()
        out.reserveCapacity(8 + headerData.count + offset)
        withUnsafeBytes(of: UInt64(headerData.count).littleEndian) { out.append(contentsOf: $0) }
        out.append(headerData)
        for t in tensors { out.append(t.bytes) }
        return out
    }
}

/// A parsed, memory-mapped .safetensors model file.
public final class SafetensorsFile: Sendable {
    public let path: String
    public let entries: [String: Safetensors.Entry]
    public let metadata: [String: String]
    /// Offset of the data in the file.
    let dataStart: Int
    let file: MappedFile

    public init(path: String) throws {
        file = try MappedFile(path: path)
        self.path = path
        let header: Safetensors.Header
        do {
            header = try Safetensors.parse(file.bytes)
        } catch {
            throw ModelFileError.invalid(path: path, message: "not a valid safetensors file: \(error)")
        }
        entries = header.entries
        metadata = header.metadata
        dataStart = header.dataStart
    }

    static func weightType(_ dtype: Safetensors.DType) -> WeightType? {
        switch dtype {
        case .f32: .f32
        case .f16: .f16
        case .bf16: .bf16
        default: nil
        }
    }

    /// The tensor as a [rows, cols] weight matrix, checked against the
    /// expected shape.
    public func matrix(_ name: String, rows: Int, cols: Int) throws -> WeightMatrix {
        guard let e = entries[name] else { throw ModelFileError.missingTensor(path: path, tensor: name) }
        guard let type = Self.weightType(e.dtype) else {
            throw ModelFileError.unsupportedType(path: path, tensor: name, type: e.dtype.rawValue)
        }
        let found = e.shape.count == 1 ? [1, e.shape[0]] : e.shape
        guard found == [rows, cols] else {
            throw ModelFileError.badShape(path: path, tensor: name, expected: [rows, cols], found: e.shape)
        }
        // The parser checked the byte length against the shape; the shape is [rows, cols].
        return WeightMatrix(type: type, rows: rows, cols: cols, data: file.bytes.baseAddress! + dataStart + e.range.lowerBound,
                            owner: file)
    }

    /// A 1-D tensor as fp32 values.
    public func vector(_ name: String, count: Int) throws -> [Float] {
        try matrix(name, rows: 1, cols: count).dequantized()
    }
}
