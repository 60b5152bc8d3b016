// ModelLoader: builds a LlamaModel from a GGUF file or a Hugging Face
// directory (config.json + model.safetensors + tokenizer.json). Checkpoint
// tensor names are mapped to the model's weights here, in one place.
import Foundation
import Tensor

extension LlamaModel {
    /// Loads a model from a `.gguf` file or a Hugging Face model directory.
    public static func load(path: String) throws -> LlamaModel {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw ModelFileError.notFound(path: path)
        }
        return isDir.boolValue ? try loadHuggingFace(directory: path) : try loadGGUF(path: path)
    }

    /// Loads a llama-architecture GGUF file (weights stay memory-mapped).
    public static func loadGGUF(path: String) throws -> LlamaModel {
        let g = try GGUFFile(path: path)
        let arch = g.metadata["general.architecture"]?.stringValue ?? "?"
        guard arch == "llama" else {
            throw ModelFileError.invalid(path: path, message: "architecture '\(arch)' is not supported (only 'llama')")
        }
        let heads = try g.requireInt("llama.attention.head_count")
        let d = try g.requireInt("llama.embedding_length")
        let tokenizer = try Tokenizer(gguf: g)
        let vocab = g.metadata["llama.vocab_size"]?.intValue ?? tokenizer.count
        let config: LlamaConfiguration
        do {
            config = try LlamaConfiguration(
                hiddenSize: d,
                intermediateSize: try g.requireInt("llama.feed_forward_length"),
                numHiddenLayers: try g.requireInt("llama.block_count"),
                numAttentionHeads: heads,
                numKeyValueHeads: g.metadata["llama.attention.head_count_kv"]?.intValue ?? heads,
                headDim: g.metadata["llama.attention.key_length"]?.intValue ?? g.metadata["llama.rope.dimension_count"]?.intValue,
                rmsNormEps: Float(g.metadata["llama.attention.layer_norm_rms_epsilon"]?.doubleValue ?? 1e-5),
                ropeTheta: Float(g.metadata["llama.rope.freq_base"]?.doubleValue ?? 10000),
                vocabSize: vocab,
                maxPositionEmbeddings: try g.requireInt("llama.context_length"),
                tieWordEmbeddings: g.tensors["output.weight"] == nil)
        } catch let e as LlamaConfiguration.Invalid {
            throw ModelFileError.invalid(path: path, message: e.description)
        }
        let c = config
        let layers = try (0..<c.numHiddenLayers).map { i in
            try LlamaLayerWeights(configuration: c, names: .gguf(layer: i), matrix: g.matrix, vector: g.vector)
        }
        let embedding = try g.matrix("token_embd.weight", rows: c.vocabSize, cols: d)
        let weights = LlamaWeights(
            tokenEmbedding: embedding, layers: layers,
            outputNorm: try g.vector("output_norm.weight", count: d),
            output: c.tieWordEmbeddings ? embedding : try g.matrix("output.weight", rows: c.vocabSize, cols: d))
        let templateText = g.metadata["tokenizer.chat_template"]?.stringValue
        let template = ChatTemplate(jinja: templateText) ?? ChatTemplate(defaultSystemPrompt: nil)
        // llama.cpp's converter permutes Q/K rows so rotary pairs are adjacent.
        return LlamaModel(configuration: c, weights: weights, tokenizer: tokenizer, chatTemplate: template,
                          ropeLayout: .adjacentPairs, source: path)
    }

    /// Loads a Hugging Face Llama directory: config.json, model.safetensors,
    /// tokenizer.json (and tokenizer_config.json for the chat template).
    public static func loadHuggingFace(directory: String) throws -> LlamaModel {
        let dir = URL(fileURLWithPath: directory)
        let configPath = dir.appendingPathComponent("config.json").path
        guard let configData = FileManager.default.contents(atPath: configPath) else {
            throw ModelFileError.notFound(path: configPath)
        }
        let raw = (try? JSONSerialization.jsonObject(with: configData) as? [String: Any]) ?? [:]
        if let type = raw["model_type"] as? String, !["llama", "mistral", "smollm"].contains(type) {
            throw ModelFileError.invalid(path: configPath, message: "model_type '\(type)' is not supported (only Llama-family)")
        }
        let c: LlamaConfiguration
        do {
            c = try JSONDecoder().decode(LlamaConfiguration.self, from: configData)
        } catch let e as LlamaConfiguration.Invalid {
            throw ModelFileError.invalid(path: configPath, message: e.description)
        } catch {
            throw ModelFileError.invalid(path: configPath, message: "cannot decode the configuration: \(error)")
        }
        let st = try SafetensorsFile(path: dir.appendingPathComponent("model.safetensors").path)
        let d = c.hiddenSize
        let layers = try (0..<c.numHiddenLayers).map { i in
            try LlamaLayerWeights(configuration: c, names: .huggingFace(layer: i), matrix: st.matrix, vector: st.vector)
        }
        let embedding = try st.matrix("model.embed_tokens.weight", rows: c.vocabSize, cols: d)
        let output = c.tieWordEmbeddings || st.entries["lm_head.weight"] == nil
            ? embedding : try st.matrix("lm_head.weight", rows: c.vocabSize, cols: d)
        let weights = LlamaWeights(tokenEmbedding: embedding, layers: layers,
                                   outputNorm: try st.vector("model.norm.weight", count: d), output: output)
        func ids(_ v: Any?) -> [Int] { (v as? Int).map { [$0] } ?? (v as? [Int]) ?? [] }
        let tokenizer = try Tokenizer(tokenizerJSON: dir.appendingPathComponent("tokenizer.json").path,
                                      bosID: ids(raw["bos_token_id"]).first, eosIDs: Set(ids(raw["eos_token_id"])))
        var templateText: String?
        if let tc = FileManager.default.contents(atPath: dir.appendingPathComponent("tokenizer_config.json").path),
           let obj = try? JSONSerialization.jsonObject(with: tc) as? [String: Any] {
            templateText = obj["chat_template"] as? String
        }
        let template = ChatTemplate(jinja: templateText) ?? ChatTemplate(defaultSystemPrompt: nil)
        return LlamaModel(configuration: c, weights: weights, tokenizer: tokenizer, chatTemplate: template,
                          ropeLayout: .halfSplit, source: directory)
    }
}

