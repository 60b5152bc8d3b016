// The operations generated from openapi.yaml (swift-openapi-generator's
// APIProtocol), each handed to the controller of its resource. Routed by
// hand beside these, in their controllers: the generation endpoints (JSON
// or server-sent events by the body's `stream`), the import (a binary body
// with its own limit), the audit (JSON, CSV or HTML), /metrics and the docs.
import Foundation

struct OpenAPIHandler: APIProtocol {
    let operations: OperationsController
    let feedback: FeedbackController
    let memory: MemoryController

    func health(_ input: Operations.Health.Input) async throws -> Operations.Health.Output { try await operations.health(input) }
    func ready(_ input: Operations.Ready.Input) async throws -> Operations.Ready.Output { try await operations.ready(input) }
    func listModels(_ input: Operations.ListModels.Input) async throws -> Operations.ListModels.Output { try await operations.models(input) }

    func createFeedback(_ input: Operations.CreateFeedback.Input) async throws -> Operations.CreateFeedback.Output {
        try await feedback.create(input)
    }

    func getMemory(_ input: Operations.GetMemory.Input) async throws -> Operations.GetMemory.Output { try await memory.get(input) }
    func listVersions(_ input: Operations.ListVersions.Input) async throws -> Operations.ListVersions.Output {
        try await memory.versions(input)
    }
    func resetMemory(_ input: Operations.ResetMemory.Input) async throws -> Operations.ResetMemory.Output { try await memory.reset(input) }
    func rollbackMemory(_ input: Operations.RollbackMemory.Input) async throws -> Operations.RollbackMemory.Output {
        try await memory.rollback(input)
    }
    func forkMemory(_ input: Operations.ForkMemory.Input) async throws -> Operations.ForkMemory.Output { try await memory.fork(input) }
    func consolidateMemory(_ input: Operations.ConsolidateMemory.Input) async throws -> Operations.ConsolidateMemory.Output {
        try await memory.consolidate(input)
    }
    func exportMemory(_ input: Operations.ExportMemory.Input) async throws -> Operations.ExportMemory.Output {
        try await memory.export(input)
    }
    func eraseUser(_ input: Operations.EraseUser.Input) async throws -> Operations.EraseUser.Output { try await memory.erase(input) }
}
