// Tokenizer: byte-level BPE (GPT-2 family), loaded from GGUF metadata or a
// Hugging Face tokenizer.json, agreeing token for token with HF `tokenizers`.
import Foundation
import Synchronization

/// Byte-level BPE tokenizer.
public final class Tokenizer: Sendable {
    /// Token strings by id: byte-level form (Ġ for space, …) for ordinary
    /// tokens, literal content for added/special tokens.
    public let tokens: [String]
    /// Added tokens (special or not) that are matched in text before BPE,
    /// by content.
    public let addedTokens: [String: Int]
    /// Ids of the added tokens flagged special (skipped by `decode(skipSpecial:)`).
    public let specialIDs: Set<Int>
    public let preTokenizer: PreTokenizer
    /// Beginning-of-sequence token, if the model has one.
    public let bosID: Int?
    /// Tokens that end generation.
    public let eosIDs: Set<Int>
    /// When true, a piece found whole in the vocabulary is not split by BPE.
    public let ignoreMerges: Bool
    /// Stands for a byte the vocabulary has no token for; nil drops such
    /// bytes (Hugging Face BPE without `unk_token`).
    public let unknownID: Int?

    private let vocab: [String: Int]
    private let merges: [UInt64: Merge]
    private let byteTokens: [Int]
    private let addedByLength: [(String, Int)]
    private let cache = Mutex<[String: [Int]]>([:])

    struct Merge: Sendable {
        let rank: Int32
        let id: Int32
    }

    public struct LoadError: Error, CustomStringConvertible {
        public let description: String
    }

    /// Builds a tokenizer from its vocabulary and merge list.
    /// - Parameters:
    ///   - tokens: token strings by id (byte-level form for ordinary tokens)
    ///   - merges: merge rules in rank order, each a pair of token strings
    ///   - added: ids of added tokens, with whether each is special
    ///   - unknownID: token for bytes missing from the vocabulary (nil: drop them)
    public init(tokens: [String], merges: [(String, String)], added: [(id: Int, special: Bool)],
                preTokenizer: PreTokenizer, bosID: Int?, eosIDs: Set<Int>, ignoreMerges: Bool = false,
                unknownID: Int? = nil) throws {
        self.tokens = tokens
        self.preTokenizer = preTokenizer
        self.bosID = bosID
        self.eosIDs = eosIDs
        self.ignoreMerges = ignoreMerges
        self.unknownID = unknownID
        var vocab: [String: Int] = [:]
        vocab.reserveCapacity(tokens.count)
        for (i, t) in tokens.enumerated() where vocab[t] == nil { vocab[t] = i }
        var addedTokens: [String: Int] = [:]
        var specials = Set<Int>()
        for a in added {
            guard a.id >= 0 && a.id < tokens.count else {
                throw LoadError(description: "added token id \(a.id) is outside the vocabulary (\(tokens.count) tokens)")
            }
            addedTokens[tokens[a.id]] = a.id
            if a.special { specials.insert(a.id) }
        }
        self.addedTokens = addedTokens
        specialIDs = specials
        addedByLength = addedTokens.sorted { $0.key.utf8.count > $1.key.utf8.count }
        // Vocabularies may lack bytes that never occur in text (0xC0, 0xF5…).
        var byteTokens = [Int](repeating: -1, count: 256)
        for b in 0..<256 { byteTokens[b] = vocab[String(ByteLevel.byteToScalar[b])] ?? -1 }
        self.byteTokens = byteTokens
        var m: [UInt64: Merge] = [:]
        m.reserveCapacity(merges.count)
        for (rank, (a, b)) in merges.enumerated() {
            guard let ia = vocab[a], let ib = vocab[b], let merged = vocab[a + b] else { continue }
            let key = UInt64(ia) << 32 | UInt64(ib)
            if m[key] == nil { m[key] = Merge(rank: Int32(rank), id: Int32(merged)) }
        }
        self.vocab = vocab
        self.merges = m
    }

    /// Number of tokens in the vocabulary.
    public var count: Int { tokens.count }

    // MARK: Encoding

