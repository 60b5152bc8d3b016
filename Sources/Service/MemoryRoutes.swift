// The memory operations (generated from openapi.yaml): feedback, a user's
// memory and its versions, reset, rollback, fork, consolidation, export and
// erasure; and GET /metrics. Every lookup is scoped by the key's tenant, so
// another tenant's user is simply not found.
import Foundation
import Hummingbird
import Memory
import Model
import OpenAPIRuntime
import Store

extension ServiceState {
    /// The caller's user named `name`, or 404.
    func existingUser(_ name: UserName, _ principal: Principal) async throws -> User {
        guard let user = try await database.user(tenantID: principal.tenantID, name: name) else {
            throw APIError.notFound("no user '\(name)' in this tenant")
        }
        return user
    }

    /// The caller and the user the request's path names (checked by the pipeline), or 404.
    func requestUser() async throws -> (Principal, User) {
        let principal = try RequestScope.principal()
        return (principal, try await existingUser(try RequestScope.user(), principal))
    }

    /// What became of a learning job; with `wait`, after waiting for it (up
    /// to learning_wait_seconds).
    func learning(job: Int64?, wait: Bool) async throws -> Components.Schemas.Learning {
        guard let job else { return .init(state: .off) }
        if wait {
            let deadline = ContinuousClock.now + .seconds(configuration.learningWaitSeconds)
            while ContinuousClock.now < deadline {
                if let s = try await database.jobState(id: job) {
                    switch s.state {
                    case .done: return .init(state: .applied, jobId: job, version: s.version)
                    case .failed: return .init(state: .failed, jobId: job)
                    case .cancelled: return .init(state: .cancelled, jobId: job)
                    case .queued: if s.frozen { return .init(state: .frozen, jobId: job) }   // waits until the user is cleared
                    }
                }
                try await Task.sleep(for: .milliseconds(20))
            }
        }
        return .init(state: .queued, jobId: job)
    }

    /// The user's memory as the API shows it.
    func memoryInfo(_ user: User, cancelled: [Int64]? = nil) async throws -> Components.Schemas.Memory {
        // Queued jobs first: when none are left, the reads below see every applied one.
        let queued = try await database.queuedJobs(userID: user.id)
        guard let stored = try await database.memory(userID: user.id, withLearner: true, withLevels: false) else {
            throw APIError.notFound("user '\(user.name)' has no memory")
        }
        let memory = self.memory
        // The counters are in the learner part; the levels' weights are not needed.
        let (levels, consolidations) = try await memory.compute {
            let learner = try memory.learner(levels: [:], learner: stored.learner)
            return (memory.levels.levels.enumerated().map { l, level in
                Components.Schemas.LevelCounters(name: level.name, tokens: Int64(learner.tokenCounters[l]),
                                                 accumulatedTokens: Int64(learner.accumulatedTokens[l]),
                                                 updatesApplied: Int64(learner.updatesApplied[l]),
                                                 updatesRejected: Int64(learner.updatesRejected[l]),
                                                 stored: stored.levelIDs[level.name] != nil)
            }, learner.consolidations)
        }
        return .init(user: user.name, version: stored.version, jobsApplied: stored.jobsApplied,
                     queuedJobs: Int64(queued),
                     consolidations: Int64(consolidations), levels: levels, cancelledJobs: cancelled)
    }

    static func actor(_ p: Principal) -> String { "key:\(p.keyID)" }
}

