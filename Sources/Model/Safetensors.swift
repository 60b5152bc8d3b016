// Safetensors: Hugging Face's tensor file (8-byte header length, JSON header,
// raw little-endian data), memory-mapped.
import Foundation
import Tensor

/// A parsed, memory-mapped .safetensors file.
public final class SafetensorsFile: Sendable {
    public struct Entry: Sendable {
        public let dtype: String
        public let shape: [Int]
        /// Absolute byte range in the file.
        public let range: Range<Int>
    }

    public let path: String
    public let entries: [String: Entry]
    public let metadata: [String: String]
    let file: MappedFile

    public init(path: String) throws {
        file = try MappedFile(path: path)
        self.path = path
        var r = ByteReader(bytes: file.bytes, path: path)
        let headerLength = try r.read(UInt64.self, "the header length")
        guard headerLength <= UInt64(r.remaining) else { throw ModelFileError.truncated(path: path, what: "the JSON header") }
        let header = try r.readBytes(Int(headerLength), "the JSON header")
        let dataStart = r.offset
        guard let json = try? JSONSerialization.jsonObject(with: Data(header)) as? [String: Any] else {
            throw ModelFileError.invalid(path: path, message: "the header is not a JSON object")
        }
        var entries: [String: Entry] = [:]
        var meta: [String: String] = [:]
        for (name, value) in json {
            if name == "__metadata__" {
                meta = (value as? [String: String]) ?? [:]
                continue
            }
            guard let obj = value as? [String: Any], let dtype = obj["dtype"] as? String,
                  let shape = obj["shape"] as? [Int], let offs = obj["data_offsets"] as? [Int], offs.count == 2,
                  offs[0] >= 0, offs[1] >= offs[0]
            else { throw ModelFileError.invalid(path: path, message: "tensor '\(name)' has a malformed header entry") }
            guard dataStart + offs[1] <= file.bytes.count else {
                throw ModelFileError.truncated(path: path, what: "the data of tensor '\(name)'")
            }
            entries[name] = Entry(dtype: dtype, shape: shape, range: (dataStart + offs[0])..<(dataStart + offs[1]))
        }
        self.entries = entries
        metadata = meta
    }

    static func weightType(_ dtype: String) -> WeightType? {
        switch dtype {
        case "F32": .f32
        case "F16": .f16
        case "BF16": .bf16
        default: nil
        }
    }

    /// The tensor as a [rows, cols] weight matrix, checked against the
    /// expected shape.
    public func matrix(_ name: String, rows: Int, cols: Int) throws -> WeightMatrix {
        guard let e = entries[name] else { throw ModelFileError.missingTensor(path: path, tensor: name) }
        guard let type = Self.weightType(e.dtype) else {
            throw ModelFileError.unsupportedType(path: path, tensor: name, type: e.dtype)
        }
        let found = e.shape.count == 1 ? [1, e.shape[0]] : e.shape
        guard found == [rows, cols] else {
            throw ModelFileError.badShape(path: path, tensor: name, expected: [rows, cols], found: e.shape)
        }
        guard e.range.count == type.byteCount(elements: rows * cols) else {
            throw ModelFileError.invalid(path: path, message: "tensor '\(name)' holds \(e.range.count) bytes, its shape needs \(type.byteCount(elements: rows * cols))")
        }
        return WeightMatrix(type: type, rows: rows, cols: cols, data: file.bytes.baseAddress! + e.range.lowerBound, owner: file)
    }

    /// A 1-D tensor as fp32 values.
    public func vector(_ name: String, count: Int) throws -> [Float] {
        try matrix(name, rows: 1, cols: count).dequantized()
    }
}