    /// Token ids of `text`. No BOS/EOS is added. When `parseSpecial` is true,
    /// added-token strings (such as `<|im_start|>`) in the text become their
    /// ids, as Hugging Face tokenizers do.
    public func encode(_ text: String, parseSpecial: Bool = true) -> [Int] {
        var out: [Int] = []
        guard parseSpecial && !addedByLength.isEmpty else {
            encodeOrdinary(text, into: &out)
            return out
        }
        let bytes = Array(text.utf8)
        var cursor = 0
        for m in addedTokenMatches(in: bytes) {
            if m.start > cursor { encodeOrdinary(String(decoding: bytes[cursor..<m.start], as: UTF8.self), into: &out) }
            out.append(m.id)
            cursor = m.end
        }
        if cursor < bytes.count { encodeOrdinary(String(decoding: bytes[cursor...], as: UTF8.self), into: &out) }
        return out
    }

    /// Non-overlapping added-token matches in UTF-8 bytes: leftmost first, the
    /// longest where several start at one place (Hugging Face's
    /// LeftmostLongest matching). One pass over the text per added token.
    private func addedTokenMatches(in bytes: [UInt8]) -> [(start: Int, end: Int, id: Int)] {
        var all: [(start: Int, end: Int, id: Int)] = []
        for (content, id) in addedByLength {
            let pattern = Array(content.utf8)
            guard let first = pattern.first, pattern.count <= bytes.count else { continue }
            var i = 0
            while i + pattern.count <= bytes.count {
                if bytes[i] == first && bytes[i..<(i + pattern.count)].elementsEqual(pattern) {
                    all.append((i, i + pattern.count, id))
                    i += pattern.count
                } else {
                    i += 1
                }
            }
        }
        all.sort { $0.start < $1.start || ($0.start == $1.start && $0.end > $1.end) }
        var picked: [(start: Int, end: Int, id: Int)] = []
        var end = 0
        for m in all where m.start >= end {
            picked.append(m)
            end = m.end
        }
        return picked
    }

    private func encodeOrdinary(_ text: String, into out: inout [Int]) {
        for piece in preTokenizer.split(text) {
            let key = String(piece)
            if let hit = cache.withLock({ $0[key] }) {
                out.append(contentsOf: hit)
                continue
            }
            let ids = bpe(Array(key.utf8))
            cache.withLock { c in
                if c.count > 100_000 { c.removeAll(keepingCapacity: true) }
                c[key] = ids
            }
            out.append(contentsOf: ids)
        }
    }

    /// Byte-level BPE of one piece: repeatedly merge the adjacent pair of
    /// lowest rank (leftmost on ties), with a heap of candidate pairs over a
    /// linked list of symbols, so a long piece costs O(n log n).
    func bpe(_ bytes: [UInt8]) -> [Int] {
        if ignoreMerges, let whole = vocab[String(String.UnicodeScalarView(bytes.map { ByteLevel.byteToScalar[Int($0)] }))] {
            return [whole]
        }
        var sym: [Int] = []
        sym.reserveCapacity(bytes.count)
        for b in bytes {
            let id = byteTokens[Int(b)]
            if id >= 0 { sym.append(id) } else if let u = unknownID { sym.append(u) }
        }
        let n = sym.count
        guard n > 1 else { return sym }
        var next = Array(1...n)            // n marks the end
        var prev = Array(-1..<(n - 1))
        var alive = [Bool](repeating: true, count: n)
        var heap = PairHeap()
        func push(_ i: Int) {
            let j = next[i]
            guard j < n, let m = merges[UInt64(sym[i]) << 32 | UInt64(sym[j])] else { return }
            heap.push(PairHeap.Entry(rank: m.rank, position: Int32(i), left: Int32(sym[i]), right: Int32(sym[j]), merged: m.id))
        }
        for i in 0..<(n - 1) { push(i) }
        while let e = heap.pop() {
            let i = Int(e.position)
            let j = next[i]
            // Stale: the pair changed since it was pushed.
            guard alive[i], j < n, sym[i] == Int(e.left), sym[j] == Int(e.right) else { continue }
            sym[i] = Int(e.merged)
            alive[j] = false
            next[i] = next[j]
            if next[j] < n { prev[next[j]] = i }
            if prev[i] >= 0 { push(prev[i]) }
            push(i)
        }
        var out: [Int] = []
        var i = 0
        while i < n {
            out.append(sym[i])
            i = next[i]
        }
        return out
    }

    // MARK: Decoding

    /// The bytes token `id` stands for (its content for added tokens).
    public func bytes(of id: Int) -> [UInt8] {
        guard id >= 0 && id < tokens.count else { return [] }
        let t = tokens[id]
        if addedTokens[t] == id { return Array(t.utf8) }
        var out: [UInt8] = []
        out.reserveCapacity(t.utf8.count)
        for s in t.unicodeScalars {
            if let b = ByteLevel.scalarToByte[s] { out.append(b) } else { out.append(contentsOf: String(s).utf8) }
        }
        return out
    }

