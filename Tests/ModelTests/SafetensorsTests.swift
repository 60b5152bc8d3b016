// The safetensors codec: exact round trips, the real model file, and one
// refusal per rule, each the typed error that names what is wrong.
import Foundation
import Testing
import TestSupport
@testable import Model

@Suite("Safetensors codec")
struct SafetensorsTests {
    /// A container from a header's JSON text and data bytes, with the header
    /// length given or (by default) the text's.
    static func container(_ header: String, data: [UInt8] = [], length: UInt64? = nil) -> Data {
        var out = Data()
        withUnsafeBytes(of: (length ?? UInt64(header.utf8.count)).littleEndian) { out.append(contentsOf: $0) }
        out.append(Data(header.utf8))
        out.append(contentsOf: data)
        return out
    }

    /// The error parsing `data` throws, or nil when it parses.
    static func refusal(_ data: Data) -> Safetensors.Malformed? {
        do {
            _ = try Safetensors.parse(data)
            return nil
        } catch {
            return error
        }
    }

    @Test("tensors and metadata round-trip exactly; the header is padded to 8 bytes and the output is deterministic")
    func roundTrip() throws {
        let tensors = [
            Safetensors.Tensor(name: "w", shape: [2, 3], values: [1, -2, 3.5, .pi, 0, -0]),
            Safetensors.Tensor(name: "half", dtype: .f16, shape: [4], bytes: Data([1, 2, 3, 4, 5, 6, 7, 8])),
            Safetensors.Tensor(name: "scalar", dtype: .u8, shape: [], bytes: Data([42])),
            Safetensors.Tensor(name: "empty", dtype: .bf16, shape: [0, 5], bytes: Data()),
            Safetensors.Tensor(name: "wide", dtype: .i64, shape: [1, 1, 2], bytes: Data((0..<16).map { UInt8($0) })),
        ]
        let metadata = ["format": "test", "note": "ünïcode \"quoted\" / slash"]
        let bytes = try Safetensors.write(tensors, metadata: metadata)
        #expect(try Safetensors.write(tensors, metadata: metadata) == bytes)
        let header = try Safetensors.parse(bytes)
        #expect(header.dataStart % 8 == 0 && header.dataStart > 8)
        #expect(header.metadata == metadata)
        #expect(header.dataCount == 24 + 8 + 1 + 0 + 16)
        #expect(Set(header.entries.keys) == Set(tensors.map(\.name)))
        for t in tensors {
            let e = try #require(header.entries[t.name])
            #expect(e.name == t.name && e.dtype == t.dtype && e.shape == t.shape)
            #expect(bytes.subdata(in: (header.dataStart + e.range.lowerBound)..<(header.dataStart + e.range.upperBound)) == t.bytes)
        }
        // Data in the order given, contiguous.
        #expect(header.entries["w"]?.range == 0..<24 && header.entries["half"]?.range == 24..<32)
        // A slice that does not start at index 0 parses the same.
        let shifted = (Data([9, 9, 9]) + bytes)[3...]
        #expect(try Safetensors.parse(shifted).entries == header.entries)
        // No metadata: no __metadata__ key, an empty map back.
        #expect(try Safetensors.parse(try Safetensors.write(tensors, metadata: [:])).metadata.isEmpty)
    }

    @Test("the model file transformers wrote passes every rule")
    func realFile() throws {
        let data = try Data(contentsOf: Fixtures.url("ModelTests/Fixtures/tiny-llama/model.safetensors"))
        let header = try Safetensors.parse(data)
        #expect(header.entries.count > 10)
        #expect(header.entries.values.map(\.range.count).reduce(0, +) == header.dataCount)
        #expect(header.entries["model.embed_tokens.weight"]?.shape == [420, 64])
    }

