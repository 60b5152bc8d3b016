// Reading a tokenizer from GGUF metadata or a Hugging Face tokenizer.json.
import Foundation

extension Tokenizer {
    /// The tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata.
    public convenience init(gguf: GGUFFile) throws {
        let path = gguf.path
        guard let model = try gguf.require("tokenizer.ggml.model").stringValue, model == "gpt2" else {
            let m = gguf.metadata["tokenizer.ggml.model"]?.stringValue ?? "?"
            throw ModelFileError.invalid(path: path, message: "tokenizer model '\(m)' is not supported (only byte-level BPE, 'gpt2')")
        }
        guard let tokenValues = try gguf.require("tokenizer.ggml.tokens").arrayValue else {
            throw ModelFileError.invalid(path: path, message: "tokenizer.ggml.tokens is not an array")
        }
        let tokens = tokenValues.map { $0.stringValue ?? "" }
        let mergeValues = try gguf.require("tokenizer.ggml.merges").arrayValue ?? []
        var merges: [(String, String)] = []
        merges.reserveCapacity(mergeValues.count)
        for v in mergeValues {
            guard let s = v.stringValue, let space = s.firstIndex(of: " ") else { continue }
            merges.append((String(s[..<space]), String(s[s.index(after: space)...])))
        }
        let types = (gguf.metadata["tokenizer.ggml.token_type"]?.arrayValue ?? []).map { $0.intValue ?? 1 }
        // GGUF token types: 3 control, 4 user-defined: both are added tokens.
        var added: [(id: Int, special: Bool)] = []
        for (i, t) in types.enumerated() where t == 3 || t == 4 { added.append((i, t == 3)) }
        let pre = gguf.metadata["tokenizer.ggml.pre"]?.stringValue ?? "default"
        let digits: Bool
        switch pre {
        case "smollm", "starcoder", "refact", "codeshell": digits = true
        case "default", "gpt-2", "gpt2": digits = false
        default:
            throw ModelFileError.invalid(path: path, message: "pre-tokenizer '\(pre)' is not supported (smollm, starcoder, refact, codeshell, gpt-2, default)")
        }
        let bos = gguf.metadata["tokenizer.ggml.bos_token_id"]?.intValue
        var eos = Set<Int>()
        if let e = gguf.metadata["tokenizer.ggml.eos_token_id"]?.intValue { eos.insert(e) }
        if let e = gguf.metadata["tokenizer.ggml.eot_token_id"]?.intValue { eos.insert(e) }
        do {
            try self.init(tokens: tokens, merges: merges, added: added,
                          preTokenizer: PreTokenizer(individualDigits: digits), bosID: bos, eosIDs: eos)
        } catch let e as LoadError {
            throw ModelFileError.invalid(path: path, message: e.description)
        }
    }

    /// A Hugging Face `tokenizer.json` (BPE model, ByteLevel pre-tokenizer,
    /// optionally preceded by Digits). `eosIDs` come from the model config.
    public convenience init(tokenizerJSON path: String, bosID: Int?, eosIDs: Set<Int>) throws {
        guard let data = FileManager.default.contents(atPath: path) else { throw ModelFileError.notFound(path: path) }
        guard let root = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw ModelFileError.invalid(path: path, message: "not a JSON object")
        }
        func fail(_ m: String) -> ModelFileError { .invalid(path: path, message: m) }
        guard let model = root["model"] as? [String: Any], (model["type"] as? String) == "BPE" else {
            throw fail("only BPE tokenizer models are supported")
        }
        if let n = root["normalizer"], !(n is NSNull) { throw fail("normalizers are not supported") }
        guard let vocab = model["vocab"] as? [String: Int] else { throw fail("model.vocab is missing") }
        var merges: [(String, String)] = []
        for m in (model["merges"] as? [Any]) ?? [] {
            if let s = m as? String, let sp = s.firstIndex(of: " ") {
                merges.append((String(s[..<sp]), String(s[s.index(after: sp)...])))
            } else if let pair = m as? [String], pair.count == 2 {
                merges.append((pair[0], pair[1]))
            } else {
                throw fail("malformed merge entry \(m)")
            }
        }
        var addedList: [(id: Int, special: Bool, content: String)] = []
        for a in (root["added_tokens"] as? [[String: Any]]) ?? [] {
            guard let id = a["id"] as? Int, let content = a["content"] as? String else { throw fail("malformed added token") }
            addedList.append((id, (a["special"] as? Bool) ?? false, content))
        }
        let size = max(vocab.values.max() ?? -1, addedList.map(\.id).max() ?? -1) + 1
        var tokens = [String](repeating: "", count: size)
        for (t, i) in vocab { tokens[i] = t }
        for a in addedList { tokens[a.id] = a.content }
        let digits = try Self.parsePreTokenizer(root["pre_tokenizer"], fail: fail)
        do {
            try self.init(tokens: tokens, merges: merges, added: addedList.map { ($0.id, $0.special) },
                          preTokenizer: PreTokenizer(individualDigits: digits), bosID: bosID, eosIDs: eosIDs,
                          ignoreMerges: (model["ignore_merges"] as? Bool) ?? false,
                          unknownID: (model["unk_token"] as? String).flatMap { vocab[$0] })
        } catch let e as LoadError {
            throw fail(e.description)
        }
    }

    /// Returns whether the pre-tokenizer isolates digits; throws for any
    /// pre-tokenizer other than ByteLevel(regex) or Sequence[Digits, ByteLevel].
    private static func parsePreTokenizer(_ node: Any?, fail: (String) -> ModelFileError) throws -> Bool {
        guard let obj = node as? [String: Any], let type = obj["type"] as? String else {
            throw fail("pre_tokenizer is missing")
        }
        func isByteLevel(_ o: [String: Any]) -> Bool {
            (o["type"] as? String) == "ByteLevel" && (o["use_regex"] as? Bool ?? true)
                && !(o["add_prefix_space"] as? Bool ?? false)
        }
        if type == "ByteLevel" && isByteLevel(obj) { return false }
        if type == "Sequence", let list = obj["pretokenizers"] as? [[String: Any]], list.count == 2,
           (list[0]["type"] as? String) == "Digits", (list[0]["individual_digits"] as? Bool) == true,
           isByteLevel(list[1]) {
            return true
        }
        throw fail("pre_tokenizer \(type) is not supported (ByteLevel, or Sequence[Digits(individual_digits), ByteLevel])")
    }
}