    /// The UTF-8 bytes of `ids` (special tokens left out when `skipSpecial`).
    public func decodeBytes(_ ids: [Int], skipSpecial: Bool = false) -> [UInt8] {
        var out: [UInt8] = []
        for id in ids where !(skipSpecial && specialIDs.contains(id)) { out += bytes(of: id) }
        return out
    }

    /// Text of `ids`; invalid UTF-8 becomes U+FFFD.
    public func decode(_ ids: [Int], skipSpecial: Bool = false) -> String {
        String(decoding: decodeBytes(ids, skipSpecial: skipSpecial), as: UTF8.self)
    }
}

/// A binary min-heap of candidate merges ordered by (rank, position).
struct PairHeap {
    struct Entry {
        let rank: Int32
        let position: Int32
        let left: Int32
        let right: Int32
        let merged: Int32

        func precedes(_ o: Entry) -> Bool { rank < o.rank || (rank == o.rank && position < o.position) }
    }

    private var items: [Entry] = []

    mutating func push(_ e: Entry) {
        items.append(e)
        var c = items.count - 1
        while c > 0 {
            let p = (c - 1) / 2
            guard items[c].precedes(items[p]) else { break }
            items.swapAt(c, p)
            c = p
        }
    }

    mutating func pop() -> Entry? {
        guard let top = items.first else { return nil }
        let last = items.removeLast()
        if !items.isEmpty {
            items[0] = last
            var p = 0
            while true {
                let l = 2 * p + 1, r = l + 1
                var m = p
                if l < items.count && items[l].precedes(items[m]) { m = l }
                if r < items.count && items[r].precedes(items[m]) { m = r }
                if m == p { break }
                items.swapAt(p, m)
                p = m
            }
        }
        return top
    }
}

/// GPT-2's reversible byte ↔ printable-character map.
public enum ByteLevel {
    public static let byteToScalar: [Unicode.Scalar] = {
        var table = [Unicode.Scalar](repeating: " ", count: 256)
        var n: UInt32 = 0
        for b in 0..<256 {
            let printable = (33...126).contains(b) || (161...172).contains(b) || (174...255).contains(b)
            if printable {
                table[b] = Unicode.Scalar(UInt32(b))!
            } else {
                table[b] = Unicode.Scalar(256 + n)!
                n += 1
            }
        }
        return table
    }()

    public static let scalarToByte: [Unicode.Scalar: UInt8] = {
        var m: [Unicode.Scalar: UInt8] = [:]
        for (b, s) in byteToScalar.enumerated() { m[s] = UInt8(b) }
        return m
    }()
}

/// Turns a stream of token ids into text pieces that never split a UTF-8
/// character: bytes of an incomplete character are held until it completes.
public struct StreamingDetokenizer {
    let tokenizer: Tokenizer
    let skipSpecial: Bool
    var pending: [UInt8] = []

    public init(tokenizer: Tokenizer, skipSpecial: Bool = true) {
        self.tokenizer = tokenizer
        self.skipSpecial = skipSpecial
    }

    /// Feeds one token; returns the text that is now complete (maybe empty).
    public mutating func append(_ id: Int) -> String {
        if skipSpecial && tokenizer.specialIDs.contains(id) { return "" }
        pending += tokenizer.bytes(of: id)
        let cut = Self.completePrefixLength(pending)
        guard cut > 0 else { return "" }
        let text = String(decoding: pending[..<cut], as: UTF8.self)
        pending.removeFirst(cut)
        return text
    }

    /// Whatever is still held, with incomplete characters as U+FFFD.
    public mutating func flush() -> String {
        defer { pending.removeAll() }
        return pending.isEmpty ? "" : String(decoding: pending, as: UTF8.self)
    }

    /// Length of the longest prefix that does not end inside a UTF-8
    /// sequence which later bytes could still complete.
    static func completePrefixLength(_ b: [UInt8]) -> Int {
        let n = b.count
        // Look back at most 3 bytes for the lead byte of a trailing sequence.
        var i = n - 1
        var back = 0
        while i >= 0 && back < 4 {
            let c = b[i]
            if c & 0xC0 != 0x80 {
                let need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1
                return (n - i) < need ? i : n
            }
            i -= 1
            back += 1
        }
        return n
    }
}
