// GGUF: llama.cpp's model file format (versions 2 and 3): metadata and
// memory-mapped tensors. Spec: ggml/docs/gguf.md.
import Tensor

/// One metadata value of a GGUF file.
public enum GGUFValue: Sendable, Equatable {
    case uint(UInt64)
    case int(Int64)
    case float(Double)
    case bool(Bool)
    case string(String)
    case array([GGUFValue])

    public var intValue: Int? {
        switch self {
        case .uint(let v): v <= UInt64(Int.max) ? Int(v) : nil
        case .int(let v): Int(v)
        default: nil
        }
    }

    public var doubleValue: Double? {
        switch self {
        case .float(let v): v
        case .uint(let v): Double(v)
        case .int(let v): Double(v)
        default: nil
        }
    }

    public var stringValue: String? { if case .string(let s) = self { s } else { nil } }
    public var boolValue: Bool? { if case .bool(let b) = self { b } else { nil } }
    public var arrayValue: [GGUFValue]? { if case .array(let a) = self { a } else { nil } }
}

/// Where a tensor sits in a GGUF file.
public struct GGUFTensorInfo: Sendable {
    public let name: String
    /// ggml order: dims[0] is the contiguous (row) length.
    public let dims: [Int]
    public let rawType: UInt32
    /// Byte offset from the start of the file.
    public let offset: Int
}

/// A parsed, memory-mapped GGUF file.
public final class GGUFFile: Sendable {
    public let path: String
    public let version: UInt32
    public let metadata: [String: GGUFValue]
    public let tensors: [String: GGUFTensorInfo]
    /// Tensor names in file order.
    public let tensorNames: [String]
    let file: MappedFile

    public init(path: String) throws {
        file = try MappedFile(path: path)
        self.path = path
        var r = ByteReader(bytes: file.bytes, path: path)
        guard file.bytes.count >= 4 else { throw ModelFileError.truncated(path: path, what: "the header") }
        let magic = try r.readBytes(4, "the magic bytes")
        guard Array(magic) == Array("GGUF".utf8) else {
            let shown = magic.map { b in (32..<127).contains(b) ? String(UnicodeScalar(b)) : "\\x" + String(b, radix: 16) }
            throw ModelFileError.badMagic(path: path, found: "\"" + shown.joined() + "\"")
        }
        version = try r.read(UInt32.self, "the version")
        guard version == 2 || version == 3 else { throw ModelFileError.unsupportedVersion(path: path, version: version) }
        let tensorCount = try r.read(UInt64.self, "the tensor count")
        let kvCount = try r.read(UInt64.self, "the metadata count")
        // Each entry takes at least 8 bytes; reject counts the file cannot hold.
        guard tensorCount <= UInt64(r.remaining / 8), kvCount <= UInt64(r.remaining / 8) else {
            throw ModelFileError.truncated(path: path, what: "the header (\(tensorCount) tensors, \(kvCount) keys)")
        }
        var meta: [String: GGUFValue] = [:]
        for i in 0..<Int(kvCount) {
            let key = try Self.readString(&r, "metadata key #\(i)")
            let type = try r.read(UInt32.self, "the type of metadata '\(key)'")
            meta[key] = try Self.readValue(&r, type: type, key: key, depth: 0)
        }
        metadata = meta
        var infos: [String: GGUFTensorInfo] = [:]
        var names: [String] = []
        var rawInfos: [(String, [Int], UInt32, UInt64)] = []
        for i in 0..<Int(tensorCount) {
            let name = try Self.readString(&r, "tensor name #\(i)")
            let nDims = try r.read(UInt32.self, "the dimension count of '\(name)'")
            guard nDims >= 1, nDims <= 4 else {
                throw ModelFileError.invalid(path: path, message: "tensor '\(name)' has \(nDims) dimensions (1 to 4 allowed)")
            }
            var dims: [Int] = []
            for _ in 0..<nDims {
                let d = try r.read(UInt64.self, "the shape of '\(name)'")
                guard d > 0, d < 1 << 40 else {
                    throw ModelFileError.invalid(path: path, message: "tensor '\(name)' has dimension \(d)")
                }
                dims.append(Int(d))
            }
            let type = try r.read(UInt32.self, "the type of '\(name)'")
            let off = try r.read(UInt64.self, "the offset of '\(name)'")
            rawInfos.append((name, dims, type, off))
        }
        let alignment = meta["general.alignment"]?.intValue ?? 32
        guard alignment > 0, alignment & (alignment - 1) == 0 else {
            throw ModelFileError.invalid(path: path, message: "general.alignment \(alignment) is not a power of two")
        }
        let dataStart = (r.offset + alignment - 1) / alignment * alignment
        for (name, dims, type, off) in rawInfos {
            guard off < UInt64(Int.max / 2) else { throw ModelFileError.truncated(path: path, what: "tensor '\(name)'") }
            let info = GGUFTensorInfo(name: name, dims: dims, rawType: type, offset: dataStart + Int(off))
            if let t = WeightType(rawValue: type) {
                let count = dims.reduce(1, *)
                guard dims[0] % t.blockSize == 0 else {
                    throw ModelFileError.invalid(path: path, message: "tensor '\(name)': row length \(dims[0]) is not a multiple of \(t)'s block size \(t.blockSize)")
                }
                guard info.offset + t.byteCount(elements: count) <= file.bytes.count else {
                    throw ModelFileError.truncated(path: path, what: "the data of tensor '\(name)'")
                }
            }
            infos[name] = info
            names.append(name)
        }
        tensors = infos
        tensorNames = names
    }

