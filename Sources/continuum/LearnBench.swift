// continuum bench learn: the personalisation benchmark. A synthetic user
// teaches 20 invented facts in 80 chat turns (each fact in 4 turns,
// interleaved); the levels learn from each turn with the CMS rule as it
// arrives. Each fact set (scripts/bench-data/facts-N.json, written once) is
// measured the same way, side by side:
//   in context   the bare backbone with the asked fact's turns, all turns, or nothing in its context
//   wake         the levels after the turns
//   fast cleared the fast level decayed, nothing consolidated
//   consolidated distillation (teacher: the levels), fast cleared
//   transplant   fast's units written into mid's least-used units (the service's default), alone and + steps
//   sleep        sleep that distils from context (Sleep.swift), fast cleared
//   sleep + wake after sleep, the user goes on to teach the other set's turns
//   two nights   transplant, the other set's turns, transplant again (both sets' recall after it)
// `--wake-only` keeps the rows without distillation (a few minutes in a release build).
// Reported per row: recall on held-out questions (answer NLL, greedy exact
// match, free answers), locality (perplexity of unrelated general text and
// of the set's neighbourhood paragraphs: its topics without its facts),
// cost; isolation (a second user's logits against the backbone's); sleep's
// seconds per 1,000 learned tokens; and, on the first set, ablations.
import ArgumentParser
import Foundation
import Memory
import Model
import Tensor

/// One fact: what the user says, and how it is asked about afterwards.
struct BenchFact: Decodable {
    /// The fact's answer, as it should appear after `leadIn`.
    let answer: String
    /// Four user turns that each mention the fact.
    let teach: [String]
    /// Held-out question (a phrasing no teaching turn uses).
    let question: String
    /// Start of the assistant's answer, completed by " " + answer.
    let leadIn: String

    enum CodingKeys: String, CodingKey { case answer, teach, question, leadIn = "lead_in" }
}

/// A fact set: the facts, and paragraphs on their topics that hold none of them.
struct FactSet: Decodable {
    let facts: [BenchFact]
    let neighbourhood: [String]
    /// The file's name without directory and extension.
    var name = ""

    enum CodingKeys: String, CodingKey { case facts, neighbourhood }

    static let defaultPaths = ["scripts/bench-data/facts-1.json", "scripts/bench-data/facts-2.json"]

    static func load(_ path: String) throws -> FactSet {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw CLIError("cannot read \(path) (run from the repository root or pass --facts)")
        }
        var set = try JSONDecoder().decode(FactSet.self, from: data)
        guard !set.facts.isEmpty, set.facts.allSatisfy({ !$0.teach.isEmpty && !$0.answer.isEmpty }) else {
            throw CLIError("\(path): every fact needs an answer and at least one teaching turn")
        }
        set.name = URL(fileURLWithPath: path).deletingPathExtension().lastPathComponent
        return set
    }
}

