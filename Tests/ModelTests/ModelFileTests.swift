// Model files: GGUF and Hugging Face readers, and their errors on bad files.
import Foundation
import Testing
import TestSupport
import Tensor
@testable import Model

/// Writes small GGUF files for tests (spec: ggml/docs/gguf.md).
struct GGUFWriter {
    var version: UInt32 = 3
    var metadata: [(String, GGUFValue)] = []
    var tensors: [(name: String, dims: [Int], type: UInt32, data: [UInt8])] = []

    func bytes() -> [UInt8] {
        var out: [UInt8] = Array("GGUF".utf8)
        func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { out += $0 } }
        func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { out += $0 } }
        func str(_ s: String) { u64(UInt64(s.utf8.count)); out += Array(s.utf8) }
        func typeOf(_ v: GGUFValue) -> UInt32 {
            switch v {
            case .uint: 10
            case .int: 11
            case .float: 12
            case .bool: 7
            case .string: 8
            case .array: 9
            }
        }
        func value(_ v: GGUFValue) {
            switch v {
            case .uint(let x): u64(x)
            case .int(let x): u64(UInt64(bitPattern: x))
            case .float(let x): u64(x.bitPattern)
            case .bool(let b): out.append(b ? 1 : 0)
            case .string(let s): str(s)
            case .array(let a):
                u32(a.first.map(typeOf) ?? 8)
                u64(UInt64(a.count))
                for item in a { value(item) }
            }
        }
        u32(version)
        u64(UInt64(tensors.count))
        u64(UInt64(metadata.count))
        for (k, v) in metadata {
            str(k)
            u32(typeOf(v))
            value(v)
        }
        var offset = 0
        var offsets: [Int] = []
        for t in tensors {
            offsets.append(offset)
            offset += (t.data.count + 31) / 32 * 32
        }
        for (t, off) in zip(tensors, offsets) {
            str(t.name)
            u32(UInt32(t.dims.count))
            for d in t.dims { u64(UInt64(d)) }
            u32(t.type)
            u64(UInt64(off))
        }
        while out.count % 32 != 0 { out.append(0) }
        for t in tensors {
            out += t.data
            while out.count % 32 != 0 { out.append(0) }
        }
        return out
    }

    func write() throws -> String {
        let path = NSTemporaryDirectory() + "continuum-test-\(UUID().uuidString).gguf"
        try Data(bytes()).write(to: URL(fileURLWithPath: path))
        return path
    }
}

func floatBytes(_ x: [Float]) -> [UInt8] { x.withUnsafeBytes { Array($0) } }

@Suite("Model files")
struct ModelFileTests {
    @Test("a file that is not GGUF is rejected, naming the file")
    func wrongMagic() throws {
        let path = NSTemporaryDirectory() + "continuum-not-gguf-\(UUID().uuidString).gguf"
        try Data("PK\u{3}\u{4} this is a zip".utf8).write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let error = #expect(throws: ModelFileError.self) { try LlamaModel.load(path: path) }
        #expect(error?.description.contains(path) == true)
        #expect(error?.description.contains("not a GGUF file") == true)
    }

