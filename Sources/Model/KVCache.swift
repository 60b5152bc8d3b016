// KVCache: one sequence's keys and values for every layer (per-request run
// state, separate from the read-only weights).

/// Keys and values of one sequence, per layer: [L, KVH*HS] each, growing as
/// tokens are appended.
public final class KVCache: @unchecked Sendable {
    public let layers: Int
    public let kvDim: Int
    public let maxLength: Int
    /// Positions filled (the sequence length so far).
    public private(set) var count = 0
    private(set) var capacity = 0
    private var keys: [UnsafeMutablePointer<Float>] = []
    private var values: [UnsafeMutablePointer<Float>] = []

    public init(layers: Int, kvDim: Int, maxLength: Int) {
        self.layers = layers
        self.kvDim = kvDim
        self.maxLength = maxLength
    }

    deinit {
        for p in keys { p.deallocate() }
        for p in values { p.deallocate() }
    }

    /// Makes room for `n` more positions.
    func reserve(_ n: Int) {
        let need = count + n
        guard need > capacity else { return }
        let newCap = min(maxLength, max(need, max(64, capacity * 2)))
        for l in 0..<layers {
            let k = UnsafeMutablePointer<Float>.allocate(capacity: newCap * kvDim)
            let v = UnsafeMutablePointer<Float>.allocate(capacity: newCap * kvDim)
            if capacity > 0 {
                k.update(from: keys[l], count: count * kvDim)
                v.update(from: values[l], count: count * kvDim)
                keys[l].deallocate()
                values[l].deallocate()
                keys[l] = k
                values[l] = v
            } else {
                keys.append(k)
                values.append(v)
            }
        }
        capacity = newCap
    }

    /// Keys of layer l: [capacity, KVH*HS].
    func keys(_ l: Int) -> UnsafeMutablePointer<Float> { keys[l] }
    /// Values of layer l: [capacity, KVH*HS].
    func values(_ l: Int) -> UnsafeMutablePointer<Float> { values[l] }

    func advance(_ n: Int) { count += n }
}
