// continuum bench audit: what the drift audit costs. One audit's compute
// (the measurements the server's Auditor makes: behaviour on the probe set,
// forgetting on the reference text, personalisation on the user's recent
// text) as a function of the probe set's size, and learning throughput with
// an audit after every version change against none.
import ArgumentParser
import Foundation
import Memory
import Model

struct BenchAudit: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit",
        abstract: "Measure the drift audit's cost against probe-set size and its overhead on learning throughput.")

    @OptionGroup var modelOptions: ModelOptions

    @Option(help: "The probe set (JSON with a probes array).")
    var probes = "Sources/Service/Audit/probes.json"

    @Option(help: "The reference text for the forgetting metric.")
    var reference = "Sources/Service/Audit/reference.txt"

    @Option(help: "Reference tokens scored (the server's audit_reference_tokens default).")
    var referenceTokens = 256

    @Option(help: "Recent user tokens scored (the server's audit_personal_tokens default).")
    var personalTokens = 128

    @Option(help: "Learning jobs (chat turns of the personalisation benchmark) in the throughput comparison.")
    var jobs = 24

    @Option(help: "Repetitions per probe-set size; the median is reported.")
    var repeats = 3

    func run() throws {
        let model = try modelOptions.load()
        struct ProbeFile: Decodable { let probes: [String] }
        guard let probeData = FileManager.default.contents(atPath: probes),
              let referenceData = FileManager.default.contents(atPath: reference) else {
            throw CLIError("cannot read \(probes) or \(reference) (run from the repository root or pass --probes/--reference)")
        }
        let probeTokens = try JSONDecoder().decode(ProbeFile.self, from: probeData).probes.map { model.tokenizer.encode($0) }
        let referenceTokens = Array(model.tokenizer.encode(String(decoding: referenceData, as: UTF8.self)).prefix(self.referenceTokens))
        let turns = Array(PersonalisationBench(model: model, set: try FactSet.load(FactSet.defaultPaths[0]), general: [], passes: 1).turns.prefix(jobs))
        let config = LevelConfiguration.defaults(layers: model.configuration.numHiddenLayers)
        func seconds(_ body: () throws -> Void) rethrows -> Double {
            let start = ContinuousClock.now
            try body()
            let d = (ContinuousClock.now - start).components
            return Double(d.seconds) + Double(d.attoseconds) * 1e-18
        }
        func median(_ x: [Double]) -> Double { x.sorted()[x.count / 2] }

        // One audit as the Auditor's compute runs it: the version and the one before it decoded
        // from their stored bytes, then Drift.measure, with the backbone's reference perplexity
        // computed once and cached as the Auditor does.
        let backboneReference = try model.perplexity(tokens: referenceTokens).perplexity
        func stored(_ learner: LevelLearner) throws -> Data { try LevelStateFile.encode(learner, backbone: model.fingerprint) }
        func audit(_ version: Data, previous: Data?, probes: [[Int]]) throws {
            let learner = try LevelStateFile.decode(version, model: model)
            _ = try Drift.measure(model: model, learner: learner, hasLevels: true,
                                  previous: try previous.map { try LevelStateFile.decode($0, model: model) }, probes: probes,
                                  reference: referenceTokens, backboneReferencePerplexity: backboneReference,
                                  personalTokens: personalTokens, version: 1, jobsApplied: 0)
        }

        // Learning without audits.
        let plain = try LevelLearner(state: try LevelState(configuration: config, model: model.configuration), model: model)
        let off = try seconds { for t in turns { try plain.learn(tokens: t.tokens, learnable: t.learnable) } }
        log(String(format: "learned %d jobs in %.1f s without audits", turns.count, off))

        print("Audit cost by probe-set size (defaults' levels after \(turns.count) learned turns; reference \(referenceTokens.count) tokens, personal \(personalTokens) tokens; median of \(repeats)):")
        print("| probes | positions | behaviour (KL, top-1) ms | forgetting ms | personalisation ms | whole audit (Drift.measure) ms |")
        print("|---|---|---|---|---|---|")
        let forgetting = median(try (0..<repeats).map { _ in try seconds { _ = try model.perplexity(tokens: referenceTokens, adapter: plain.state) } })
        let personal = Array(plain.recentTokens.joined().suffix(personalTokens))
        let personalisation = median(try (0..<repeats).map { _ in
            try seconds {
                _ = try model.perplexity(tokens: personal, adapter: plain.state)
                _ = try model.perplexity(tokens: personal)
            }
        })
        let plainStored = try stored(plain)
        for n in [5, 10, 20, 40, 80] {
            let set = (0..<n).map { probeTokens[$0 % probeTokens.count] }
            let behaviour = median(try (0..<repeats).map { _ in
                try seconds { _ = try Drift.behaviour(model: model, probes: set, state: plain.state) }
            })
            let whole = median(try (0..<repeats).map { _ in try seconds { try audit(plainStored, previous: plainStored, probes: set) } })
            print(String(format: "| %d | %d | %.0f | %.0f | %.0f | %.0f |", n, set.reduce(0) { $0 + $1.count }, behaviour * 1000,
                         forgetting * 1000, personalisation * 1000, whole * 1000))
        }

        // Learning with an audit after every version change (audit_interval_seconds 0), the default probe set.
        let audited = try LevelLearner(state: try LevelState(configuration: config, model: model.configuration), model: model)
        var audits = 0
        var auditedPrevious: Data?
        let on = try seconds {
            for t in turns {
                let before = audited.updatesApplied
                try audited.learn(tokens: t.tokens, learnable: t.learnable)
                if audited.updatesApplied != before {
                    let version = try stored(audited)
                    try audit(version, previous: auditedPrevious, probes: probeTokens)
                    auditedPrevious = version
                    audits += 1
                }
            }
        }
        // The server's default budget: at most one audit per 30 s per user.
        let budgeted = try LevelLearner(state: try LevelState(configuration: config, model: model.configuration), model: model)
        var budgetedAudits = 0
        var lastAudit: ContinuousClock.Instant?
        var budgetedPrevious: Data?
        let onBudget = try seconds {
            for t in turns {
                let before = budgeted.updatesApplied
                try budgeted.learn(tokens: t.tokens, learnable: t.learnable)
                guard budgeted.updatesApplied != before else { continue }
                // Every version is stored; the one before is what an audit compares with.
                let version = try stored(budgeted)
                defer { budgetedPrevious = version }
                if lastAudit.map({ ContinuousClock.now - $0 >= .seconds(30) }) ?? true {
                    try audit(version, previous: budgetedPrevious, probes: probeTokens)
                    budgetedAudits += 1
                    lastAudit = ContinuousClock.now
                }
            }
        }
        print("")
        print("Learning throughput, \(turns.count) jobs (defaults' levels):")
        print("| auditing | audits | seconds | jobs/s | overhead |")
        print("|---|---|---|---|---|")
        print(String(format: "| off | 0 | %.1f | %.2f | |", off, Double(turns.count) / off))
        print(String(format: "| after every version change | %d | %.1f | %.2f | %+.0f%% |", audits, on, Double(turns.count) / on,
                     (on / off - 1) * 100))
        print(String(format: "| at most every 30 s (the default) | %d | %.1f | %.2f | %+.0f%% |", budgetedAudits, onBudget,
                     Double(turns.count) / onBudget, (onBudget / off - 1) * 100))
    }
}