extension OperationsAPI {
    func createFeedback(_ input: Operations.CreateFeedback.Input) async throws -> Operations.CreateFeedback.Output {
        let principal = try RequestScope.principal()
        guard case .json(let body) = input.body else { throw APIError.invalid("expected a JSON body") }
        guard let uuid = Self.generationUUID(body.generationId),
              let generation = try await state.database.generation(id: uuid, tenantID: principal.tenantID) else {
            throw APIError.notFound("no generation '\(body.generationId)' in this tenant")
        }
        let positive = body.rating == .positive
        var correction: [Int]?
        if let c = body.correction {
            guard !c.isEmpty else { throw APIError.invalid("correction must not be empty", param: "correction") }
            guard !c.unicodeScalars.contains("\u{0}") else {
                throw APIError.invalid("correction must not contain NUL characters", param: "correction")
            }
            // No token is longer than maxTokenBytes, so text of more bytes than
            // that times the cap has more tokens than the cap: refused before it is tokenized.
            let limit = state.configuration.maxCorrectionTokens
            let tokens = c.utf8.count <= state.maxTokenBytes * limit ? state.model.tokenizer.encode(c) : nil
            guard let tokens, tokens.count <= limit else {
                throw APIError.tooLarge("the correction exceeds max_correction_tokens (\(limit))", param: "correction")
            }
            correction = tokens
        }
        var job: LearningRequest?
        let learns = try await state.database.user(id: generation.userID, tenantID: principal.tenantID)?.learns ?? false
        if learns {
            let prompt = generation.promptTokens
            if let answer = correction {
                job = LearningRequest(tokens: prompt + answer, learnable: prompt.map { _ in false } + answer.map { _ in true })
            } else if positive, !generation.completionTokens.isEmpty {
                let answer = generation.completionTokens
                job = LearningRequest(tokens: prompt + answer, learnable: prompt.map { _ in false } + answer.map { _ in true })
            }
        }
        let (id, jobID) = try await state.database.recordFeedback(generation: generation, rating: body.rating.rawValue,
                                                                  correction: body.correction, job: job,
                                                                  actor: ServiceState.actor(principal))
        if jobID != nil { state.metrics.jobsEnqueued.increment() }
        let learning = try await state.learning(job: jobID, wait: body.waitForLearning ?? false)
        return .ok(.init(body: .json(.init(id: "fb-" + id.uuidString.lowercased(), generationId: body.generationId,
                                           learning: learning))))
    }

    /// The generation's UUID from any id a generation endpoint returns.
    static func generationUUID(_ id: String) -> UUID? {
        for prefix in ["gen-", "cmpl-", "chatcmpl-"] where id.hasPrefix(prefix) {
            return UUID(uuidString: String(id.dropFirst(prefix.count)))
        }
        return UUID(uuidString: id)
    }

    func eraseUser(_ input: Operations.EraseUser.Input) async throws -> Operations.EraseUser.Output {
        let (principal, user) = try await state.requestUser()
        guard try await state.database.eraseUser(tenantID: principal.tenantID, name: try RequestScope.user(),
                                                 actor: ServiceState.actor(principal)) else {
            throw APIError.notFound("no user '\(user.name)' in this tenant")
        }
        state.memory.cache.remove(user: user.id)
        return .ok(.init(body: .json(.init(user: user.name, erased: true))))
    }

    func getMemory(_ input: Operations.GetMemory.Input) async throws -> Operations.GetMemory.Output {
        let (_, user) = try await state.requestUser()
        return .ok(.init(body: .json(try await state.memoryInfo(user))))
    }

    func listVersions(_ input: Operations.ListVersions.Input) async throws -> Operations.ListVersions.Output {
        let (_, user) = try await state.requestUser()
        let versions = try await state.database.versions(userID: user.id).map { v in
            Components.Schemas.MemoryVersion(
                version: v.version, parent: v.parent,
                cause: Components.Schemas.MemoryVersion.CausePayload(rawValue: v.cause) ?? .learning,
                causeId: v.causeID, actor: v.actor, created: Int64(v.createdAt.timeIntervalSince1970),
                levels: v.levels.keys.sorted())
        }
        return .ok(.init(body: .json(.init(user: user.name, data: versions))))
    }

    func resetMemory(_ input: Operations.ResetMemory.Input) async throws -> Operations.ResetMemory.Output {
        let (principal, user) = try await state.requestUser()
        var names: [String]?, keepQueued = false
        if case .json(let body)? = input.body {
            names = body.levels
            keepQueued = body.keepQueued ?? false
        }
        let config = state.memory.levels
        let indices = try (names ?? config.levels.map(\.name)).map { name in
            guard let i = config.levels.firstIndex(where: { $0.name == name }) else {
                throw APIError.invalid("no level named '\(name)'; the levels are \(config.levels.map(\.name).joined(separator: ", "))",
                                       param: "levels")
            }
            return i
        }
        let memory = state.memory, actor = ServiceState.actor(principal)
        let mutation = try await state.database.mutateMemory(userID: user.id, keep: state.configuration.versionsKept,
                                                             cancelQueued: !keepQueued) { stored in
            try await memory.compute {
                let learner = try memory.learner(stored)
                for l in indices { try learner.reset(level: l) }
                return try memory.change(learner, changed: [], fresh: indices, cause: "reset",
                                         causeID: indices.map { config.levels[$0].name }.joined(separator: ","), actor: actor)
            }
        }
        return .ok(.init(body: .json(try await state.memoryInfo(user, cancelled: mutation.cancelledJobs))))
    }

