// continuum serve: the HTTP service. With no database URL it runs a private
// PostgreSQL in the data directory, migrates it, and on first start creates a
// "dev" tenant and prints its API key once. This is the Hummingbird
// template's App.swift (the command that reads its arguments and runs
// `buildApplication`, Service/App+build.swift); the CLI's other commands sit
// beside it.
import ArgumentParser
import Foundation
import Logging
import Memory
import Model
import Service
import Store

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve the HTTP API (see openapi.yaml); Ctrl-C drains requests and stops.")

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var database: DatabaseOptions

    @Option(help: "Port to listen on (0: any free port).")
    var port: Int = 8080

    @Option(help: "Address to listen on.")
    var host = "127.0.0.1"

    @Option(help: "Service configuration (JSON: limits, batch size, model name); --host/--port override it.")
    var config: String?

    @Option(help: "Level configuration (JSON or YAML) every user's memory follows (default: the documented defaults).")
    var levels: String?

    @Option(help: "Least severe log messages written to standard error: trace, debug, info, notice, warning, error, critical.")
    var logLevel: Logger.Level = .info

    func run() async throws {
        // Logs go to standard error (standard output carries the API key line), key-shaped text masked.
        let level = logLevel
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return RedactingLogHandler(handler)
        }
        var cfg = ServiceConfiguration()
        if let config {
            guard let data = FileManager.default.contents(atPath: config) else { throw CLIError("cannot read \(config)") }
            do {
                cfg = try JSONDecoder().decode(ServiceConfiguration.self, from: data)
            } catch let e as ServiceConfiguration.Invalid {
                throw CLIError("\(config): \(e.description)")
            } catch {
                throw CLIError("\(config): not a service configuration: \(error)")
            }
        }
        cfg.host = host
        cfg.port = port
        do { try cfg.validate() } catch let e as ServiceConfiguration.Invalid { throw ValidationError(e.description) }
        if modelOptions.model == nil && ProcessInfo.processInfo.environment["CONTINUUM_MODEL"] == nil
            && !FileManager.default.fileExists(atPath: DefaultModel.path) {
            _ = try DefaultModel.fetch(to: DefaultModel.path, log: log)
        }
        let model = try modelOptions.load()
        let levelConfiguration: LevelConfiguration?
        do { levelConfiguration = try levels.map { try LevelConfiguration.load(path: $0) } } catch {
            throw CLIError("\(levels!): \(error)")
        }
        let (url, server) = try database.locate()
        defer { server?.stop() }
        // The application runs the pool as its first service (stopped last); migrations and the
        // first start's tenant and key come before it serves.
        let db: Database
        do { db = try Database(url: url, running: .byCaller) } catch let e as Database.Failure { throw CLIError(e.description) }
        let host = cfg.host, created = FirstKey()
        let app = try buildApplication(configuration: cfg, model: model, levels: levelConfiguration, store: db,
                                       services: [DatabaseService(db)],
                                       beforeServing: [{ created.key = try await Self.prepare(db) }]) { port in
            log("serving on http://\(host):\(port) (docs at /docs)")
            if let key = created.key { writeOut(Self.firstSteps(base: "http://\(host):\(port)", key: key)) }
        }
        try await app.runService()
    }

    /// Migrates, and on an empty database creates the `dev` tenant and prints
    /// its admin key once (standard output). Returns the key when it made one.
    static func prepare(_ db: Database) async throws -> String? {
        do { try await db.migrate() } catch let e as Database.Failure { throw CLIError(e.description) }
        guard try await db.tenants().isEmpty else { return nil }
        // Replicas starting together on an empty database: one creates it, the others see it exists.
        guard let tenant = try? await db.createTenant(name: "dev") else { return nil }
        let (_, key) = try await db.createKey(tenantID: tenant.id, name: "dev", role: .admin)
        writeOut("API key: \(key)\n")   // unbuffered: a supervisor reading stdout sees it at once
        return key
    }

    /// Ready-to-paste first requests (standard output, beside the key: never into the logs).
    static func firstSteps(base: String, key: String) -> String {
        """
        That is an admin key of tenant "dev", shown this once. Try it:
          curl -s \(base)/v1/chat/completions -H 'Authorization: Bearer \(key)' -H 'content-type: application/json' \\
            -d '{"model": "continuum", "user": "alice", "messages": [{"role": "user", "content": "My cat is called Zorblax."}], "wait_for_learning": true}'
          python3 -c 'import openai; c = openai.OpenAI(base_url="\(base)/v1", api_key="\(key)"); print(c.chat.completions.create(model="continuum", user="alice", messages=[{"role": "user", "content": "What is my cat called?"}]).choices[0].message.content)'
        Drift reports in a browser: \(base)/signin (sign in with the key). An app's key (no admin operations):
          continuum keys create --tenant dev --role app

        """
    }
}

/// The key the first start made, handed from set-up to the "serving" message.
final class FirstKey: @unchecked Sendable {
    private let lock = NSLock()
    private var value: String?
    var key: String? {
        get { lock.withLock { value } }
        set { lock.withLock { value = newValue } }
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}
