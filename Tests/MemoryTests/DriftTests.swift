// Drift measures against plain references: KL and top-1 agreement against
// a direct Double computation from softmax, exact zeros at the backbone, and
// parameter norms.
import Foundation
import Testing
import TestSupport
@testable import Memory
@testable import Model

@Suite("Drift measures")
struct DriftTests {
    /// KL(p ‖ q) from the definition, with each softmax computed on its own.
    static func referenceKL(_ u: [Float], _ b: [Float]) -> Double {
        func softmax(_ x: [Float]) -> [Double] {
            let m = Double(x.max()!)
            let e = x.map { exp(Double($0) - m) }
            let s = e.reduce(0, +)
            return e.map { $0 / s }
        }
        let p = softmax(u), q = softmax(b)
        return zip(p, q).reduce(0.0) { $0 + ($1.0 > 0 ? $1.0 * log($1.0 / $1.1) : 0) }
    }

    @Test("KL and top-1 agreement match the definitions on random logits; identical logits give exactly 0 and agreement")
    func klAgainstReference() {
        var rng = SeededGenerator(seed: 7)
        for v in [2, 17, 1000, 49152] {
            let u = (0..<v).map { _ in Float(rng.next() % 20001) / 1000 - 10 }
            let b = (0..<v).map { _ in Float(rng.next() % 20001) / 1000 - 10 }
            let (kl, same) = u.withUnsafeBufferPointer { up in
                b.withUnsafeBufferPointer { Drift.klAndAgreement(user: up.baseAddress!, backbone: $0.baseAddress!, count: v) }
            }
            let ref = Self.referenceKL(u, b)
            #expect(abs(kl - ref) <= 1e-9 * max(1, ref), "V=\(v): \(kl) vs \(ref)")
            #expect(same == (u.indices.max { u[$0] < u[$1] } == b.indices.max { b[$0] < b[$1] }))
            let (zero, agree) = u.withUnsafeBufferPointer {
                Drift.klAndAgreement(user: $0.baseAddress!, backbone: $0.baseAddress!, count: v)
            }
            #expect(zero == 0 && agree)
        }
    }

    @Test("through a model: no levels give KL 0 and agreement 1; learned levels move both; norms follow the levels")
    func behaviourThroughModel() throws {
        let model = try Fixtures.tinyLlama()   // nothing here depends on the model's weights
        let probes = ["The capital of France is", "Two plus two equals"].map { model.tokenizer.encode($0) }
        let none = try Drift.behaviour(model: model, probes: probes, state: nil)
        #expect(none == BehaviouralDrift(klMean: 0, klMax: 0, top1Agreement: 1, positions: probes.reduce(0) { $0 + $1.count }))
        let layers = model.configuration.numHiddenLayers
        try #require(layers >= 2)
        let config = try LevelConfiguration(levels: [.init(name: "fast", chunkSize: 8, width: 8, layers: [layers - 2, layers - 1],
                                                          learningRate: 1e-2)])
        let fresh = try LevelState(configuration: config, model: model.configuration)
        // A fresh level adds nothing: bit-identical outputs, so exactly zero too.
        #expect(try Drift.behaviour(model: model, probes: probes, state: fresh).klMax == 0)
        #expect(Drift.norms(fresh) == [[0, 0]])
        let learned = try LevelState(configuration: config, model: model.configuration)
        perturb(learned, seed: 3, scale: 0.5)
        let moved = try Drift.behaviour(model: model, probes: probes, state: learned)
        #expect(moved.klMean > 0 && moved.klMax >= moved.klMean && moved.top1Agreement <= 1)
        let norms = Drift.norms(learned)
        let expected = learned.blocks[0].map { b in b.down.reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot() }
        #expect(zip(norms[0], expected).allSatisfy { abs($0 - $1) <= 1e-9 * $1 })
        #expect(zip(Drift.change(learned, from: fresh)[0], expected).allSatisfy { abs($0 - $1) <= 1e-9 * $1 })
    }
}
