// Sleep that distils from context: what a user said becomes answers the
// slower level gives without seeing it.
//
// Consolidation (Consolidation.swift) distils the model with its levels into
// the model without the fast level, on the model's own continuations of the
// recent requests: the student sees the same text as the teacher, so what it
// learns is still "continue this text". Here the teacher has the user's text
// *in its context* and the student does not (context distillation):
//
//   for each recent text u of the user (the contents of their turns):
//     questions  q ~ backbone(few-shot "Statement: … Question:" prompt on u), sampled
//     teacher    T = backbone [+ levels] on chat(user: u, assistant: "Noted.", user: q)
//     answer     y = T's greedy reply (or, `answer: text`, u itself)
//     student    S = backbone + levels, fast level silenced, on chat(user: q) + y
//     loss       KL(T ‖ S) at the rows that predict y's tokens
//   locality:   A = the bare backbone's own reply r to chat(user: u) (the text
//               in context), loss w · KL(backbone ‖ S) on r's rows: with the
//               fact in its context the user's model should answer as the
//               backbone does (text near the user's topics is not disturbed)
//
// Only the target (slower) level learns; afterwards it keeps the student's
// weights and the fast level starts over, as in Consolidation. The question
// prompt's examples are generic (none of them about anything a benchmark
// asks); everything else the model writes itself.
import Foundation
import Model

/// How sleep makes its data and its teacher.
public struct SleepConfiguration: Codable, Sendable, Equatable {
    /// What follows a question in the training sequences.
    public enum Answer: String, Codable, Sendable, CaseIterable {
        /// The teacher's own greedy reply (with the text in its context).
        case teacher
        /// The user's text itself, as the reply (the teacher, with the text in context, scores it).
        case text
    }

    public var answer: Answer = .teacher
    /// Whether the context teacher also keeps the current levels.
    public var teacherKeepsLevels = false
    /// Questions the backbone writes about each recent text.
    public var questionsPerText = 3
    /// Most tokens of the teacher's answer (and of the locality reply).
    public var answerTokens = 24
    /// Weight of the locality term (0: off).
    public var localityWeight = 1.0
    /// Optimizer steps on the target level (one example, plus one locality example, per step); 0: one per example.
    public var steps = 0
    /// Seed of the question sampling.
    public var seed: UInt64 = 0

    public init() {}

    enum CodingKeys: String, CodingKey {
        case answer, teacherKeepsLevels = "teacher_keeps_levels", questionsPerText = "questions_per_text"
        case answerTokens = "answer_tokens", localityWeight = "locality_weight", steps, seed
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = SleepConfiguration.init()
        answer = try c.decodeIfPresent(Answer.self, forKey: .answer) ?? d.answer
        teacherKeepsLevels = try c.decodeIfPresent(Bool.self, forKey: .teacherKeepsLevels) ?? d.teacherKeepsLevels
        questionsPerText = try c.decodeIfPresent(Int.self, forKey: .questionsPerText) ?? d.questionsPerText
        answerTokens = try c.decodeIfPresent(Int.self, forKey: .answerTokens) ?? d.answerTokens
        localityWeight = try c.decodeIfPresent(Double.self, forKey: .localityWeight) ?? d.localityWeight
        steps = try c.decodeIfPresent(Int.self, forKey: .steps) ?? d.steps
        seed = try c.decodeIfPresent(UInt64.self, forKey: .seed) ?? d.seed
        try validate()
    }

    /// Throws unless every field is in range.
    public func validate() throws {
        guard (0...16).contains(questionsPerText), (1...256).contains(answerTokens),
              localityWeight.isFinite, localityWeight >= 0, (0...100_000).contains(steps) else {
            throw LevelConfiguration.Invalid(description: "sleep: questions_per_text in 0...16, answer_tokens in 1...256, locality_weight finite ≥ 0, steps in 0...100000")
        }
    }

    /// The question prompt's examples: generic statements, none about a benchmark's topics.
    static let questionExamples = """
        Statement: I keep my bicycle in the hallway because the shed leaks.
        Question: Where do I keep my bicycle?

        Statement: My brother taught me to play chess when I was six.
        Question: Who taught me to play chess?

        Statement: I usually take the early train, because the later one is always full.
        Question: Which train do I usually take?


        """
}

/// One training sequence of sleep: the student's tokens, the rows whose
/// next-token distributions it learns, and how to get the teacher's.
struct SleepExample {
    let student: [Int]
    let rows: [Int]
    /// The teacher's tokens and the rows that correspond to `rows`.
    let teacher: [Int]
    let teacherRows: [Int]
    /// The teacher's levels (nil: the bare backbone).
    let teacherAdapter: LevelState?
}

/// What sleep did.
public struct SleepReport: Sendable {
    public let questions: [String]
    public let examples: Int
    public let localityExamples: Int
    public let steps: Int
    /// Mean KL(teacher ‖ student) per row over (up to 16) examples, before and after.
    public let klBefore: Double
    public let klAfter: Double
}

extension LevelLearner {
    /// What sleep distils from: the contents of the user's turns in the
    /// recent contexts this learner keeps (the service and the benchmark both
    /// hand sleep these).
    public var recentTexts: [[Int]] {
        let model = trainer.model
        return recentTokens.flatMap { model.chatTemplate.contents(of: $0, tokenizer: model.tokenizer) }
    }