/// A decoder block's tensor names in one checkpoint format.
struct LayerTensorNames {
    let attentionNorm, wq, wk, wv, wo, mlpNorm, wGate, wUp, wDown: String

    /// llama.cpp's GGUF names.
    static func gguf(layer i: Int) -> LayerTensorNames {
        let p = "blk.\(i)."
        return LayerTensorNames(
            attentionNorm: p + "attn_norm.weight", wq: p + "attn_q.weight", wk: p + "attn_k.weight",
            wv: p + "attn_v.weight", wo: p + "attn_output.weight", mlpNorm: p + "ffn_norm.weight",
            wGate: p + "ffn_gate.weight", wUp: p + "ffn_up.weight", wDown: p + "ffn_down.weight")
    }

    /// Hugging Face transformers' names.
    static func huggingFace(layer i: Int) -> LayerTensorNames {
        let p = "model.layers.\(i)."
        return LayerTensorNames(
            attentionNorm: p + "input_layernorm.weight", wq: p + "self_attn.q_proj.weight",
            wk: p + "self_attn.k_proj.weight", wv: p + "self_attn.v_proj.weight", wo: p + "self_attn.o_proj.weight",
            mlpNorm: p + "post_attention_layernorm.weight", wGate: p + "mlp.gate_proj.weight",
            wUp: p + "mlp.up_proj.weight", wDown: p + "mlp.down_proj.weight")
    }
}

extension LlamaLayerWeights {
    /// Reads one block's tensors, checking each against the configuration's shapes.
    init(configuration c: LlamaConfiguration, names n: LayerTensorNames,
         matrix: (String, Int, Int) throws -> WeightMatrix, vector: (String, Int) throws -> [Float]) throws {
        let d = c.hiddenSize
        self.init(
            attentionNorm: try vector(n.attentionNorm, d),
            wq: try matrix(n.wq, c.queryDim, d),
            wk: try matrix(n.wk, c.keyValueDim, d),
            wv: try matrix(n.wv, c.keyValueDim, d),
            wo: try matrix(n.wo, d, c.queryDim),
            mlpNorm: try vector(n.mlpNorm, d),
            wGate: try matrix(n.wGate, c.intermediateSize, d),
            wUp: try matrix(n.wUp, c.intermediateSize, d),
            wDown: try matrix(n.wDown, d, c.intermediateSize))
    }
}
