// Edits of safetensors files for the state-file fuzz tests: raw surgery on
// the header JSON and bytes (which may break every rule of the container),
// and metadata edits written again by the codec's writer (a valid container
// with crafted contents).
import Foundation
@testable import Memory
@testable import Model

/// Edits of safetensors files, below and above the codec.
enum Surgery {
    /// The header JSON as an object, and the data after it.
    static func split(_ data: Data) -> (header: [String: Any], body: Data) {
        let n = Int(data.prefix(8).withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) })
        let header = try! JSONSerialization.jsonObject(with: data.subdata(in: 8..<(8 + n))) as! [String: Any]
        return (header, data.subdata(in: (8 + n)..<data.count))
    }

    /// Bytes from any JSON header object and data (not checked: raw surgery).
    static func join(_ header: [String: Any], _ body: Data) -> Data {
        let json = try! JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        return withLength(UInt64(json.count)) + json + body
    }

    static func withLength(_ n: UInt64) -> Data { withUnsafeBytes(of: n.littleEndian) { Data($0) } }

    /// The file with its header-length field replaced.
    static func settingLength(_ data: Data, _ n: UInt64) -> Data { withLength(n) + data.dropFirst(8) }

    /// One entry of the header edited (raw).
    static func editEntry(_ data: Data, _ name: String, _ edit: (inout [String: Any]) -> Void) -> Data {
        var (header, body) = split(data)
        var e = header[name] as! [String: Any]
        edit(&e)
        header[name] = e
        return join(header, body)
    }

    /// The metadata edited, written again by the codec's writer (a valid container).
    static func rewrite(_ data: Data, _ edit: (inout [String: String]) -> Void) -> Data {
        let h = try! Safetensors.parse(data)
        var meta = h.metadata
        edit(&meta)
        let tensors = h.entries.values.sorted { $0.range.lowerBound < $1.range.lowerBound }.map { e in
            Safetensors.Tensor(name: e.name, dtype: e.dtype, shape: e.shape,
                               bytes: data.subdata(in: (h.dataStart + e.range.lowerBound)..<(h.dataStart + e.range.upperBound)))
        }
        return try! Safetensors.write(tensors, metadata: meta)
    }

    /// A JSON metadata value (an object) edited, the file written again.
    static func editJSON(_ data: Data, _ key: String, _ edit: (inout [String: Any]) -> Void) -> Data {
        rewrite(data) { meta in
            var object = try! JSONSerialization.jsonObject(with: Data(meta[key]!.utf8)) as! [String: Any]
            edit(&object)
            meta[key] = String(decoding: try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self)
        }
    }

    /// The configuration replaced by `text`, with a matching checksum.
    static func configuring(_ data: Data, _ text: String) -> Data {
        rewrite(data) {
            $0["configuration"] = text
            $0["configuration_sha256"] = LevelStateFile.sha256(Data(text.utf8))
        }
    }

    /// Value i of a tensor replaced (bytes in place).
    static func settingValue(_ data: Data, _ name: String, _ i: Int, _ v: Float) -> Data {
        let h = try! Safetensors.parse(data)
        let at = h.dataStart + h.entries[name]!.range.lowerBound + 4 * i
        var out = data
        withUnsafeBytes(of: v.bitPattern.littleEndian) { out.replaceSubrange(at..<(at + 4), with: $0) }
        return out
    }
}
