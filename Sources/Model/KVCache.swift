// KVCache: one sequence's keys and values for every layer (per-request run
// state, separate from the read-only weights).

/// Keys and values of one sequence, per layer: [L, KVH*HS] each, growing as
/// tokens are appended. A cache may hold only the layers from `firstLayer`
/// up (a learning stream keeps the frozen layers below the adapted ones in a
/// cache of their own).
public final class KVCache: @unchecked Sendable {
    public let layers: Int
    public let kvDim: Int
    public let maxLength: Int
    /// The lowest layer this cache holds (layers below it have no storage).
    public let firstLayer: Int
    /// Positions filled (the sequence length so far).
    public private(set) var count = 0
    private(set) var capacity = 0
    private var keys: [UnsafeMutablePointer<Float>] = []
    private var values: [UnsafeMutablePointer<Float>] = []

    public init(layers: Int, kvDim: Int, maxLength: Int, firstLayer: Int = 0) {
        precondition((0...layers).contains(firstLayer))
        self.layers = layers
        self.kvDim = kvDim
        self.maxLength = maxLength
        self.firstLayer = firstLayer
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
        for i in 0..<(layers - firstLayer) {
            let k = UnsafeMutablePointer<Float>.allocate(capacity: newCap * kvDim)
            let v = UnsafeMutablePointer<Float>.allocate(capacity: newCap * kvDim)
            if capacity > 0 {
                k.update(from: keys[i], count: count * kvDim)
                v.update(from: values[i], count: count * kvDim)
                keys[i].deallocate()
                values[i].deallocate()
                keys[i] = k
                values[i] = v
            } else {
                keys.append(k)
                values.append(v)
            }
        }
        capacity = newCap
    }

    /// Keys of layer l: [capacity, KVH*HS].
    func keys(_ l: Int) -> UnsafeMutablePointer<Float> {
        precondition(l >= firstLayer, "the cache holds layers from \(firstLayer), not \(l)")
        return keys[l - firstLayer]
    }
    /// Values of layer l: [capacity, KVH*HS].
    func values(_ l: Int) -> UnsafeMutablePointer<Float> {
        precondition(l >= firstLayer, "the cache holds layers from \(firstLayer), not \(l)")
        return values[l - firstLayer]
    }

    func advance(_ n: Int) { count += n }
}