    @Test("a missing file is reported as such")
    func missing() {
        #expect(throws: ModelFileError.notFound(path: "/nonexistent/model.gguf")) {
            try LlamaModel.load(path: "/nonexistent/model.gguf")
        }
    }

    @Test("unsupported GGUF versions are rejected")
    func version() throws {
        var w = GGUFWriter()
        w.version = 1
        let path = try w.write()
        defer { try? FileManager.default.removeItem(atPath: path) }
        #expect(throws: ModelFileError.unsupportedVersion(path: path, version: 1)) { try GGUFFile(path: path) }
    }

    @Test("truncated copies of the real model fail with a clear error, never a crash", arguments: [3, 1000, 2_000_000, 60_000_000])
    func truncated(length: Int) throws {
        let source = Fixtures.backbonePath
        guard FileManager.default.fileExists(atPath: source) else {
            Issue.record("The default model is missing at \(source): run `continuum fetch-model` first.")
            return
        }
        let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: source))
        let data = try handle.read(upToCount: length) ?? Data()
        try handle.close()
        let path = NSTemporaryDirectory() + "continuum-truncated-\(length).gguf"
        try data.write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let error = #expect(throws: ModelFileError.self) { try LlamaModel.load(path: path) }
        guard case .truncated(let p, let what)? = error else {
            Issue.record("expected a truncation error, got \(String(describing: error))")
            return
        }
        #expect(p == path)
        if length == 60_000_000 { #expect(what.contains("tensor 'blk."), "names the first tensor cut off: \(what)") }
    }

    @Test("GGUF v2 and v3 read back metadata and every supported tensor type", arguments: [UInt32(2), 3])
    func readBack(version: UInt32) throws {
        var rng = SplitRNG(seed: 11)
        var w = GGUFWriter()
        w.version = version
        w.metadata = [("general.architecture", .string("llama")), ("some.count", .uint(7)),
                      ("some.list", .array([.string("a"), .string("b")])), ("some.flag", .bool(true)), ("some.pi", .float(3.25))]
        let types: [WeightType] = [.f32, .f16, .bf16, .q4_0, .q4_1, .q8_0]
        for t in types {
            var data = (0..<t.byteCount(elements: 2 * 64)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            if t.blockSize == 32 {  // keep block scales finite
                for b in 0..<4 { data[b * t.bytesPerBlock + 1] = 0x20 }
                if t == .q4_1 { for b in 0..<4 { data[b * t.bytesPerBlock + 3] = 0x20 } }
            } else if t == .f16 || t == .bf16 {
                for i in stride(from: 1, to: data.count, by: 2) { data[i] &= 0x3F }
            } else {
                for i in stride(from: 3, to: data.count, by: 4) { data[i] &= 0x3F }
            }
            w.tensors.append(("t.\(t)", [64, 2], t.rawValue, data))
        }
        let path = try w.write()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let g = try GGUFFile(path: path)
        #expect(g.version == version)
        #expect(g.metadata["some.count"]?.intValue == 7)
        #expect(g.metadata["some.list"] == .array([.string("a"), .string("b")]))
        #expect(g.metadata["some.flag"]?.boolValue == true)
        #expect(g.metadata["some.pi"]?.doubleValue == 3.25)
        for (t, tensor) in zip(types, w.tensors) {
            let m = try g.matrix("t.\(t)", rows: 2, cols: 64)
            #expect(m.type == t)
            let expected = tensor.data.withUnsafeBytes { Reference.dequantize(t, $0.baseAddress!, count: 128) }
            #expect(m.dequantized() == expected, "\(t)")
        }
        #expect(throws: ModelFileError.badShape(path: path, tensor: "t.F32", expected: [64, 2], found: [2, 64])) {
            try g.matrix("t.F32", rows: 64, cols: 2)
        }
    }

    @Test("an unsupported tensor type is named with its tensor")
    func unsupportedType() throws {
        var w = GGUFWriter()
        w.tensors = [("blk.0.attn_q.weight", [32, 1], 6, [UInt8](repeating: 0, count: 22))]  // Q5_0
        let path = try w.write()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let g = try GGUFFile(path: path)
        let error = #expect(throws: ModelFileError.self) { try g.matrix("blk.0.attn_q.weight", rows: 1, cols: 32) }
        #expect(error == .unsupportedType(path: path, tensor: "blk.0.attn_q.weight", type: "Q5_0"))
        #expect(error?.description.contains("Q5_0") == true)
    }

    @Test("a model missing a tensor names the tensor")
    func missingTensor() throws {
        let real = try Fixtures.backbone()
        _ = real
        let source = try GGUFFile(path: Fixtures.backbonePath)
        // Same metadata, all tensors but one, copied from the real file.
        var w = GGUFWriter()
        w.metadata = source.metadata.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
        let base = try MappedFile(path: Fixtures.backbonePath)
        for name in source.tensorNames where name != "blk.3.ffn_up.weight" {
            let info = source.tensors[name]!
            let t = WeightType(rawValue: info.rawType)!
            let n = t.byteCount(elements: info.dims.reduce(1, *))
            w.tensors.append((name, info.dims, info.rawType, Array(UnsafeRawBufferPointer(rebasing: base.bytes[info.offset..<(info.offset + n)]))))
        }
        let path = try w.write()
        defer { try? FileManager.default.removeItem(atPath: path) }
        #expect(throws: ModelFileError.missingTensor(path: path, tensor: "blk.3.ffn_up.weight")) {
            try LlamaModel.load(path: path)
        }
    }

    @Test("Hugging Face directory: tokenizer.json and safetensors match transformers")
    func huggingFace() throws {
        let model = try Fixtures.tinyLlama()
        let ref = try Fixtures.json("ModelTests/Fixtures/tiny-reference.json")
        #expect(model.configuration.numHiddenLayers == 2 && model.configuration.numKeyValueHeads == 2)
        #expect(!model.configuration.tieWordEmbeddings)
        let texts = try #require(ref["texts"] as? [String])
        let ids = try #require(ref["ids"] as? [[Int]])
        for (t, expected) in zip(texts, ids) { #expect(model.tokenizer.encode(t) == expected, "\(t.debugDescription)") }
        let promptIDs = try #require(ref["prompt_ids"] as? [Int])
        #expect(model.tokenizer.encode(ref["prompt"] as! String) == promptIDs)
        let expected = try Fixtures.floats("ModelTests/Fixtures/" + (ref["logits"] as! String))
        let hidden = try model.hiddenStates([LlamaModel.Step(tokens: promptIDs, cache: model.makeCache())])
        let ours = hidden.withUnsafeBufferPointer { model.logits(hidden: $0.baseAddress!, count: promptIDs.count) }
        let scale = expected.map(abs).max()!
        let err = maxAbsDiff(ours[...], expected[...])
        #expect(err <= 1e-4 * scale, "max |Δ| \(err), max |logit| \(scale)")
        #expect(model.chatTemplate.render([ChatMessage(role: "user", content: "hi")]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    }

    @Test("tokenizer.json with SmolLM2's Digits + ByteLevel pre-tokenizer matches tokenizers")
    func digitsTokenizerJSON() throws {
        let ref = try Fixtures.json("ModelTests/Fixtures/tiny-reference.json")
        let tokenizer = try Tokenizer(tokenizerJSON: Fixtures.url("ModelTests/Fixtures/digits-tokenizer.json").path, bosID: nil, eosIDs: [])
        #expect(tokenizer.preTokenizer.individualDigits)
        let texts = try #require(ref["texts"] as? [String])
        let ids = try #require(ref["digits_ids"] as? [[Int]])
        for (t, expected) in zip(texts, ids) { #expect(tokenizer.encode(t) == expected, "\(t.debugDescription)") }
    }

    @Test("unsupported tokenizer.json settings are refused, naming the file")
    func unsupportedTokenizerJSON() throws {
        let path = NSTemporaryDirectory() + "continuum-tokenizer-\(UUID().uuidString).json"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Data(#"{"model": {"type": "Unigram", "vocab": []}, "pre_tokenizer": null}"#.utf8).write(to: URL(fileURLWithPath: path))
        let error = #expect(throws: ModelFileError.self) { try Tokenizer(tokenizerJSON: path, bosID: nil, eosIDs: []) }
        #expect(error?.description.contains(path) == true && error?.description.contains("BPE") == true)
    }

    @Test("Hugging Face directory errors name the file")
    func huggingFaceErrors() throws {
        let dir = NSTemporaryDirectory() + "continuum-hf-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(throws: ModelFileError.notFound(path: dir + "/config.json")) { try LlamaModel.load(path: dir) }
        try Data(#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2, "vocab_size": 10}"#.utf8)
            .write(to: URL(fileURLWithPath: dir + "/config.json"))
        let error = #expect(throws: ModelFileError.self) { try LlamaModel.load(path: dir) }
        #expect(error?.description.contains("num_key_value_heads") == true)
    }
}

/// Seeded generator for test data.
struct SplitRNG: RandomNumberGenerator {
    var inner: SeededGenerator
    init(seed: UInt64) { inner = SeededGenerator(seed: seed) }
    mutating func next() -> UInt64 { inner.next() }
}