    /// Sleep with the configuration's consolidation pair (the fastest level
    /// into the next slower). With no text to learn from (or no question the
    /// backbone could write) it changes nothing, the fast level included.
    ///   texts: the user's recent texts (token ids of what they wrote, e.g.
    ///   `ChatTemplate.contents(of:)` of their requests)
    public func sleep(texts: [[Int]], configuration: SleepConfiguration) throws -> SleepReport {
        guard let pair = state.configuration.consolidation else {
            throw LevelConfiguration.Invalid(description: "sleep needs at least two levels")
        }
        try configuration.validate()
        let model = trainer.model, tok = model.tokenizer, chat = model.chatTemplate
        let limit = model.configuration.maxPositionEmbeddings
        let (f, m) = (pair.source, pair.target)
        let teacherAdapter: LevelState? = configuration.teacherKeepsLevels ? state : nil
        var greedy = SamplingParameters()
        greedy.temperature = 0
        greedy.maxTokens = configuration.answerTokens
        var examples: [SleepExample] = [], locality: [SleepExample] = [], questions: [String] = []
        for (i, text) in texts.enumerated() where !text.isEmpty {
            let u = tok.decode(text, skipSpecial: true).trimmingCharacters(in: .whitespacesAndNewlines)
            guard !u.isEmpty, text.count < limit / 4 else { continue }
            // Questions the backbone writes about u.
            let prompt = tok.encode(SleepConfiguration.questionExamples + "Statement: \(u.replacingOccurrences(of: "\n", with: " "))\nQuestion:",
                                    parseSpecial: false)
            var asked: Set<String> = []
            for j in 0..<configuration.questionsPerText {
                var sample = SamplingParameters()
                sample.temperature = 0.8
                sample.maxTokens = 32
                sample.stop = ["\n"]
                sample.seed = configuration.seed &+ UInt64(i) &* 1000 &+ UInt64(j)
                let q = try Generator(model: model, adapter: nil).generate(prompt: prompt, parameters: sample).text
                    .trimmingCharacters(in: .whitespacesAndNewlines)
                guard !q.isEmpty, asked.insert(q).inserted else { continue }
                questions.append(q)
                let withText = chat.encode([ChatMessage(role: "user", content: u), ChatMessage(role: "assistant", content: "Noted."),
                                            ChatMessage(role: "user", content: q)], tokenizer: tok).tokens
                let y = configuration.answer == .text ? text
                    : tok.encode(try Generator(model: model, adapter: teacherAdapter).generate(prompt: withText, parameters: greedy).text,
                                 parseSpecial: false)
                guard !y.isEmpty else { continue }
                let without = chat.encode([ChatMessage(role: "user", content: q)], tokenizer: tok).tokens
                examples.append(SleepExample(student: without + y, rows: Array((without.count - 1)..<(without.count - 1 + y.count)),
                                             teacher: withText + y, teacherRows: Array((withText.count - 1)..<(withText.count - 1 + y.count)),
                                             teacherAdapter: teacherAdapter))
            }
            // Locality: the backbone's own reply with u in context.
            if configuration.localityWeight > 0 {
                let turn = chat.encode([ChatMessage(role: "user", content: u)], tokenizer: tok).tokens
                let reply = tok.encode(try Generator(model: model, adapter: nil).generate(prompt: turn, parameters: greedy).text,
                                       parseSpecial: false)
                if !reply.isEmpty {
                    let rows = Array((turn.count - 1)..<(turn.count - 1 + reply.count))
                    locality.append(SleepExample(student: turn + reply, rows: rows, teacher: turn + reply, teacherRows: rows,
                                                 teacherAdapter: nil))
                }
            }
        }
        guard !examples.isEmpty else {
            return SleepReport(questions: questions, examples: 0, localityExamples: locality.count, steps: 0, klBefore: 0, klAfter: 0)
        }
        let student = try silencedStudent(level: f)
        func teacherDistributions(_ e: SleepExample) throws -> [[Float]] {
            try distributions(tokens: e.teacher, rows: e.teacherRows, adapter: e.teacherAdapter)
        }
        func meanKL() throws -> Double {
            var total = 0.0, count = 0
            for e in examples.prefix(16) {
                total += try trainer.distillationGradients(tokens: e.student, rows: e.rows, teacher: try teacherDistributions(e),
                                                           state: student).totalLoss
                count += e.rows.count
            }
            return total / Double(max(1, count))
        }
        let before = try meanKL()
        let steps = configuration.steps > 0 ? configuration.steps : examples.count
        var moments = self.moments[m]
        for step in 0..<steps {
            let e = examples[step % examples.count]
            var g = try trainer.distillationGradients(tokens: e.student, rows: e.rows, teacher: try teacherDistributions(e),
                                                      state: student).gradients[m].map(\.tensors)
            if !locality.isEmpty {
                let a = locality[step % locality.count]
                let ga = try trainer.distillationGradients(tokens: a.student, rows: a.rows, teacher: try teacherDistributions(a),
                                                           state: student).gradients[m]
                let w = Float(configuration.localityWeight)
                for b in g.indices {
                    for t in g[b].indices {
                        let extra = ga[b].tensors[t]
                        for k in g[b][t].indices { g[b][t][k] += w * extra[k] }
                    }
                }
            }
            guardedStep(student, level: m, gradients: g, moments: &moments)
        }
        let after = try meanKL()
        try commit(student, level: f, into: m, moments: moments)
        return SleepReport(questions: questions, examples: examples.count, localityExamples: locality.count, steps: steps,
                           klBefore: before, klAfter: after)
    }
}
