// The test targets' one loader for models and fixture files. Two models:
// the tiny random Llama committed under ModelTests/Fixtures (made by
// scripts/make-fixtures.py: width 64, 2 layers, its own 420-token BPE and a
// ChatML template), for every test whose assertion holds for any Llama; and
// the default SmolLM2 backbone, only for assertions about that model (its
// reference logits, perplexity, what learning does to it) or about its block
// formats: the tiny Llama's weights are F32, so the quantised (Q4_1/Q8_0,
// packed 32-block SIMD) kernels run only on the backbone. Each is loaded at
// most once per test process; a missing backbone fails the tests that need
// it with a message saying how to get it, it is never skipped.
import Foundation
import Model
import Tensor

public enum Fixtures {
    /// The Tests directory of the repository.
    public static let tests = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()

    /// A file under Tests/, e.g. "ModelTests/Fixtures/tiny-reference.json".
    public static func url(_ relative: String) -> URL { tests.appendingPathComponent(relative).standardized }
    public static func path(_ relative: String) -> String { url(relative).path }

    /// A JSON object file under Tests/.
    public static func json(_ relative: String) throws -> [String: Any] {
        let data = try Data(contentsOf: url(relative))
        guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw FixtureError(description: "\(relative) is not a JSON object")
        }
        return object
    }

    /// A little-endian float32 file under Tests/.
    public static func floats(_ relative: String) throws -> [Float] {
        let data = try Data(contentsOf: url(relative))
        return data.withUnsafeBytes { raw in (0..<(raw.count / 4)).map { raw.loadUnaligned(fromByteOffset: 4 * $0, as: Float.self) } }
    }

    /// The tiny random Llama's directory (safetensors, tokenizer.json, chat template).
    public static let tinyLlamaPath = path("ModelTests/Fixtures/tiny-llama")

    /// The tiny random Llama, loaded once.
    public static func tinyLlama() throws -> LlamaModel { try tiny.get() }

    /// The default backbone's file (SmolLM2-135M-Instruct, GGUF).
    public static let backbonePath = DefaultModel.path

    /// The default backbone, loaded once; a clear error when it has not been fetched.
    public static func backbone() throws -> LlamaModel { try real.get() }

    /// Rows from which one step of `model` takes both prefill paths: the
    /// sgemm products (`WeightMatrix.gemmThreshold`, which depends on the
    /// CPU; F32 weights always take sgemm) and blocked attention
    /// (`Attention.prefillTokens`).
    public static func prefillRows(_ model: LlamaModel) -> Int {
        max(model.weights.layers[0].wq.type == .f32 ? 0 : WeightMatrix.gemmThreshold, Attention.prefillTokens)
    }

    private static let tiny = Result { try LlamaModel.load(path: tinyLlamaPath) }
    private static let real = Result<LlamaModel, Error> {
        guard FileManager.default.fileExists(atPath: backbonePath) else {
            throw FixtureError(description: "the default model is missing at \(backbonePath): "
                               + "run `continuum fetch-model` (or `make fetch-model`; make test does) first")
        }
        return try LlamaModel.load(path: backbonePath)
    }
}

/// A fixture that is missing or malformed; its description says which and what to do.
public struct FixtureError: Error, CustomStringConvertible {
    public let description: String
}
