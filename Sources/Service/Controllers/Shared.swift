// What several controllers share: the request's user resolved within the
// key's tenant, and what became of a learning job.
import Foundation
import Store

extension Principal {
    /// The provenance a change records: "key:<id>" of the key whose request caused it.
    var actor: String { "key:\(keyID)" }
}

extension MemoryStore {
    /// The caller's user named `name`, or 404.
    func existingUser(_ name: UserName, _ principal: Principal) async throws -> User {
        guard let user = try await user(tenantID: principal.tenantID, name: name) else {
            throw APIError.notFound("no user '\(name)' in this tenant")
        }
        return user
    }

    /// The caller and the user the request's path names (checked by the pipeline), or 404.
    func requestUser() async throws -> (Principal, User) {
        let principal = try RequestScope.principal()
        return (principal, try await existingUser(try RequestScope.user(), principal))
    }
}

/// What became of a learning job, for the answers of the requests that enqueue one.
struct LearningStatus: Sendable {
    let queue: any LearningQueue
    /// Longest wait for a job (`wait_for_learning`).
    let waitSeconds: Double

    /// The job's state; with `wait`, after waiting (up to `waitSeconds`) for it to be applied, failed or cancelled.
    func state(job: Int64?, wait: Bool) async throws -> Components.Schemas.Learning {
        guard let job else { return .init(state: .off) }
        if wait {
            let deadline = ContinuousClock.now + .seconds(waitSeconds)
            while ContinuousClock.now < deadline {
                if let s = try await queue.jobState(id: job) {
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
}
