// ModelFileError: every way a model file can be unusable, each naming the
// file (and the tensor or key) so a person can act on it.

/// A model file could not be used. The description names the file and, where
/// one is involved, the tensor or metadata key.
public enum ModelFileError: Error, CustomStringConvertible, Equatable {
    case notFound(path: String)
    case unreadable(path: String, reason: String)
    case badMagic(path: String, found: String)
    case unsupportedVersion(path: String, version: UInt32)
    case truncated(path: String, what: String)
    case unsupportedType(path: String, tensor: String, type: String)
    case missingTensor(path: String, tensor: String)
    case badShape(path: String, tensor: String, expected: [Int], found: [Int])
    case missingMetadata(path: String, key: String)
    case invalid(path: String, message: String)

    public var description: String {
        switch self {
        case .notFound(let p): "\(p): no such file or directory"
        case .unreadable(let p, let r): "\(p): cannot read: \(r)"
        case .badMagic(let p, let f): "\(p): not a GGUF file (magic bytes \(f), expected \"GGUF\")"
        case .unsupportedVersion(let p, let v): "\(p): GGUF version \(v) is not supported (only 2 and 3)"
        case .truncated(let p, let w): "\(p): file is truncated: \(w) runs past the end of the file"
        case .unsupportedType(let p, let t, let ty):
            "\(p): tensor '\(t)' has type \(ty), which is not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0)"
        case .missingTensor(let p, let t): "\(p): tensor '\(t)' is missing"
        case .badShape(let p, let t, let e, let f): "\(p): tensor '\(t)' has shape \(f), expected \(e)"
        case .missingMetadata(let p, let k): "\(p): metadata key '\(k)' is missing"
        case .invalid(let p, let m): "\(p): \(m)"
        }
    }
}