    func rollbackMemory(_ input: Operations.RollbackMemory.Input) async throws -> Operations.RollbackMemory.Output {
        let (principal, user) = try await state.requestUser()
        guard case .json(let body) = input.body else { throw APIError.invalid("expected a JSON body") }
        guard body.version >= 0 else { throw APIError.invalid("version must be at least 0", param: "version") }
        switch try await state.database.rollback(userID: user.id, to: body.version, keep: state.configuration.versionsKept,
                                                 actor: ServiceState.actor(principal), cancelQueued: !(body.keepQueued ?? false)) {
        case .rolledBack(let mutation):
            return .ok(.init(body: .json(try await state.memoryInfo(user, cancelled: mutation.cancelledJobs))))
        case .notKept, .moved:
            throw APIError.notFound("version \(body.version) of user '\(user.name)' is not kept")
        }
    }

    func forkMemory(_ input: Operations.ForkMemory.Input) async throws -> Operations.ForkMemory.Output {
        let (principal, user) = try await state.requestUser()
        guard case .json(let body) = input.body else { throw APIError.invalid("expected a JSON body") }
        let target: UserName
        do { target = try UserName(body.to) } catch { throw APIError.invalid("to: \(error)", param: "to") }
        if let v = body.version, v < 0 { throw APIError.invalid("version must be at least 0", param: "version") }
        do {
            let forked = try await state.database.forkUser(source: user, version: body.version, target: target,
                                                           actor: ServiceState.actor(principal))
            return .ok(.init(body: .json(try await state.memoryInfo(forked))))
        } catch let e as NotFound {
            throw APIError.notFound(e.description)
        } catch let e as Conflict {
            throw APIError(.conflict, type: "invalid_request_error", message: e.description, param: "to", code: "user_exists")
        }
    }

    func consolidateMemory(_ input: Operations.ConsolidateMemory.Input) async throws -> Operations.ConsolidateMemory.Output {
        let (principal, user) = try await state.requestUser()
        var budget = ConsolidationBudget()
        if case .json(let body)? = input.body {
            if let s = body.steps { budget.steps = s }
            if let g = body.generatedTokens { budget.generatedTokens = g }
        }
        let maxSteps = state.configuration.maxConsolidationSteps
        guard (1...maxSteps).contains(budget.steps) else {
            throw APIError.invalid("steps must be in 1...\(maxSteps) (max_consolidation_steps)", param: "steps")
        }
        guard (0...256).contains(budget.generatedTokens) else {
            throw APIError.invalid("generated_tokens must be in 0...256", param: "generated_tokens")
        }
        let config = state.memory.levels
        guard let fast = config.levels.firstIndex(where: { $0.name == "fast" }),
              let mid = config.levels.firstIndex(where: { $0.name == "mid" }) else {
            throw APIError.invalid("consolidation needs levels named 'fast' and 'mid' in the server's level configuration")
        }
        let memory = state.memory, actor = ServiceState.actor(principal), budgetValue = budget
        let report = ReportBox()
        _ = try await state.database.mutateMemory(userID: user.id, keep: state.configuration.versionsKept) { stored in
            try await memory.compute {
                let learner = try memory.learner(stored)
                let r = try learner.consolidate(contexts: learner.recentTokens, budget: budgetValue)
                report.value = r
                guard r.steps > 0 else { return nil }
                return try memory.change(learner, changed: [mid], fresh: [fast], cause: "consolidate", causeID: nil, actor: actor)
            }
        }
        let r = report.value
        return .ok(.init(body: .json(.init(memory: try await state.memoryInfo(user), klBefore: r?.klBefore ?? 0,
                                           klAfter: r?.klAfter ?? 0, steps: r?.steps ?? 0))))
    }

