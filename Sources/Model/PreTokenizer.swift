// PreTokenizer: splits text into the pieces that byte-level BPE encodes
// separately, exactly as Hugging Face `tokenizers` does for GPT-2 style
// models: optional Digits(individual_digits) followed by ByteLevel's regex
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// implemented as a scanner over Unicode scalars (no regex engine needed).

/// The pre-tokenisation rule of a byte-level BPE tokenizer.
public struct PreTokenizer: Sendable, Equatable {
    /// Isolate every numeric character before the regex runs (SmolLM,
    /// StarCoder: `Digits(individual_digits: true)`).
    public var individualDigits: Bool

    public init(individualDigits: Bool) {
        self.individualDigits = individualDigits
    }

    @inline(__always) static func isLetter(_ c: Unicode.Scalar) -> Bool {
        switch c.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: true
        default: false
        }
    }

    @inline(__always) static func isNumber(_ c: Unicode.Scalar) -> Bool {
        switch c.properties.generalCategory {
        case .decimalNumber, .letterNumber, .otherNumber: true
        default: false
        }
    }

    @inline(__always) static func isSpace(_ c: Unicode.Scalar) -> Bool {
        c.properties.isWhitespace
    }

    /// Splits `text` into pieces; concatenated they give back `text`.
    public func split(_ text: String) -> [Substring.UnicodeScalarView] {
        let scalars = text.unicodeScalars
        var pieces: [Substring.UnicodeScalarView] = []
        if individualDigits {
            var start = scalars.startIndex
            var i = start
            while i < scalars.endIndex {
                if Self.isNumber(scalars[i]) {
                    if start < i { Self.regexSplit(scalars[start..<i], into: &pieces) }
                    let next = scalars.index(after: i)
                    pieces.append(scalars[i..<next])
                    start = next
                    i = next
                } else {
                    i = scalars.index(after: i)
                }
            }
            if start < scalars.endIndex { Self.regexSplit(scalars[start...], into: &pieces) }
        } else {
            Self.regexSplit(scalars[...], into: &pieces)
        }
        return pieces
    }

    /// The ByteLevel (GPT-2) regex, alternative by alternative.
    static func regexSplit(_ s: Substring.UnicodeScalarView, into pieces: inout [Substring.UnicodeScalarView]) {
        let a = Array(s)
        let n = a.count
        var idx: [String.UnicodeScalarView.Index] = []
        idx.reserveCapacity(n + 1)
        var k = s.startIndex
        while k < s.endIndex { idx.append(k); k = s.index(after: k) }
        idx.append(s.endIndex)

        func isOther(_ c: Unicode.Scalar) -> Bool { !isSpace(c) && !isLetter(c) && !isNumber(c) }
        func run(from j: Int, _ pred: (Unicode.Scalar) -> Bool) -> Int {
            var j = j
            while j < n && pred(a[j]) { j += 1 }
            return j
        }

        var i = 0
        while i < n {
            let c = a[i]
            var end = i + 1
            if c == "'" && i + 1 < n, let len = contraction(a, i + 1) {
                end = i + 1 + len
            } else if c == " " && i + 1 < n && !isSpace(a[i + 1]) {
                let d = a[i + 1]
                if isLetter(d) { end = run(from: i + 1, isLetter) }
                else if isNumber(d) { end = run(from: i + 1, isNumber) }
                else { end = run(from: i + 1, isOther) }
            } else if isLetter(c) {
                end = run(from: i, isLetter)
            } else if isNumber(c) {
                end = run(from: i, isNumber)
            } else if !isSpace(c) {
                end = run(from: i, isOther)
            } else {
                let j = run(from: i, isSpace)
                if j == n || j - i == 1 { end = j } else { end = j - 1 }
            }
            pieces.append(s[idx[i]..<idx[end]])
            i = end
        }
    }

    /// Length of the contraction suffix ('s 't 're 've 'm 'll 'd) at `j`.
    static func contraction(_ a: [Unicode.Scalar], _ j: Int) -> Int? {
        let c = a[j]
        if j + 1 < a.count {
            let d = a[j + 1]
            if (c == "r" && d == "e") || (c == "v" && d == "e") || (c == "l" && d == "l") { return 2 }
        }
        if c == "s" || c == "t" || c == "m" || c == "d" { return 1 }
        return nil
    }
}
