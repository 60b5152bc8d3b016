// LlamaConfiguration: the shape of a Llama-family model, as Hugging Face's
// config.json spells it, or read from GGUF metadata.
import Foundation

/// Hyper-parameters of a Llama-family decoder. Decodes from a Hugging Face
/// `config.json` (snake_case keys); optional keys take Llama's defaults; the
/// values are validated on decode with a message saying what is wrong.
public struct LlamaConfiguration: Codable, Sendable, Equatable {
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var numHiddenLayers: Int
    public var numAttentionHeads: Int
    public var numKeyValueHeads: Int
    public var headDim: Int
    public var rmsNormEps: Float
    public var ropeTheta: Float
    public var vocabSize: Int
    public var maxPositionEmbeddings: Int
    public var tieWordEmbeddings: Bool

    enum CodingKeys: String, CodingKey {
        case hiddenSize = "hidden_size"
        case intermediateSize = "intermediate_size"
        case numHiddenLayers = "num_hidden_layers"
        case numAttentionHeads = "num_attention_heads"
        case numKeyValueHeads = "num_key_value_heads"
        case headDim = "head_dim"
        case rmsNormEps = "rms_norm_eps"
        case ropeTheta = "rope_theta"
        case vocabSize = "vocab_size"
        case maxPositionEmbeddings = "max_position_embeddings"
        case tieWordEmbeddings = "tie_word_embeddings"
    }

    public init(hiddenSize: Int, intermediateSize: Int, numHiddenLayers: Int, numAttentionHeads: Int,
                numKeyValueHeads: Int, headDim: Int? = nil, rmsNormEps: Float = 1e-6, ropeTheta: Float = 10000,
                vocabSize: Int, maxPositionEmbeddings: Int = 2048, tieWordEmbeddings: Bool = false) throws {
        self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize
        self.numHiddenLayers = numHiddenLayers
        self.numAttentionHeads = numAttentionHeads
        self.numKeyValueHeads = numKeyValueHeads
        self.headDim = headDim ?? (numAttentionHeads > 0 ? hiddenSize / numAttentionHeads : 0)
        self.rmsNormEps = rmsNormEps
        self.ropeTheta = ropeTheta
        self.vocabSize = vocabSize
        self.maxPositionEmbeddings = maxPositionEmbeddings
        self.tieWordEmbeddings = tieWordEmbeddings
        try validate()
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let heads = try c.decode(Int.self, forKey: .numAttentionHeads)
        let hidden = try c.decode(Int.self, forKey: .hiddenSize)
        try self.init(
            hiddenSize: hidden,
            intermediateSize: try c.decode(Int.self, forKey: .intermediateSize),
            numHiddenLayers: try c.decode(Int.self, forKey: .numHiddenLayers),
            numAttentionHeads: heads,
            numKeyValueHeads: try c.decodeIfPresent(Int.self, forKey: .numKeyValueHeads) ?? heads,
            headDim: try c.decodeIfPresent(Int.self, forKey: .headDim),
            rmsNormEps: try c.decodeIfPresent(Float.self, forKey: .rmsNormEps) ?? 1e-6,
            ropeTheta: try c.decodeIfPresent(Float.self, forKey: .ropeTheta) ?? 10000,
            vocabSize: try c.decode(Int.self, forKey: .vocabSize),
            maxPositionEmbeddings: try c.decodeIfPresent(Int.self, forKey: .maxPositionEmbeddings) ?? 2048,
            tieWordEmbeddings: try c.decodeIfPresent(Bool.self, forKey: .tieWordEmbeddings) ?? false)
    }

    /// Width of all query heads together.
    public var queryDim: Int { numAttentionHeads * headDim }
    /// Width of all key (or value) heads together.
    public var keyValueDim: Int { numKeyValueHeads * headDim }

    public struct Invalid: Error, CustomStringConvertible {
        public let description: String
    }

    public func validate() throws {
        func fail(_ m: String) throws -> Never { throw Invalid(description: "invalid model configuration: " + m) }
        for (name, v) in [("hidden_size", hiddenSize), ("intermediate_size", intermediateSize),
                          ("num_hidden_layers", numHiddenLayers), ("num_attention_heads", numAttentionHeads),
                          ("num_key_value_heads", numKeyValueHeads), ("head_dim", headDim),
                          ("vocab_size", vocabSize), ("max_position_embeddings", maxPositionEmbeddings)] where v <= 0 {
            try fail("\(name) must be positive, got \(v)")
        }
        if numAttentionHeads % numKeyValueHeads != 0 {
            try fail("num_attention_heads (\(numAttentionHeads)) must be a multiple of num_key_value_heads (\(numKeyValueHeads))")
        }
        if headDim % 2 != 0 { try fail("head_dim must be even for rotary embeddings, got \(headDim)") }
        if !(rmsNormEps > 0) { try fail("rms_norm_eps must be positive, got \(rmsNormEps)") }
        if !(ropeTheta > 0) { try fail("rope_theta must be positive, got \(ropeTheta)") }
    }
}
