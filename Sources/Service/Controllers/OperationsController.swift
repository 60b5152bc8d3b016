// The operations endpoints: liveness and readiness, the served model,
// Prometheus metrics, the spec this server was generated from (/openapi.yaml)
// and a page listing its operations (/docs). All public but /v1/models.
import Foundation
import Hummingbird
import Store

struct OperationsController {
    let configuration: ServiceConfiguration
    let store: any StoreMaintenance
    let queue: any LearningQueue
    let engine: BatchEngine
    let cache: LevelCache
    let metrics: Metrics
    let started: Date

    func health(_ input: Operations.Health.Input) async throws -> Operations.Health.Output {
        .ok(.init(body: .json(.init(status: .ok))))
    }

    func ready(_ input: Operations.Ready.Input) async throws -> Operations.Ready.Output {
        let database = (try? await store.ping()) != nil
        let migrations = database ? ((try? await store.isMigrated()) ?? false) : false
        let readiness = Components.Schemas.Readiness(ready: database && migrations,
                                                     checks: .init(model: true, database: database, migrations: migrations))
        return readiness.ready ? .ok(.init(body: .json(readiness))) : .serviceUnavailable(.init(body: .json(readiness)))
    }

    func models(_ input: Operations.ListModels.Input) async throws -> Operations.ListModels.Output {
        _ = try RequestScope.principal()
        return .ok(.init(body: .json(.init(object: .list, data: [
            .init(id: configuration.modelName, object: .model, created: Int64(started.timeIntervalSince1970), ownedBy: "continuum"),
        ]))))
    }

    func register(on router: Router<AppContext>) {
        router.get("/metrics") { _, _ in await metricsText() }
        router.get("/openapi.yaml") { _, _ in
            Response(status: .ok, headers: [.contentType: "application/yaml"], body: ResponseBody(byteBuffer: ByteBuffer(string: Self.spec)))
        }
        router.get("/docs") { _, _ in
            Response(status: .ok, headers: [.contentType: "text/html; charset=utf-8"],
                     body: ResponseBody(byteBuffer: ByteBuffer(string: Self.page())))
        }
    }

    /// GET /metrics in the Prometheus text format (no key needed, like /healthz).
    func metricsText() async -> Response {
        let queue = (try? await self.queue.queuedJobs()) ?? (count: -1, oldestSeconds: -1)
        let cache = self.cache.snapshot()
        let engine = self.engine.load
        let text = metrics.render(samples: [
            .init(name: "continuum_generations_running", help: "Sequences in the batch engine.", value: Double(engine.running)),
            .init(name: "continuum_generations_waiting", help: "Sequences admitted, waiting for a batch slot.", value: Double(engine.waiting)),
            .init(name: "continuum_learning_jobs_queued", help: "Learning jobs queued in the database (all replicas).", value: Double(queue.count)),
            .init(name: "continuum_learning_oldest_queued_seconds", help: "Age of the oldest queued learning job.", value: queue.oldestSeconds),
            .init(name: "continuum_level_cache_entries", help: "Users' level weights cached.", value: Double(cache.entries)),
            .init(name: "continuum_level_cache_bytes", help: "Bytes of cached level weights.", value: Double(cache.bytes)),
            .init(name: "continuum_level_cache_hits_total", help: "Level cache lookups that found the version's weights.",
                  value: Double(cache.hits), counter: true),
            .init(name: "continuum_level_cache_misses_total", help: "Level cache lookups that had to decode the weights from the store.",
                  value: Double(cache.misses), counter: true),
        ])
        return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                        body: ResponseBody(byteBuffer: ByteBuffer(string: text)))
    }

    /// The spec as built into this binary.
    static let spec: String = {
        guard let url = Bundle.module.url(forResource: "openapi", withExtension: "yaml"),
              let text = try? String(contentsOf: url, encoding: .utf8) else { return "" }
        return text
    }()

    /// The operations (method, path, summary) read from the spec's `paths`.
    static func operations() -> [(method: String, path: String, summary: String)] {
        var out: [(String, String, String)] = []
        var inPaths = false, path = "", method = ""
        for raw in spec.split(separator: "\n", omittingEmptySubsequences: false) {
            let line = String(raw)
            if line.hasPrefix("paths:") { inPaths = true; continue }
            if inPaths, !line.isEmpty, !line.hasPrefix(" ") { inPaths = false }
            guard inPaths else { continue }
            if line.hasPrefix("  /"), line.hasSuffix(":"), !line.hasPrefix("   ") {
                path = String(line.dropFirst(2).dropLast())
            } else if line.hasPrefix("    "), !line.hasPrefix("     "), line.hasSuffix(":") {
                method = String(line.dropFirst(4).dropLast()).uppercased()
            } else if line.hasPrefix("      summary:") {
                out.append((method, path, line.replacingOccurrences(of: "      summary:", with: "").trimmingCharacters(in: .whitespaces)))
            }
        }
        return out
    }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }

    static func page() -> String {
        let rows = operations().map { "<tr><td><code>\($0.method)</code></td><td><code>\(escape($0.path))</code></td><td>\(escape($0.summary))</td></tr>" }
        return """
            <!doctype html>
            <html lang="en"><head><meta charset="utf-8"><title>Continuum API</title>
            <style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
            table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:.3rem .6rem;text-align:left}
            pre{background:#f6f6f6;padding:1rem;overflow-x:auto}</style></head>
            <body><h1>Continuum API</h1>
            <p>Authenticate with <code>Authorization: Bearer &lt;API key&gt;</code>. The machine-readable spec is at
            <a href="/openapi.yaml">/openapi.yaml</a>.</p>
            <table><tr><th>method</th><th>path</th><th>summary</th></tr>
            \(rows.joined(separator: "\n"))
            </table>
            <h2>Specification</h2><pre>\(escape(spec))</pre></body></html>
            """
    }
}
