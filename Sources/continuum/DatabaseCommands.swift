// continuum migrate / tenants / keys: the database from the shell.
import ArgumentParser
import Foundation
import Store

/// Where the database is: a URL, or a private PostgreSQL in a data directory.
struct DatabaseOptions: ParsableArguments {
    @Option(help: "PostgreSQL URL (default: $DATABASE_URL; without either, a private PostgreSQL in --data-dir).")
    var databaseURL: String?

    @Option(help: "Data directory of the private PostgreSQL (default: ~/.local/share/continuum).")
    var dataDir: String?

    static var defaultDataDirectory: String {
        let env = ProcessInfo.processInfo.environment
        let base = env["XDG_DATA_HOME"] ?? (NSHomeDirectory() + "/.local/share")
        return base + "/continuum"
    }

    /// The database's URL, and the private server when one was started (stop it when done).
    func locate() throws -> (url: String, server: LocalPostgres?) {
        if let u = databaseURL ?? ProcessInfo.processInfo.environment["DATABASE_URL"] {
            if dataDir != nil { throw ValidationError("give --database-url or --data-dir, not both") }
            return (u, nil)
        }
        let dir = dataDir ?? Self.defaultDataDirectory
        do {
            let server = try LocalPostgres(dataDirectory: dir + "/postgres")
            return (server.url, server)
        } catch let e as LocalPostgres.Failure {
            throw CLIError(e.description)
        }
    }

    /// The database, migrated, running its own pool until `close()`, and the
    /// private server when one was started (stop it when done).
    func open() async throws -> (Database, LocalPostgres?) {
        let (url, server) = try locate()
        let db: Database
        do {
            db = try Database(url: url)
            try await db.migrate()
        } catch let e as Database.Failure {
            server?.stop()
            throw CLIError(e.description)
        }
        return (db, server)
    }
}

/// Runs `body` against the database and closes it (and a private server) afterwards.
func withDatabase(_ options: DatabaseOptions, _ body: (Database) async throws -> Void) async throws {
    let (db, server) = try await options.open()
    do {
        try await body(db)
    } catch {
        await db.close()
        server?.stop()
        if let e = error as? Database.Failure { throw CLIError(e.description) }
        throw error
    }
    await db.close()
    server?.stop()
}

struct Migrate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Apply the database migrations not yet applied (under an advisory lock) and print the schema version.")

    @OptionGroup var database: DatabaseOptions

    func run() async throws {
        try await withDatabase(database) { db in
            print("schema version \(try await db.schemaVersion())")
        }
    }
}

struct Tenants: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create and list tenants.", subcommands: [Create.self, List.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a tenant; prints its id and name.")
        @OptionGroup var database: DatabaseOptions
        @Argument(help: "The tenant's unique name.") var name: String

        func run() async throws {
            try await withDatabase(database) { db in
                let t = try await db.createTenant(name: name)
                print("tenant \(t.id) \(t.name)")
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List tenants: id, name, learning on/off, created.")
        @OptionGroup var database: DatabaseOptions

        func run() async throws {
            try await withDatabase(database) { db in
                for t in try await db.tenants() {
                    print("\(t.id)\t\(t.name)\tlearning \(t.learning ? "on" : "off")\t\(ISO8601DateFormatter().string(from: t.createdAt))")
                }
            }
        }
    }
}

struct Keys: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create, list and revoke a tenant's API keys.", subcommands: [Create.self, List.self, Revoke.self])

    static func tenant(_ db: Database, _ name: String) async throws -> Tenant {
        guard let t = try await db.tenant(named: name) else { throw CLIError("no tenant named '\(name)'") }
        return t
    }

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create an API key; prints `API key: <key>` once (only its hash is stored).")
        @OptionGroup var database: DatabaseOptions
        @Option(help: "The tenant's name.") var tenant: String
        @Option(help: "A label for the key.") var name = ""
        @Option(help: "app: generation, completions, chat, models, feedback, reading a user's memory; admin: also memory operations, export/import, erasure and the audit.")
        var role: KeyRole = .app

        func run() async throws {
            try await withDatabase(database) { db in
                let (record, key) = try await db.createKey(tenantID: try await Keys.tenant(db, tenant).id, name: name, role: role)
                log("\(role.rawValue) key \(record.id) (\(record.prefix)…) for tenant \(tenant)")
                print("API key: \(key)")
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List a tenant's keys: id, prefix, role, name, created, revoked.")
        @OptionGroup var database: DatabaseOptions
        @Option(help: "The tenant's name.") var tenant: String

        func run() async throws {
            try await withDatabase(database) { db in
                let f = ISO8601DateFormatter()
                for k in try await db.keys(tenantID: try await Keys.tenant(db, tenant).id) {
                    print("\(k.id)\t\(k.prefix)…\t\(k.role.rawValue)\t\(k.name)\t\(f.string(from: k.createdAt))\t\(k.revokedAt.map { "revoked " + f.string(from: $0) } ?? "active")")
                }
            }
        }
    }

    struct Revoke: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Revoke a key by id; requests with it get 401 from then on.")
        @OptionGroup var database: DatabaseOptions
        @Option(help: "The tenant's name.") var tenant: String
        @Argument(help: "The key's id (from `keys list`).") var id: Int64

        func run() async throws {
            try await withDatabase(database) { db in
                guard try await db.revokeKey(id: id, tenantID: try await Keys.tenant(db, tenant).id) else {
                    throw CLIError("tenant \(tenant) has no active key \(id)")
                }
                print("revoked key \(id)")
            }
        }
    }
}

extension KeyRole: ExpressibleByArgument {}