struct BenchLearn: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "learn",
        abstract: "Personalisation benchmark: teach invented facts, measure recall (wake, sleep), locality, isolation and cost; prints tables.")

    @OptionGroup var modelOptions: ModelOptions

    @Option(help: "Level configuration (JSON or YAML) to measure (default: the built-in defaults).")
    var levels: String?

    @Option(help: "Sleep configuration (JSON) to measure (default: the built-in defaults).")
    var sleep: String?

    @Option(help: "Fact sets, comma-separated JSON files ({facts: [{answer, teach, question, lead_in}], neighbourhood: [paragraph]}).")
    var facts = FactSet.defaultPaths.joined(separator: ",")

    @Option(help: "General text whose perplexity measures forgetting (not the user's).")
    var generalText = "Tests/ModelTests/Fixtures/perplexity.txt"

    @Option(help: "Ablations on the first fact set, comma-separated, from: fast-only, mid-only, chunks-half, chunks-double, m3, sgd, no-gate (min_surprise 0), backbone-keys (keys from the frozen MLP), recomputed-prefix (learning semantics before streaming), sleep-no-locality, sleep-teacher-levels, sleep-one-question, sleep-text-answers (the user's text as the answer). 'all' or 'none'.")
    var ablations = "all"

    @Option(help: "Optimizer steps of today's consolidation.")
    var consolidationSteps = 80

    @Option(help: "Times the turns are taught (the benchmark's protocol is 1; more shows what repetition buys).")
    var passes = 1

    @Flag(inversion: .prefixedNo, help: "Measure the in-context rows (the backbone with the turns in its context; slow: a long prompt per question).")
    var inContext = true

    @Flag(help: "Only the rows that need no distillation (in context, wake, fast cleared, transplant, two nights, wake ablations): a quick look at what wake stores and what transplant keeps.")
    var wakeOnly = false

    @Flag(help: "Print per-fact results and sleep's questions on stderr.")
    var verbose = false

    /// The ablations that run sleep from context (`--wake-only` skips them).
    static let sleepAblations = ["sleep-no-locality", "sleep-teacher-levels", "sleep-one-question", "sleep-text-answers"]
    static let allAblations = ["fast-only", "mid-only", "chunks-half", "chunks-double", "m3", "sgd", "no-gate", "backbone-keys",
                               "recomputed-prefix"] + sleepAblations

    func run() throws {
        let chosen = ablations == "all" ? Self.allAblations : ablations == "none" ? [] : ablations.split(separator: ",").map(String.init)
        if let bad = chosen.first(where: { !Self.allAblations.contains($0) }) {
            throw ValidationError("unknown ablation '\(bad)' (known: \(Self.allAblations.joined(separator: ", ")))")
        }
        guard passes >= 1 else { throw ValidationError("--passes must be at least 1") }
        guard let generalData = FileManager.default.contents(atPath: generalText) else {
            throw CLIError("cannot read \(generalText) (run from the repository root or pass --general-text)")
        }
        let sets = try facts.split(separator: ",").map { try FactSet.load(String($0)) }
        guard !sets.isEmpty else { throw ValidationError("--facts names no file") }
        let model = try modelOptions.load()
        let base = try levels.map { try LevelConfiguration.load(path: $0) } ?? .defaults(layers: model.configuration.numHiddenLayers)
        let sleepConfiguration = try sleep.map { path -> SleepConfiguration in
            guard let data = FileManager.default.contents(atPath: path) else { throw CLIError("cannot read \(path)") }
            return try JSONDecoder().decode(SleepConfiguration.self, from: data)
        } ?? SleepConfiguration()
        let general = model.tokenizer.encode(String(decoding: generalData, as: UTF8.self))
        let benches = sets.map { PersonalisationBench(model: model, set: $0, general: general, passes: passes) }
        print("CPU: \(BenchLearnCost.cpuDescription().model); threads \(Parallel.threads); \(Date())")
        print("")

        func pct(_ a: Double, _ b: Double) -> String { String(format: "%+.1f%%", (b / a - 1) * 100) }
        // Each set's bare-backbone evaluation, once: its own table and the other set's two-nights line use it.
        var baselines = [PersonalisationBench.Evaluation?](repeating: nil, count: benches.count)
        func baseline(_ i: Int) throws -> PersonalisationBench.Evaluation {
            if let b = baselines[i] { return b }
            let b = try benches[i].evaluate(nil)
            baselines[i] = b
            return b
        }
        for (k, bench) in benches.enumerated() {
            let n = bench.set.facts.count
            log("\(bench.set.name): \(bench.turns.count) teaching turns, \(bench.learnedTokens) learnable tokens; \(bench.general.count) tokens of general text, \(bench.neighbourhood.count) of neighbourhood text")
            var rows: [(String, PersonalisationBench.Row)] = []
            let before = try baseline(k)
            rows.append(("backbone, nothing in context", PersonalisationBench.Row(evaluation: before)))
            if inContext {
                rows.append(("backbone, the asked fact's turns in context", PersonalisationBench.Row(evaluation: try bench.evaluate(nil, context: .askedFact))))
                rows.append(("backbone, all turns in context", PersonalisationBench.Row(evaluation: try bench.evaluate(nil, context: .allTurns))))
            }

            let (wake, wakeRow) = try bench.train(base)
            rows.append(("wake (levels after the turns)", wakeRow))
            if verbose { bench.logFacts(wakeRow.evaluation, "wake") }
            let isolation = try bench.isolation(wake.state)
            guard let pair = base.consolidation else { throw ValidationError("the benchmark needs at least two levels") }

            let decayed = try bench.clone(wake)
            decayed.state.blocks[pair.source] = try LevelState(configuration: base, model: model.configuration).blocks[pair.source]
            rows.append(("fast cleared, nothing consolidated", bench.row(try bench.evaluate(decayed.state), from: wakeRow, learner: decayed)))

            var consolidationSeconds = 0.0
            if !wakeOnly {
                let t0 = Date()
                let consolidated = try bench.clone(wake)
                let report = try consolidated.consolidate(contexts: consolidated.recentTokens,
                                                          budget: ConsolidationBudget(steps: consolidationSteps, generatedTokens: 32))
                consolidationSeconds = Date().timeIntervalSince(t0)
                log(String(format: "consolidation: %d steps on %d positions in %.1f s; KL %.4f → %.4f", report.steps,
                           report.positions, consolidationSeconds, report.klBefore, report.klAfter))
                rows.append(("consolidated (teacher: the levels), fast cleared", bench.row(try bench.evaluate(consolidated.state), from: wakeRow, learner: consolidated)))
            }
            var transplantSeconds = 0.0
            var transplantedOnce: LevelLearner?
            var transplantRow: PersonalisationBench.Row?
            for steps in wakeOnly ? [0] : [0, consolidationSteps] {
                let transplanted = try bench.clone(wake)
                if steps == 0 { transplantedOnce = transplanted }
                let t0 = Date()
                let r = try transplanted.consolidate(contexts: transplanted.recentTokens, level: pair.source, into: pair.target,
                                                     budget: ConsolidationBudget(steps: steps, generatedTokens: steps == 0 ? 0 : 32),
                                                     transplant: true)
                let seconds = Date().timeIntervalSince(t0)
                if steps == 0 { transplantSeconds = seconds }
                log(String(format: "transplant + %d steps on %d positions in %.1f s; KL (fast silenced → after) %.4f → %.4f", r.steps,
                           r.positions, seconds, r.klBefore, r.klAfter))
                let row = bench.row(try bench.evaluate(transplanted.state), from: wakeRow, learner: transplanted)
                if steps == 0 { transplantRow = row }
                rows.append(("consolidated by transplant\(steps > 0 ? " + \(steps) steps" : " (the service's default)"), fast cleared", row))
            }

            func slept(_ configuration: SleepConfiguration) throws -> (LevelLearner, Double) {
                let learner = try bench.clone(wake)
                let t0 = Date()
                let r = try learner.sleep(texts: learner.recentTexts, configuration: configuration)
                let seconds = Date().timeIntervalSince(t0)
                log(String(format: "sleep: %d examples (+%d locality), %d steps in %.1f s; KL %.4f → %.4f", r.examples, r.localityExamples,
                           r.steps, seconds, r.klBefore, r.klAfter))
                if verbose { for q in r.questions.prefix(12) { log("  question: \(q)") } }
                return (learner, seconds)
            }
            var asleep: LevelLearner?
            var secondNight: String?
            var sleepSeconds = 0.0
            if !wakeOnly {
                let (learner, seconds) = try slept(sleepConfiguration)
                let sleepRow = bench.row(try bench.evaluate(learner.state), from: wakeRow, learner: learner)
                rows.append(("sleep (teacher: the text in context), fast cleared", sleepRow))
                if verbose { bench.logFacts(sleepRow.evaluation, "sleep") }
                (asleep, sleepSeconds) = (learner, seconds)
            }
            if benches.count > 1 {
                let o = (k + 1) % benches.count, other = benches[o]
                if let asleep {
                    for t in other.turns { try asleep.learn(tokens: t.tokens, learnable: t.learnable) }
                    rows.append(("sleep, then wake on \(other.set.name)'s turns", bench.row(try bench.evaluate(asleep.state), from: wakeRow, learner: asleep)))
                }
                // Two nights: transplant, a day of the other set's turns, transplant again (this set's facts must survive both).
                if let once = transplantedOnce {
                    for t in other.turns { try once.learn(tokens: t.tokens, learnable: t.learnable) }
                    rows.append(("transplant, wake on \(other.set.name)'s turns", bench.row(try bench.evaluate(once.state), from: wakeRow, learner: once)))
                    let again = try once.consolidate(contexts: once.recentTokens, level: pair.source, into: pair.target,
                                                     budget: ConsolidationBudget(steps: 0, generatedTokens: 0), transplant: true)
                    rows.append(("transplant, wake on \(other.set.name)'s turns, transplant again", bench.row(try bench.evaluate(once.state), from: wakeRow, learner: once)))
                    // The second night must keep the second day's facts too.
                    let (otherBefore, otherAfter) = (try baseline(o), try other.evaluate(once.state))
                    secondNight = String(format: "Two nights: after the second transplant (%d units written), %@'s own questions: exact %d/%d, answer NLL %+.1f%%.",
                                         again.written, other.set.name, otherAfter.exact, other.set.facts.count,
                                         (otherAfter.meanNLL / otherBefore.meanNLL - 1) * 100)
                }
            }
            if k == 0 {
                for a in chosen where !(wakeOnly && Self.sleepAblations.contains(a)) { if let row = try ablation(a, bench: bench, base: base, wake: wake, wakeRow: wakeRow, sleep: sleepConfiguration, slept: slept) { rows.append(row) } }
            }

            print("## \(bench.set.name): \(n) facts")
            print("")
            print("| row | answer NLL (change) | exact match | free answer | general ppl (change) | neighbourhood ppl (change) | ms / learnable token | state bytes | updates applied / rejected |")
            print("|---|---|---|---|---|---|---|---|---|")
            for (name, r) in rows {
                let e = r.evaluation
                print("| \(name) | \(String(format: "%.3f", e.meanNLL)) (\(pct(before.meanNLL, e.meanNLL))) | \(e.exact)/\(n) | \(e.freeAsked ? "\(e.free)/\(n)" : "–") | \(String(format: "%.3f", e.perplexity)) (\(pct(before.perplexity, e.perplexity))) | \(String(format: "%.3f", e.neighbourhood)) (\(pct(before.neighbourhood, e.neighbourhood))) | \(r.msPerToken.map { String(format: "%.1f", $0) } ?? "–") | \(r.stateBytes.map(String.init) ?? "–") | \(r.updates ?? "–") |")
            }
            print("")
            if let secondNight { print(secondNight) }
            print("Isolation: a second user's logits on the \(n) questions, batched with the taught user: \(isolation.identical)/\(n) bit-identical to the backbone (max |Δ| \(isolation.maxDifference)).")
            print(String(format: "Sleep cost per 1,000 learned tokens (%d here): transplant %.1f s (with its KL report), distill %.1f s, sleep from context %.1f s.",
                         bench.learnedTokens, transplantSeconds * 1000 / Double(bench.learnedTokens),
                         consolidationSeconds * 1000 / Double(bench.learnedTokens), sleepSeconds * 1000 / Double(bench.learnedTokens)))
            let s = transplantRow!.evaluation
            let fall = 1 - s.meanNLL / before.meanNLL
            let general = s.perplexity / before.perplexity - 1, near = s.neighbourhood / before.neighbourhood - 1
            print(String(format: "After the service's sleep (transplant, fast cleared): exact %d/%d, answer NLL %+.1f%%, general ppl %+.2f%% (≤ 2%%: %@), neighbourhood ppl %+.2f%% (≤ 5%%: %@); wake only %d/%d.",
                         s.exact, n, -fall * 100, general * 100, general <= 0.02 ? "met" : "NOT met", near * 100, near <= 0.05 ? "met" : "NOT met",
                         wakeRow.evaluation.exact, n))
            print("")
        }
    }

    /// One ablation row on the first fact set (nil when it does not apply).
    func ablation(_ a: String, bench: PersonalisationBench, base: LevelConfiguration, wake: LevelLearner, wakeRow: PersonalisationBench.Row,
                  sleep: SleepConfiguration, slept: (SleepConfiguration) throws -> (LevelLearner, Double)) throws -> (String, PersonalisationBench.Row)? {
        func variant(_ edit: (inout [LevelConfiguration.Level]) -> Void) throws -> LevelConfiguration {
            var l = base.levels
            edit(&l)
            return try LevelConfiguration(levels: l, minSurprise: base.minSurprise)
        }
        switch a {
        case "fast-only", "mid-only":
            guard let pair = base.consolidation else { return nil }
            let drop = a == "fast-only" ? pair.target : pair.source
            let name = base.levels[drop].name
            return (a == "fast-only" ? "wake, fast only" : "wake, mid only", try bench.train(variant { $0.removeAll { $0.name == name } }).1)
        case "chunks-half", "chunks-double":
            let half = a == "chunks-half"
            let c = try variant { for i in $0.indices { $0[i].chunkSize = max(1, half ? $0[i].chunkSize / 2 : $0[i].chunkSize * 2) } }
            return ("wake, chunks " + c.levels.map { "\($0.name) \($0.chunkSize)" }.joined(separator: ", "), try bench.train(c).1)
        case "m3", "sgd":
            let kind: LevelConfiguration.Optimizer.Kind = a == "m3" ? .m3 : .sgd
            // Learning rates rescaled to each optimizer's step size. M3
            // divides an orthogonalised direction (entries ≈ 0.04 for these
            // shapes) by √V of the raw per-weight gradients, most of them
            // far below 1e-3 after clipping the whole level to norm 1: at
            // AdamW's rates ÷ 40 it diverged (perplexity 1.5 million), at
            // ÷ 1000 it learns. SGD's momentum sum is ≈ 10·|g| (× 100).
            let scale = a == "m3" ? 1.0 / 1000 : 100
            let c = try variant { for i in $0.indices { $0[i].optimizer.kind = kind; $0[i].learningRate *= scale } }
            return (a == "m3" ? "wake, M3 optimizer (learning rates ÷ 1000)" : "wake, momentum SGD (learning rates × 100)", try bench.train(c).1)
        case "no-gate":
            return ("wake, no surprise gate (min_surprise 0)", try bench.train(try LevelConfiguration(levels: base.levels)).1)
        case "recomputed-prefix":
            return ("wake, each piece recomputing its prefix with gradients (the rule before streaming)",
                    try bench.train(base, semantics: .recomputedPrefix(context: 512)).1)
        case "backbone-keys":
            return ("wake, keys from the frozen MLP's rows", try bench.train(base, backboneKeys: true).1)
        case "sleep-no-locality", "sleep-teacher-levels", "sleep-one-question", "sleep-text-answers":
            var c = sleep
            switch a {
            case "sleep-no-locality": c.localityWeight = 0
            case "sleep-teacher-levels": c.teacherKeepsLevels = true
            case "sleep-text-answers": c.answer = .text
            default: c.questionsPerText = 1
            }
            let (learner, _) = try slept(c)
            let names = ["sleep-no-locality": "sleep without the locality term", "sleep-teacher-levels": "sleep, the teacher keeps the levels",
                         "sleep-one-question": "sleep, one question per text", "sleep-text-answers": "sleep, the user's text as the answer"]
            let name = names[a]!
            return (name, bench.row(try bench.evaluate(learner.state), from: wakeRow, learner: learner))
        default:
            return nil
        }
    }
}

/// The benchmark's data and measurements on one backbone and one fact set.
struct PersonalisationBench {
    let model: LlamaModel
    let set: FactSet
    let general: [Int]
    /// The set's neighbourhood paragraphs, one text.
    let neighbourhood: [Int]
    /// The teaching turns in the order they arrive, with the fact each teaches.
    let turns: [(tokens: [Int], learnable: [Bool], fact: Int, text: String)]
    /// Per fact: question prompt + lead-in, and the answer's tokens.
    let probes: [(prompt: [Int], answer: [Int], question: [Int])]

    init(model: LlamaModel, set: FactSet, general: [Int], passes: Int = 1) {
        self.model = model
        self.set = set
        self.general = general
        let tok = model.tokenizer, chat = model.chatTemplate, facts = set.facts
        neighbourhood = tok.encode(set.neighbourhood.joined(separator: "\n\n"))
        // A user turn as the server makes it a request's prompt: only the user's words are learnable.
        var turns: [(tokens: [Int], learnable: [Bool], fact: Int, text: String)] = []
        let n = facts.count, rounds = facts.map(\.teach.count).max()!
        // Facts interleaved: round r teaches every fact's r-th turn, in a shuffled but fixed order.
        for round in (0..<passes).flatMap({ _ in 0..<rounds }) {
            for i in 0..<n {
                let f = (i * 7 + round * 3) % n
                guard round < facts[f].teach.count else { continue }
                let text = facts[f].teach[round]
                let turn = chat.encode([ChatMessage(role: "user", content: text)], tokenizer: tok)
                turns.append((turn.tokens, turn.userTokens, f, text))
            }
        }
        self.turns = turns
        probes = facts.map { f in
            let q = tok.encode(chat.render([ChatMessage(role: "user", content: f.question)]))
            return (q + tok.encode(f.leadIn), tok.encode(" " + f.answer), q)
        }
    }

    var learnedTokens: Int { turns.reduce(0) { $0 + LearnableTokens.count($1.learnable) } }

    struct FactResult {
        let nll: Double
        let exact: Bool
        let free: Bool
        let freeText: String
        let ledText: String
    }

    struct Evaluation {
        let perFact: [FactResult]
        let perplexity: Double
        let neighbourhood: Double
        /// Whether free answers were generated.
        var freeAsked = true
        var meanNLL: Double { perFact.reduce(0) { $0 + $1.nll } / Double(perFact.count) }
        var exact: Int { perFact.filter(\.exact).count }
        var free: Int { perFact.filter(\.free).count }
    }

    struct Row {
        let evaluation: Evaluation
        var msPerToken: Double?
        var stateBytes: Int?
        var updates: String?
    }

    /// What the backbone sees before a question.
    enum Context {
        case nothing
        /// The asked fact's teaching turns, each answered "Noted.".
        case askedFact
        /// Every teaching turn in the order taught, each answered "Noted.".
        case allTurns
    }

    /// Whether `text`, after leading spaces, starts with `word` as a whole
    /// word (the next character, if any, is not a letter or digit).
    static func startsWithWord(_ text: String, _ word: String) -> Bool {
        let t = text.drop { $0 == " " }
        guard t.hasPrefix(word) else { return false }
        return t.dropFirst(word.count).first.map { !($0.isLetter || $0.isNumber) } ?? true
    }

    /// The question prompt (with lead-in) and the free question prompt for
    /// fact i, after `context`'s turns.
    func prompts(_ i: Int, context: Context) -> (led: [Int], free: [Int]) {
        guard context != .nothing else { return (probes[i].prompt, probes[i].question) }
        let tok = model.tokenizer, chat = model.chatTemplate, f = set.facts[i]
        let taught = context == .askedFact ? turns.filter { $0.fact == i } : turns
        let messages = taught.flatMap { [ChatMessage(role: "user", content: $0.text), ChatMessage(role: "assistant", content: "Noted.")] }
            + [ChatMessage(role: "user", content: f.question)]
        let q = chat.encode(messages, tokenizer: tok).tokens
        return (q + tok.encode(f.leadIn), q)
    }

    /// Recall and locality of the backbone with `state` (nil: bare), the
    /// questions asked after `context`.
    func evaluate(_ state: LevelState?, context: Context = .nothing) throws -> Evaluation {
        let trainer = LevelTrainer(model: model)
        var greedy = SamplingParameters()
        greedy.temperature = 0
        var results: [FactResult] = []
        for (i, (f, p)) in zip(set.facts, probes).enumerated() {
            let (led, question) = prompts(i, context: context)
            let r = try trainer.loss(tokens: led + p.answer,
                                     learnable: led.map { _ in false } + p.answer.map { _ in true }, state: state)
            greedy.maxTokens = p.answer.count + 2
            let ledText = try Generator(model: model, adapter: state).generate(prompt: led, parameters: greedy)
            // Free answers only without a context (with one, a long prompt would cost another prefill per question).
            greedy.maxTokens = 24
            let free = context == .nothing ? try Generator(model: model, adapter: state).generate(prompt: question, parameters: greedy).text : ""
            results.append(FactResult(nll: r.total / Double(r.count), exact: Self.startsWithWord(ledText.text, f.answer),
                                      free: free.lowercased().contains(f.answer.lowercased()),
                                      freeText: free.replacingOccurrences(of: "\n", with: " "), ledText: ledText.text))
        }
        let ppl = try model.perplexity(tokens: general, adapter: state).perplexity
        let near = try model.perplexity(tokens: neighbourhood, adapter: state).perplexity
        return Evaluation(perFact: results, perplexity: ppl, neighbourhood: near, freeAsked: context == .nothing)
    }

    func logFacts(_ e: Evaluation, _ label: String) {
        for (f, r) in zip(set.facts, e.perFact) {
            log(String(format: "%@ %@: NLL %.3f, exact %@ (%@), answer: %@", label, f.answer, r.nll, r.exact ? "yes" : "no", r.ledText, r.freeText))
        }
    }

    /// Teaches a fresh user the turns under `configuration`, then evaluates.
    func train(_ configuration: LevelConfiguration, backboneKeys: Bool = false,
               semantics: LevelLearner.Semantics = .streaming) throws -> (LevelLearner, Row) {
        let state = try LevelState(configuration: configuration, model: model.configuration)
        if backboneKeys { state.initializeKeys(from: model.weights) }
        let learner = try LevelLearner(state: state, model: model)
        learner.semantics = semantics
        let t0 = Date()
        for t in turns { try learner.learn(tokens: t.tokens, learnable: t.learnable) }
        let seconds = Date().timeIntervalSince(t0)
        log(String(format: "learned %d tokens in %.1f s under %@", learnedTokens, seconds,
                   configuration.levels.map { "\($0.name)/\($0.chunkSize)/\($0.optimizer.kind.rawValue)" }.joined(separator: " ")))
        let evaluation = try evaluate(learner.state)
        return (learner, Row(evaluation: evaluation, msPerToken: seconds * 1000 / Double(learnedTokens),
                             stateBytes: try LevelStateFile.encode(learner, backbone: model.fingerprint).count,
                             updates: updates(learner)))
    }

    /// A row for a learner derived from a trained one (same learning cost).
    func row(_ evaluation: Evaluation, from trained: Row, learner: LevelLearner) -> Row {
        Row(evaluation: evaluation, msPerToken: trained.msPerToken,
            stateBytes: (try? LevelStateFile.encode(learner, backbone: model.fingerprint).count) ?? 0, updates: updates(learner))
    }

    func updates(_ l: LevelLearner) -> String {
        zip(l.state.configuration.levels, zip(l.updatesApplied, l.updatesRejected))
            .map { "\($0.0.name) \($0.1.0)/\($0.1.1)" }.joined(separator: ", ")
    }

    func clone(_ learner: LevelLearner) throws -> LevelLearner {
        try LevelStateFile.decode(try LevelStateFile.encode(learner, backbone: model.fingerprint), model: model)
    }

    /// A second user with fresh levels, batched with the taught user on every
    /// question: how many of its logit vectors equal the bare backbone's bit for bit.
    func isolation(_ taught: LevelState) throws -> (identical: Int, maxDifference: Float) {
        let other = try LevelState(configuration: taught.configuration, model: model.configuration)
        var identical = 0
        var worst: Float = 0
        for p in probes {
            let both = try model.forward([LlamaModel.Step(tokens: p.question, cache: model.makeCache(), adapter: taught),
                                          LlamaModel.Step(tokens: p.question, cache: model.makeCache(), adapter: other)])
            let bare = try model.forward(tokens: p.question, cache: model.makeCache())
            if both[1] == bare { identical += 1 }
            worst = max(worst, zip(both[1], bare).map { abs($0 - $1) }.max() ?? 0)
        }
        return (identical, worst)
    }
}
