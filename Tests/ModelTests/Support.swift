// Shared test support: fixture paths and the default model, which must be
// present (CI fetches it); its absence fails the tests that need it.
import Foundation
import Testing
@testable import Model

enum Fixtures {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures")

    static func url(_ name: String) -> URL { directory.appendingPathComponent(name) }

    static func json(_ name: String) throws -> [String: Any] {
        let data = try Data(contentsOf: url(name))
        return try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    /// A little-endian float32 file.
    static func floats(_ name: String) throws -> [Float] {
        let data = try Data(contentsOf: url(name))
        return data.withUnsafeBytes { raw in (0..<(raw.count / 4)).map { raw.loadUnaligned(fromByteOffset: 4 * $0, as: Float.self) } }
    }
}

/// The default SmolLM2 model, loaded once for all tests.
enum SharedModel {
    static let path = DefaultModel.path
    static let loaded: Result<LlamaModel, Error> = Result { try LlamaModel.load(path: path) }

    /// The model, or a test failure saying how to get it.
    static func get() throws -> LlamaModel {
        guard FileManager.default.fileExists(atPath: path) else {
            Issue.record("The default model is missing at \(path): run `continuum fetch-model` (or `make fetch-model`) first.")
            throw CancellationError()
        }
        return try loaded.get()
    }
}

func maxAbsDiff(_ a: ArraySlice<Float>, _ b: ArraySlice<Float>) -> Float {
    zip(a, b).map { abs($0 - $1) }.max() ?? .infinity
}
