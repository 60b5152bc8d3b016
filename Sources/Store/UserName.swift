// UserName: the app's id for one of a tenant's users, checked once at the
// edge (HTTP path, JSON body, CLI) and carried as a type from there on, so
// every route and the store apply the same policy.
//
// The policy (documented in README and openapi.yaml):
//   * 1 to 256 bytes of UTF-8;
//   * no control characters (Unicode Cc: NUL, U+0001–U+001F, DEL, U+0080–U+009F),
//     no format characters (Cf: zero-width and bidirectional controls), no
//     private-use or surrogate code points, no line or paragraph separators
//     (U+2028, U+2029);
//   * anything else, spaces and '/' included, is the app's to choose.
// In a URL path the id is percent-encoded; `init(percentEncoded:)` decodes it
// strictly (a '%' not followed by two hex digits, or bytes that are not
// UTF-8, are refused) before the policy applies.

/// A user id that satisfies the policy above.
public struct UserName: Hashable, Sendable, CustomStringConvertible {
    public let value: String
    public var description: String { value }

    /// Most bytes of UTF-8 a user id may have.
    public static let maxBytes = 256

    /// Why a string is not a user id.
    public struct Invalid: Error, CustomStringConvertible {
        public let description: String
    }

    /// Checks `value` against the policy.
    public init(_ value: String) throws(Invalid) {
        let bytes = value.utf8.count
        guard bytes >= 1, bytes <= Self.maxBytes else {
            throw Invalid(description: "a user id must have 1 to \(Self.maxBytes) bytes of UTF-8, got \(bytes)")
        }
        if let bad = value.unicodeScalars.first(where: { !Self.allowed($0) }) {
            let hex = String(bad.value, radix: 16, uppercase: true)
            throw Invalid(description: "a user id must not contain control, format, private-use or separator characters (U+\(String(repeating: "0", count: max(0, 4 - hex.count)) + hex))")
        }
        self.value = value
    }

    /// Decodes a percent-encoded URL path segment, then checks the policy.
    public init(percentEncoded segment: Substring) throws(Invalid) {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(segment.utf8.count)
        var it = segment.utf8.makeIterator()
        while let b = it.next() {
            guard b == UInt8(ascii: "%") else { bytes.append(b); continue }
            guard let h = it.next().flatMap(Self.hex), let l = it.next().flatMap(Self.hex) else {
                throw Invalid(description: "the user id in the path has a '%' not followed by two hexadecimal digits")
            }
            bytes.append(h << 4 | l)
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw Invalid(description: "the user id in the path is not UTF-8 once percent-decoded")
        }
        try self.init(text)
    }

    static func hex(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
        default: nil
        }
    }

    static func allowed(_ s: Unicode.Scalar) -> Bool {
        switch s.properties.generalCategory {
        case .control, .format, .privateUse, .surrogate, .lineSeparator, .paragraphSeparator: false
        default: true
        }
    }
}
