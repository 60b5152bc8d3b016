// Backward: gradients of a loss with respect to the residual stream, through
// the frozen backbone, from the final norm down to the adapter of a tape's
// lowest layer. The backbone's weights get no gradients; a per-layer callback
// lets the memory levels take theirs.
//
// Only the tape's own rows take gradients. Keys and values of earlier rows
// (positions 0..<tape.start, in the tape's cache) are constants: the new rows
// attend to them, and no gradient flows back into them.
//
// Shape letters as in LlamaModel.swift; T the tape's rows, L = start + T.
import Tensor

extension LlamaModel {
    /// Backpropagates dL/d(final RMSNorm output) through the layers the tape
    /// recorded, top down. At each layer the callback runs first with the
    /// layer's post-MLP hidden state (the adapter's input) and turns dL/d(the
    /// layer's output) into dL/d(that input) in place, taking its own
    /// parameter gradients on the way. The pass stops after the callback of
    /// the tape's lowest layer: nothing below it takes gradients.
    ///   dNormed: [T, D]
    /// Returns dL/d(the lowest layer's post-MLP stream): [T, D].
    @discardableResult
    public func backward(tape: ActivationTape, dNormed: [Float],
                         adapter: (_ layer: Int, _ hiddenIn: UnsafePointer<Float>, _ dHidden: UnsafeMutablePointer<Float>) -> Void)
        -> [Float] {
        let c = configuration
        let t = tape.positions.count, start = tape.start
        let d = c.hiddenSize, qDim = c.queryDim, kvDim = c.keyValueDim, f = c.intermediateSize
        guard let cache = tape.cache else { preconditionFailure("the tape has no cache: it did not record a forward pass") }
        precondition(cache.count == start + t, "the tape's cache moved on since its forward pass")
        var dx = [Float](repeating: 0, count: t * d)   // dL/d(residual stream), [T, D]
        Ops.rmsNormBackward(tape.finalHidden, weight: weights.outputNorm, eps: c.rmsNormEps, rows: t, dim: d,
                            dy: dNormed, dx: &dx, dweight: nil)
        let reversed = tape.positions.map { -$0 }   // RoPE's transpose rotates back
        for l in stride(from: c.numHiddenLayers - 1, through: tape.fromLayer, by: -1) {
            guard let a = tape.layers[l] else { preconditionFailure("the tape has no activations for layer \(l)") }
            let w = weights.layers[l]
            a.xPostMLP.withUnsafeBufferPointer { hin in
                dx.withUnsafeMutableBufferPointer { adapter(l, hin.baseAddress!, $0.baseAddress!) }
            }
            if l == tape.fromLayer { break }
            // MLP: x_post = x_mid + W_down·swiglu(W_gate·xn2, W_up·xn2), xn2 = RMSNorm(x_mid)
            var ds = [Float](repeating: 0, count: t * f)
            w.wDown.matmulBackward(dx, count: t, into: &ds)
            var da = ds, db = ds
            Ops.swigluBackward(a: a.gate, b: a.up, dout: ds, count: t * f, da: &da, db: &db)
            var dxn = [Float](repeating: 0, count: t * d)
            w.wGate.matmulBackward(da, count: t, into: &dxn)
            w.wUp.matmulBackward(db, count: t, into: &dxn, accumulate: true)
            Ops.rmsNormBackward(a.xMid, weight: w.mlpNorm, eps: c.rmsNormEps, rows: t, dim: d, dy: dxn, dx: &dx, dweight: nil)
            // Attention: x_mid = x_in + W_o·attention(RoPE(W_q·xn1), RoPE(W_k·xn1), W_v·xn1),
            // the new rows' queries against the cached and the new keys.
            var datt = [Float](repeating: 0, count: t * qDim)
            w.wo.matmulBackward(dx, count: t, into: &datt)
            var dq = [Float](repeating: 0, count: t * qDim)
            var dk = [Float](repeating: 0, count: t * kvDim), dv = dk
            Attention.cachedBackward(q: a.q, k: cache.keys(l), v: cache.values(l), dOut: datt, tokens: t, start: start,
                                     heads: c.numAttentionHeads, kvHeads: c.numKeyValueHeads, headSize: c.headDim,
                                     dq: &dq, dk: &dk, dv: &dv)
            rope.apply(&dq, positions: reversed, heads: c.numAttentionHeads)
            rope.apply(&dk, positions: reversed, heads: c.numKeyValueHeads)
            dxn = [Float](repeating: 0, count: t * d)
            w.wq.matmulBackward(dq, count: t, into: &dxn)
            w.wk.matmulBackward(dk, count: t, into: &dxn, accumulate: true)
            w.wv.matmulBackward(dv, count: t, into: &dxn, accumulate: true)
            Ops.rmsNormBackward(a.xIn, weight: w.attentionNorm, eps: c.rmsNormEps, rows: t, dim: d, dy: dxn, dx: &dx, dweight: nil)
        }
        return dx
    }
}
