// A user's memory: its summary and versions, reset, rollback, fork,
// consolidation ("sleep"), export, import and erasure. Every lookup is
// scoped by the key's tenant, so another tenant's user is simply not found.
// The operations change the memory under the user's lock (waiting for a
// learning round in progress) as one new version; reset, rollback and
// import cancel the user's queued jobs unless `keep_queued`.
import Foundation
import Hummingbird
import Memory
import Model
import OpenAPIRuntime
import Store
import Synchronization

struct MemoryController {
    let configuration: ServiceConfiguration
    let users: any MemoryStore
    let queue: any LearningQueue
    let memory: UserMemory
    let metrics: Metrics

    /// The user's memory as the API shows it (`cancelled`: the jobs an operation just cancelled).
    func info(_ user: User, cancelled: [Int64]? = nil) async throws -> Components.Schemas.Memory {
        // Queued jobs first: when none are left, the reads below see every applied one.
        let queued = try await queue.queuedJobs(userID: user.id)
        guard let stored = try await users.memory(userID: user.id, version: nil, withLearner: true, withLevels: false) else {
            throw APIError.notFound("user '\(user.name)' has no memory")
        }
        let memory = self.memory
        // The counters are in the learner part; the levels' weights are not needed.
        let (levels, consolidations) = try await memory.compute(.light) {
            let learner = try memory.learner(levels: [:], learner: stored.learner)
            return (memory.levels.levels.enumerated().map { l, level in
                Components.Schemas.LevelCounters(name: level.name, tokens: Int64(learner.tokenCounters[l]),
                                                 accumulatedTokens: Int64(learner.accumulatedTokens[l]),
                                                 updatesApplied: Int64(learner.updatesApplied[l]),
                                                 updatesRejected: Int64(learner.updatesRejected[l]),
                                                 stored: stored.levelIDs[level.name] != nil)
            }, learner.consolidations)
        }
        return .init(user: user.name, version: stored.version, jobsApplied: stored.jobsApplied, queuedJobs: Int64(queued),
                     consolidations: Int64(consolidations), levels: levels, cancelledJobs: cancelled)
    }

    func get(_ input: Operations.GetMemory.Input) async throws -> Operations.GetMemory.Output {
        let (_, user) = try await users.requestUser()
        return .ok(.init(body: .json(try await info(user))))
    }

    func versions(_ input: Operations.ListVersions.Input) async throws -> Operations.ListVersions.Output {
        let (_, user) = try await users.requestUser()
        let versions = try await users.versions(userID: user.id).map { v in
            Components.Schemas.MemoryVersion(
                version: v.version, parent: v.parent,
                cause: Components.Schemas.MemoryVersion.CausePayload(rawValue: v.cause.rawValue) ?? .learning,
                causeId: v.causeID, actor: v.actor, created: Int64(v.createdAt.timeIntervalSince1970),
                levels: v.levels.keys.sorted())
        }
        return .ok(.init(body: .json(.init(user: user.name, data: versions))))
    }

    func erase(_ input: Operations.EraseUser.Input) async throws -> Operations.EraseUser.Output {
        let (principal, user) = try await users.requestUser()
        guard try await users.eraseUser(tenantID: principal.tenantID, name: try RequestScope.user(), actor: principal.actor) else {
            throw APIError.notFound("no user '\(user.name)' in this tenant")
        }
        memory.cache.remove(user: user.id)
        return .ok(.init(body: .json(.init(user: user.name, erased: true))))
    }

    func reset(_ input: Operations.ResetMemory.Input) async throws -> Operations.ResetMemory.Output {
        let (principal, user) = try await users.requestUser()
        var names: [String]?, keepQueued = false
        if case .json(let body)? = input.body {
            names = body.levels
            keepQueued = body.keepQueued ?? false
        }
        let config = memory.levels
        let indices = try (names ?? config.levels.map(\.name)).map { name in
            guard let i = config.levels.firstIndex(where: { $0.name == name }) else {
                throw APIError.invalid("no level named '\(name)'; the levels are \(config.levels.map(\.name).joined(separator: ", "))",
                                       param: "levels")
            }
            return i
        }
        let memory = self.memory, actor = principal.actor
        let mutation = try await users.mutateMemory(userID: user.id, keep: configuration.versionsKept, cancelQueued: !keepQueued) { stored in
            try await memory.compute(.light) {
                let learner = try memory.learner(stored)
                for l in indices { try learner.reset(level: l) }
                return try memory.change(learner, changed: [], fresh: indices, cause: .reset,
                                         causeID: indices.map { config.levels[$0].name }.joined(separator: ","), actor: actor)
            }
        }
        return .ok(.init(body: .json(try await info(user, cancelled: mutation.cancelledJobs))))
    }

    func rollback(_ input: Operations.RollbackMemory.Input) async throws -> Operations.RollbackMemory.Output {
        let (principal, user) = try await users.requestUser()
        guard case .json(let body) = input.body else { throw APIError.invalid("expected a JSON body") }
        guard body.version >= 0 else { throw APIError.invalid("version must be at least 0", param: "version") }
        switch try await users.rollback(userID: user.id, to: body.version, keep: configuration.versionsKept, actor: principal.actor,
                                        cancelQueued: !(body.keepQueued ?? false), ifCurrent: nil) {
        case .rolledBack(let mutation):
            return .ok(.init(body: .json(try await info(user, cancelled: mutation.cancelledJobs))))
        case .notKept, .moved:
            throw APIError.notFound("version \(body.version) of user '\(user.name)' is not kept")
        }
    }