    @Test("each rule refuses with the error that names it")
    func refusals() {
        let f32 = #""dtype":"F32""#
        let cases: [(Data, Safetensors.Malformed)] = [
            (Data(), .tooShort(bytes: 0)),
            (Data(repeating: 0, count: 7), .tooShort(bytes: 7)),
            (Data(repeating: 0xFF, count: 8), .headerTooLarge(length: .max)),
            (Self.container("{}", length: UInt64(Int.max)), .headerTooLarge(length: UInt64(Int.max))),
            (Self.container("{}", length: 100_000_001), .headerTooLarge(length: 100_000_001)),
            (Self.container("{}", length: 3), .headerPastEnd(length: 3, available: 2)),
            (Self.container("{}", length: 100), .headerPastEnd(length: 100, available: 2)),
            (Self.container("not json"), .headerNotJSON),
            (Self.container("{\"a\": "), .headerNotJSON),
            (Data(Self.container("{}").prefix(8)) + Data([0x7B, 0xFF, 0xFE, 0x7D]), .headerNotJSON),
            (Self.container("[1, 2]"), .headerNotObject),
            (Self.container("null"), .headerNotObject),
            (Self.container(#"{"__metadata__": {"a": 1}}"#), .badMetadata),
            (Self.container(#"{"__metadata__": ["a"]}"#), .badMetadata),
            (Self.container(#"{"t": 5}"#), .badEntry(tensor: "t", problem: "the entry is not an object")),
            (Self.container(#"{"t": {"shape": [1], "data_offsets": [0, 4]}}"#),
             .badEntry(tensor: "t", problem: "dtype must be a string")),
            (Self.container(#"{"t": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}"#, data: [0, 0, 0, 0]),
             .unknownDType(tensor: "t", dtype: "F99")),
            (Self.container(#"{"t": {\#(f32), "shape": [1.5], "data_offsets": [0, 4]}}"#),
             .badEntry(tensor: "t", problem: "shape must be an array of integers")),
            (Self.container(#"{"t": {\#(f32), "shape": [1e300], "data_offsets": [0, 4]}}"#),
             .badEntry(tensor: "t", problem: "shape must be an array of integers")),
            (Self.container(#"{"t": {\#(f32), "shape": "4", "data_offsets": [0, 4]}}"#),
             .badEntry(tensor: "t", problem: "shape must be an array of integers")),
            (Self.container(#"{"t": {\#(f32), "shape": [-1], "data_offsets": [0, 4]}}"#),
             .badEntry(tensor: "t", problem: "shape [-1] has a negative dimension")),
            (Self.container(#"{"t": {\#(f32), "shape": [4611686018427387904, 4], "data_offsets": [0, 4]}}"#, data: [0, 0, 0, 0]),
             .sizeOverflow(tensor: "t", shape: [1 << 62, 4])),
            (Self.container(#"{"t": {\#(f32), "shape": [9223372036854775807, 2], "data_offsets": [0, 4]}}"#, data: [0, 0, 0, 0]),
             .sizeOverflow(tensor: "t", shape: [.max, 2])),
            (Self.container(#"{"t": {\#(f32), "shape": [1], "data_offsets": [0]}}"#),
             .badEntry(tensor: "t", problem: "data_offsets must be two integers, got [0]")),
            (Self.container(#"{"t": {\#(f32), "shape": [1], "data_offsets": [0, 4.5]}}"#),
             .badEntry(tensor: "t", problem: "data_offsets must be two integers")),
            (Self.container(#"{"t": {\#(f32), "shape": [1], "data_offsets": [0, 1e20]}}"#),
             .badEntry(tensor: "t", problem: "data_offsets must be two integers")),
            (Self.container(#"{"t": {\#(f32), "shape": [1], "data_offsets": [-4, 0]}}"#),
             .badEntry(tensor: "t", problem: "data_offsets [-4, 0] are not 0 ≤ begin ≤ end")),
            (Self.container(#"{"t": {\#(f32), "shape": [1], "data_offsets": [8, 4]}}"#, data: [UInt8](repeating: 0, count: 8)),
             .badEntry(tensor: "t", problem: "data_offsets [8, 4] are not 0 ≤ begin ≤ end")),
            (Self.container(#"{"t": {\#(f32), "shape": [1], "data_offsets": [0, 4]}}"#, data: [0, 0]),
             .pastEnd(tensor: "t", end: 4, dataBytes: 2)),
            (Self.container(#"{"t": {\#(f32), "shape": [1], "data_offsets": [9223372036854775803, 9223372036854775807]}}"#),
             .pastEnd(tensor: "t", end: .max, dataBytes: 0)),
            (Self.container(#"{"t": {\#(f32), "shape": [2], "data_offsets": [0, 4]}}"#, data: [0, 0, 0, 0]),
             .sizeMismatch(tensor: "t", bytes: 4, shapeBytes: 8)),
            (Self.container(#"{"a": {\#(f32), "shape": [1], "data_offsets": [0, 4]}, "b": {\#(f32), "shape": [1], "data_offsets": [8, 12]}}"#,
                            data: [UInt8](repeating: 0, count: 12)),
             .notContiguous(tensor: "b", begin: 8, expected: 4)),
            (Self.container(#"{"a": {\#(f32), "shape": [2], "data_offsets": [0, 8]}, "b": {\#(f32), "shape": [1], "data_offsets": [4, 8]}}"#,
                            data: [UInt8](repeating: 0, count: 8)),
             .notContiguous(tensor: "b", begin: 4, expected: 8)),
            (Self.container(#"{"a": {\#(f32), "shape": [1], "data_offsets": [4, 8]}}"#, data: [UInt8](repeating: 0, count: 8)),
             .notContiguous(tensor: "a", begin: 4, expected: 0)),
            (Self.container(#"{"a": {\#(f32), "shape": [1], "data_offsets": [0, 4]}}"#, data: [UInt8](repeating: 0, count: 8)),
             .trailingBytes(covered: 4, dataBytes: 8)),
            (Self.container("{}", data: [0]), .trailingBytes(covered: 0, dataBytes: 1)),
        ]
        for (i, (bytes, expected)) in cases.enumerated() {
            #expect(Self.refusal(bytes) == expected, "case \(i)")
        }
        // Valid neighbours of the cases above parse: an empty container, spaces after the header, empty tensors anywhere.
        #expect(Self.refusal(Self.container("{}")) == nil)
        #expect(Self.refusal(Self.container("{\"__metadata__\": {\"k\": \"v\"}}    ")) == nil)
        #expect(Self.refusal(Self.container(#"{"a": {\#(f32), "shape": [1], "data_offsets": [0, 4]}, "z": {\#(f32), "shape": [0, 3], "data_offsets": [4, 4]}, "e": {\#(f32), "shape": [3, 0], "data_offsets": [0, 0]}}"#, data: [0, 0, 0, 0])) == nil)
    }

    @Test("refusals say what is wrong")
    func descriptions() {
        #expect(Safetensors.Malformed.headerPastEnd(length: 100, available: 2).description.contains("runs past the end"))
        #expect(Safetensors.Malformed.notContiguous(tensor: "b", begin: 8, expected: 4).description.contains("hole before tensor 'b'"))
        #expect(Safetensors.Malformed.notContiguous(tensor: "b", begin: 4, expected: 8).description.contains("'b' overlaps"))
        #expect(Safetensors.Malformed.sizeOverflow(tensor: "t", shape: [.max, 2]).description.contains("overflows"))
        #expect(Safetensors.Malformed.headerTooLarge(length: .max).description.contains("exceeds the limit"))
    }

    @Test("the writer refuses tensors that would not parse")
    func writerRefusals() {
        func refusal(_ t: [Safetensors.Tensor]) -> Safetensors.Malformed? {
            do {
                _ = try Safetensors.write(t, metadata: [:])
                return nil
            } catch {
                return error
            }
        }
        let ok = Safetensors.Tensor(name: "a", shape: [1], values: [1])
        #expect(refusal([ok]) == nil)
        #expect(refusal([Safetensors.Tensor(name: "a", shape: [2], values: [1])]) == .sizeMismatch(tensor: "a", bytes: 4, shapeBytes: 8))
        #expect(refusal([ok, ok]) == .badEntry(tensor: "a", problem: "the name is reserved or repeated"))
        #expect(refusal([Safetensors.Tensor(name: "__metadata__", shape: [1], values: [1])])
            == .badEntry(tensor: "__metadata__", problem: "the name is reserved or repeated"))
        #expect(refusal([Safetensors.Tensor(name: "a", dtype: .u8, shape: [-1, -1], bytes: Data([0]))])
            == .badEntry(tensor: "a", problem: "shape [-1, -1] has a negative dimension"))
        #expect(refusal([Safetensors.Tensor(name: "a", dtype: .f64, shape: [1 << 61, 2], bytes: Data())])
            == .sizeOverflow(tensor: "a", shape: [1 << 61, 2]))
    }

    @Test("a malformed model file is a ModelFileError naming the file")
    func modelFile() throws {
        let path = NSTemporaryDirectory() + "continuum-st-\(UUID().uuidString).safetensors"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Data(repeating: 0xFF, count: 8).write(to: URL(fileURLWithPath: path))
        let error = #expect(throws: ModelFileError.self) { try SafetensorsFile(path: path) }
        #expect(error?.description.contains(path) == true && error?.description.contains("exceeds the limit") == true)
    }
}

@Suite("Snapshot shapes")
struct SnapshotShapesTests {
    @Test("a part's dtypes and shapes as JSON (what the store keeps beside a level snapshot); bytes the codec refuses give {}")
    func shapes() {
        func container(_ header: String, _ data: [UInt8]) -> Data {
            withUnsafeBytes(of: UInt64(header.utf8.count).littleEndian) { Data($0) } + Data(header.utf8) + data
        }
        let header = #"{"__metadata__": {"format": "x"}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}, "a": {"dtype": "U8", "shape": [2, 2], "data_offsets": [0, 4]}}"#
        #expect(Safetensors.shapesJSON(container(header, [UInt8](repeating: 0, count: 8)))
            == #"{"a":{"dtype":"U8","shape":[2,2]},"b":{"dtype":"F32","shape":[1]}}"#)
        #expect(Safetensors.shapesJSON(container(header, [0, 0])) == "{}")
        #expect(Safetensors.shapesJSON(Data(repeating: 0xFF, count: 8)) == "{}")
    }
}