    final class ReportBox: @unchecked Sendable {
        var value: ConsolidationReport?
    }

    func exportMemory(_ input: Operations.ExportMemory.Input) async throws -> Operations.ExportMemory.Output {
        let (_, user) = try await state.requestUser()
        if let v = input.query.version, v < 0 { throw APIError.invalid("version must be at least 0", param: "version") }
        guard let stored = try await state.database.memory(userID: user.id, version: input.query.version) else {
            throw APIError.notFound("version \(input.query.version ?? user.version) of user '\(user.name)' is not kept")
        }
        let memory = state.memory
        let bytes = try await memory.compute {
            try LevelStateFile.encode(try memory.learner(stored), backbone: memory.model.fingerprint)
        }
        return .ok(.init(body: .binary(HTTPBody(bytes))))
    }
}

/// GET /metrics in the Prometheus text format (no key needed, like /healthz).
struct MetricsRoutes {
    let state: ServiceState

    func register(on router: Router<AppContext>) {
        router.get("/metrics") { _, _ in
            let queue = (try? await state.database.queuedJobs()) ?? (count: -1, oldestSeconds: -1)
            let cache = state.memory.cache.snapshot()
            let engine = state.engine.load
            let text = state.metrics.render(gauges: [
                ("continuum_generations_running", "Sequences in the batch engine.", Double(engine.running)),
                ("continuum_generations_waiting", "Sequences admitted, waiting for a batch slot.", Double(engine.waiting)),
                ("continuum_learning_jobs_queued", "Learning jobs queued in the database (all replicas).", Double(queue.count)),
                ("continuum_learning_oldest_queued_seconds", "Age of the oldest queued learning job.", queue.oldestSeconds),
                ("continuum_level_cache_entries", "Users' level weights cached.", Double(cache.entries)),
                ("continuum_level_cache_bytes", "Bytes of cached level weights.", Double(cache.bytes)),
                ("continuum_level_cache_hits", "Level cache hits.", Double(cache.hits)),
                ("continuum_level_cache_misses", "Level cache misses.", Double(cache.misses)),
            ])
            return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                            body: ResponseBody(byteBuffer: ByteBuffer(string: text)))
        }
    }
}

/// POST /v1/users/{user}/memory/import: a state file (as export gives it)
/// becomes the user's memory, as a new version (the user is created if
/// missing). Routed by hand for its binary body and its own size limit.
struct ImportRoute {
    let state: ServiceState

    func register(on router: Router<AppContext>) {
        router.post("/v1/users/:user/memory/import") { request, context in try await importState(request, context) }
    }

    func importState(_ request: Request, _ context: AppContext) async throws -> Response {
        let principal = try RequestScope.principal(), name = try RequestScope.user()
        let keepQueued = try Query(request).bool("keep_queued", default: false)
        // The pipeline has read the body, within max_import_bytes.
        let data = Data(buffer: try await request.body.collect(upTo: state.configuration.maxImportBytes))
        let memory = state.memory, actor = ServiceState.actor(principal)
        // Checked before any row is written: a bad file changes nothing.
        let learner = try await memory.compute { () throws -> UncheckedLearner in
            do {
                return UncheckedLearner(value: try LevelStateFile.decode(data, model: memory.model, expecting: memory.levels))
            } catch let e as LevelStateFile.Incompatible {
                throw APIError.invalid(e.description, param: "body")
            }
        }
        guard let user = try await state.database.user(tenantID: principal.tenantID, name: name, create: true) else {
            throw APIError.notFound("no user '\(name)' in this tenant")
        }
        let digest = String(LevelStateFile.sha256(data).prefix(16))
        let mutation = try await state.database.mutateMemory(userID: user.id, keep: state.configuration.versionsKept,
                                                             cancelQueued: !keepQueued) { _ in
            try await memory.compute {
                try memory.change(learner.value, changed: Array(memory.levels.levels.indices), cause: "import",
                                  causeID: "sha256:" + digest, actor: actor)
            }
        }
        return try GenerationRoutes.json(try await state.memoryInfo(user, cancelled: mutation.cancelledJobs))
    }

    /// A decoded learner handed between the learning thread and the request.
    struct UncheckedLearner: @unchecked Sendable {
        let value: LevelLearner
    }
}