    func fork(_ input: Operations.ForkMemory.Input) async throws -> Operations.ForkMemory.Output {
        let (principal, user) = try await users.requestUser()
        guard case .json(let body) = input.body else { throw APIError.invalid("expected a JSON body") }
        // What is wrong with `to` (not a user id; a user that exists: Conflict → 409 user_exists) is named as the field.
        let target: UserName
        do { target = try UserName(body.to) } catch { throw FieldError(param: "to", error: error) }
        if let v = body.version, v < 0 { throw APIError.invalid("version must be at least 0", param: "version") }
        let forked: User
        do {
            forked = try await users.forkUser(source: user, version: body.version, target: target, actor: principal.actor)
        } catch let e as Conflict {
            throw FieldError(param: "to", error: e)
        }
        return .ok(.init(body: .json(try await info(forked))))
    }

    func consolidate(_ input: Operations.ConsolidateMemory.Input) async throws -> Operations.ConsolidateMemory.Output {
        let (principal, user) = try await users.requestUser()
        // The configured method and budget; the request may change the budget (`sleep` budgets itself).
        let automatic = configuration.consolidation, method = automatic.method
        var budget = automatic.budget
        if case .json(let body)? = input.body {
            if let s = body.steps { budget.steps = s }
            if let g = body.generatedTokens { budget.generatedTokens = g }
        }
        let maxSteps = configuration.maxConsolidationSteps, least = ConsolidationConfiguration.minimumSteps(method)
        guard (least...max(least, maxSteps)).contains(budget.steps) else {
            throw APIError.invalid("steps must be in \(least)...\(maxSteps) (max_consolidation_steps) for method \(method.rawValue)",
                                   param: "steps")
        }
        guard (0...256).contains(budget.generatedTokens) else {
            throw APIError.invalid("generated_tokens must be in 0...256", param: "generated_tokens")
        }
        guard memory.levels.consolidation != nil else { throw UserMemory.NotConsolidable() }
        let memory = self.memory, actor = principal.actor, budgetValue = budget, metrics = self.metrics
        let report = Handoff<UserMemory.Consolidated>()
        let start = ContinuousClock.now
        _ = try await users.mutateMemory(userID: user.id, keep: configuration.versionsKept, cancelQueued: false) { stored in
            try await memory.compute(.heavy) {
                let learner = try memory.learner(stored)
                let r = try memory.consolidate(learner, method: method, budget: budgetValue, sleep: automatic.sleep, actor: actor)
                report.put(r)
                return r.change
            }
        }
        let r = report.take()
        metrics.consolidated(trigger: nil, seconds: (ContinuousClock.now - start).seconds, changed: r?.change != nil)
        return .ok(.init(body: .json(.init(memory: try await info(user), klBefore: r?.klBefore ?? 0, klAfter: r?.klAfter ?? 0,
                                           steps: r?.steps ?? 0, unitsWritten: r?.written ?? 0))))
    }

    func export(_ input: Operations.ExportMemory.Input) async throws -> Operations.ExportMemory.Output {
        let (_, user) = try await users.requestUser()
        if let v = input.query.version, v < 0 { throw APIError.invalid("version must be at least 0", param: "version") }
        guard let stored = try await users.memory(userID: user.id, version: input.query.version, withLearner: true, withLevels: true) else {
            throw APIError.notFound("version \(input.query.version ?? user.version) of user '\(user.name)' is not kept")
        }
        let memory = self.memory
        let bytes = try await memory.compute(.light) {
            try LevelStateFile.encode(try memory.learner(stored), backbone: memory.model.fingerprint)
        }
        return .ok(.init(body: .binary(HTTPBody(bytes))))
    }

    /// POST /v1/users/{user}/memory/import: a state file (as export gives it)
    /// becomes the user's memory, as a new version (the user is created if
    /// missing). Routed by hand for its binary body and its own size limit.
    func register(on router: Router<AppContext>) {
        router.post("/v1/users/:user/memory/import") { request, _ in try await importState(request) }
    }

    func importState(_ request: Request) async throws -> Response {
        let principal = try RequestScope.principal(), name = try RequestScope.user()
        let keepQueued = try Query(request).bool("keep_queued", default: false)
        // The pipeline has read the body, within max_import_bytes.
        let data = Data(buffer: try await request.body.collect(upTo: configuration.maxImportBytes))
        let memory = self.memory, actor = principal.actor
        // Checked before any row is written: a bad file changes nothing (LevelStateFile.Incompatible → 400, param body).
        let learner = try await memory.compute(.light) {
            UncheckedLearner(value: try LevelStateFile.decode(data, model: memory.model, expecting: memory.levels))
        }
        guard let user = try await users.user(tenantID: principal.tenantID, name: name, create: true) else {
            throw APIError.notFound("no user '\(name)' in this tenant")
        }
        let digest = String(LevelStateFile.sha256(data).prefix(16))
        let mutation = try await users.mutateMemory(userID: user.id, keep: configuration.versionsKept, cancelQueued: !keepQueued) { _ in
            try await memory.compute(.light) {
                try memory.change(learner.value, changed: Array(memory.levels.levels.indices), cause: .import,
                                  causeID: "sha256:" + digest, actor: actor)
            }
        }
        return try JSONReply.response(try await info(user, cancelled: mutation.cancelledJobs))
    }

    /// A decoded learner handed between the learning thread and the request.
    struct UncheckedLearner: @unchecked Sendable {
        let value: LevelLearner
    }
}

/// A value handed out of a closure that runs elsewhere (the learning thread).
final class Handoff<T: Sendable>: Sendable {
    private let value = Mutex<T?>(nil)
    func put(_ v: T) { value.withLock { $0 = v } }
    func take() -> T? { value.withLock { $0 } }
}