    private static func readString(_ r: inout ByteReader, _ what: String) throws -> String {
        let n = try r.read(UInt64.self, what)
        guard n <= UInt64(r.remaining) else { throw ModelFileError.truncated(path: r.path, what: what) }
        let b = try r.readBytes(Int(n), what)
        return String(decoding: b, as: UTF8.self)
    }

    private static func readValue(_ r: inout ByteReader, type: UInt32, key: String, depth: Int) throws -> GGUFValue {
        let what = "the value of metadata '\(key)'"
        switch type {
        case 0: return .uint(UInt64(try r.read(UInt8.self, what)))
        case 1: return .int(Int64(try r.read(Int8.self, what)))
        case 2: return .uint(UInt64(try r.read(UInt16.self, what)))
        case 3: return .int(Int64(try r.read(Int16.self, what)))
        case 4: return .uint(UInt64(try r.read(UInt32.self, what)))
        case 5: return .int(Int64(try r.read(Int32.self, what)))
        case 6: return .float(Double(Float(bitPattern: try r.read(UInt32.self, what))))
        case 7: return .bool(try r.read(UInt8.self, what) != 0)
        case 8: return .string(try readString(&r, what))
        case 9:
            guard depth < 4 else { throw ModelFileError.invalid(path: r.path, message: "metadata '\(key)' nests arrays too deeply") }
            let itemType = try r.read(UInt32.self, what)
            let n = try r.read(UInt64.self, what)
            guard n <= UInt64(r.remaining) else { throw ModelFileError.truncated(path: r.path, what: what) }
            var items: [GGUFValue] = []
            items.reserveCapacity(Int(n))
            for _ in 0..<Int(n) { items.append(try readValue(&r, type: itemType, key: key, depth: depth + 1)) }
            return .array(items)
        case 10: return .uint(try r.read(UInt64.self, what))
        case 11: return .int(try r.read(Int64.self, what))
        case 12: return .float(Double(bitPattern: try r.read(UInt64.self, what)))
        default:
            throw ModelFileError.invalid(path: r.path, message: "metadata '\(key)' has unknown value type \(type)")
        }
    }

    /// The tensor as a [rows, cols] weight matrix (cols = dims[0], rows = the
    /// product of the rest), checked against an expected shape.
    public func matrix(_ name: String, rows: Int, cols: Int) throws -> WeightMatrix {
        guard let info = tensors[name] else { throw ModelFileError.missingTensor(path: path, tensor: name) }
        guard let type = WeightType(rawValue: info.rawType) else {
            throw ModelFileError.unsupportedType(path: path, tensor: name, type: WeightType.ggmlName(info.rawType))
        }
        let found = [info.dims.dropFirst().reduce(1, *), info.dims[0]]
        guard found == [rows, cols] else {
            throw ModelFileError.badShape(path: path, tensor: name, expected: [rows, cols], found: found)
        }
        return WeightMatrix(type: type, rows: rows, cols: cols, data: file.bytes.baseAddress! + info.offset, owner: file)
    }

    /// A 1-D tensor as fp32 values.
    public func vector(_ name: String, count: Int) throws -> [Float] {
        let m = try matrix(name, rows: 1, cols: count)
        return m.dequantized()
    }

    /// A required metadata value.
    public func require(_ key: String) throws -> GGUFValue {
        guard let v = metadata[key] else { throw ModelFileError.missingMetadata(path: path, key: key) }
        return v
    }

    public func requireInt(_ key: String) throws -> Int {
        guard let v = try require(key).intValue else {
            throw ModelFileError.invalid(path: path, message: "metadata '\(key)' is not an integer")
        }
        return v
    }
}
