// Database: Continuum's PostgreSQL connection pool and its schema
// migrations. Only the Store module imports PostgresNIO.
import Foundation
import Logging
import PostgresNIO

/// A connection pool to Continuum's database.
public final class Database: Sendable {
    let client: PostgresClient
    /// The pool's run loop, when this object runs it (`.background`).
    private let runner: Task<Void, Never>?
    let logger: Logger

    /// Who runs the connection pool: this object, from `init` until `close()`
    /// (the CLI's commands, tests), or the caller, whose structured task (an
    /// application's service) calls `run()` for as long as it needs the pool.
    public enum Running: Sendable {
        case background, byCaller
    }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    /// Connects to `url`: postgres://user[:password]@host[:port]/database over
    /// TCP, or postgres://user@/database?host=/socket/dir&port=N over the Unix
    /// socket <dir>/.s.PGSQL.<N> (libpq's forms, see `DatabaseURL`).
    /// Connections open lazily; `ping` checks the server is reachable.
    public init(url: String, logger: Logger = Logger(label: "continuum.store"), running: Running = .background) throws {
        let u = try DatabaseURL(url)
        let config: PostgresClient.Configuration
        switch u.endpoint {
        case let .tcp(host, port):
            config = .init(host: host, port: port, username: u.username, password: u.password, database: u.database,
                           tls: .disable)
        case let .unixSocket(path):
            config = .init(unixSocketPath: path, username: u.username, password: u.password, database: u.database)
        }
        let client = PostgresClient(configuration: config, backgroundLogger: logger)
        self.client = client
        self.logger = logger
        runner = running == .background ? Task { await client.run() } : nil
    }

    /// Runs the connection pool until the calling task is cancelled (for `.byCaller`).
    public func run() async {
        precondition(runner == nil, "this database runs its own pool (.background)")
        await client.run()
    }

    /// Closes every connection of a pool this object runs (`.background`).
    public func close() async {
        runner?.cancel()
        _ = await runner?.value
    }

    /// Fails unless the server answers.
    public func ping() async throws {
        try await client.query("SELECT 1", logger: logger)
    }

    // MARK: Migrations

    /// A numbered SQL file from `Migrations/` (NNNN_name.sql).
    public struct Migration: Sendable {
        public let version: Int
        public let name: String
        public let sql: String

        /// The statements, split at semicolons that end a line (comments dropped).
        var statements: [String] {
            var out: [String] = [], current = ""
            for line in sql.split(separator: "\n", omittingEmptySubsequences: false) {
                let trimmed = line.trimmingCharacters(in: .whitespaces)
                if trimmed.hasPrefix("--") { continue }
                current += line + "\n"
                if trimmed.hasSuffix(";") {
                    out.append(current.trimmingCharacters(in: .whitespacesAndNewlines))
                    current = ""
                }
            }
            let rest = current.trimmingCharacters(in: .whitespacesAndNewlines)
            if !rest.isEmpty { out.append(rest) }
            return out
        }
    }

    /// The highest migration shipped with this build (read once; /readyz asks often).
    static let latestBundledVersion: Int = (try? bundledMigrations().map(\.version).max()) ?? Int.max

    /// The migrations shipped with this build, in order.
    public static func bundledMigrations() throws -> [Migration] {
        guard let dir = Bundle.module.url(forResource: "Migrations", withExtension: nil) else {
            throw Failure(description: "the Migrations resource is missing from this build")
        }
        return try migrations(in: dir.path)
    }

    /// Reads NNNN_name.sql files from `directory`, in version order.
    public static func migrations(in directory: String) throws -> [Migration] {
        let files = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".sql") }.sorted()
        var seen = Set<Int>()
        return try files.map { file in
            guard let version = Int(file.prefix { $0.isNumber }), file.first!.isNumber else {
                throw Failure(description: "migration \(file) does not start with its number (NNNN_name.sql)")
            }
            guard seen.insert(version).inserted else { throw Failure(description: "two migrations are numbered \(version)") }
            let sql = try String(contentsOfFile: directory + "/" + file, encoding: .utf8)
            return Migration(version: version, name: String(file.dropLast(4)), sql: sql)
        }
    }

    /// Key of the advisory lock that serialises migrations across processes.
    static let migrationLock: Int64 = 0x636F_6E74_696E_7575 & 0x7FFF_FFFF_FFFF_FFFF

    /// Applies the migrations not yet applied, each in its own transaction,
    /// under an advisory lock (so replicas starting together apply each once),
    /// recording them in schema_migrations. Returns the versions applied now.
    @discardableResult
    public func migrate(_ migrations: [Migration]? = nil) async throws -> [Int] {
        let all = try migrations ?? Self.bundledMigrations()
        let logger = self.logger
        return try await client.withConnection { conn in
            try await conn.query("SELECT pg_advisory_lock(\(Self.migrationLock))", logger: logger)
            do {
                try await conn.query("""
                    CREATE TABLE IF NOT EXISTS schema_migrations (
                        version INT PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())
                    """, logger: logger)
                var applied = Set<Int>()
                for try await v in try await conn.query("SELECT version FROM schema_migrations", logger: logger).decode(Int.self) {
                    applied.insert(v)
                }
                var now: [Int] = []
                for m in all where !applied.contains(m.version) {
                    try await conn.withTransaction(logger: logger) { tx in
                        for statement in m.statements {
                            try await tx.query(PostgresQuery(unsafeSQL: statement), logger: logger)
                        }
                        try await tx.query("INSERT INTO schema_migrations (version, name) VALUES (\(m.version), \(m.name))",
                                           logger: logger)
                    }
                    now.append(m.version)
                }
                try await conn.query("SELECT pg_advisory_unlock(\(Self.migrationLock))", logger: logger)
                return now
            } catch {
                _ = try? await conn.query("SELECT pg_advisory_unlock(\(Self.migrationLock))", logger: logger)
                throw error
            }
        }
    }

    /// The highest applied migration (0: none).
    public func schemaVersion() async throws -> Int {
        let rows = try await client.query("""
            SELECT COALESCE(MAX(version), 0) FROM schema_migrations
            """, logger: logger)
        for try await v in rows.decode(Int.self) { return v }
        return 0
    }

    /// Whether every bundled migration is applied.
    public func isMigrated() async throws -> Bool {
        let exists = try await client.query("SELECT to_regclass('schema_migrations') IS NOT NULL", logger: logger)
        for try await e in exists.decode(Bool.self) where !e { return false }
        return try await schemaVersion() >= Self.latestBundledVersion
    }
}

extension Database {
    /// Runs `body` in a transaction on one connection: committed when it
    /// returns, rolled back when it throws, and then its own error is rethrown.
    func transaction<T: Sendable>(_ body: @Sendable (PostgresConnection) async throws -> T) async throws -> T {
        let logger = self.logger
        do {
            return try await client.withConnection { conn in
                try await conn.withTransaction(logger: logger) { tx in try await body(tx) }
            }
        } catch let e as PostgresTransactionError {
            if let inner = e.closureError, e.rollbackError == nil { throw inner }
            throw e
        }
    }

    /// The name of the database this pool is connected to.
    public func currentDatabase() async throws -> String {
        for try await name in try await client.query("SELECT current_database()", logger: logger).decode(String.self) { return name }
        throw Failure(description: "no current database")
    }
}

// Raw SQL for the store's own tests (trusted text; not for request data).
extension Database {
    func execute(unsafeSQL sql: String) async throws {
        try await client.query(PostgresQuery(unsafeSQL: sql), logger: logger)
    }

    /// The first column of the first row, as an integer, with optional text binds $1, $2, ….
    func integer(unsafeSQL sql: String, _ binds: String...) async throws -> Int {
        var b = PostgresBindings()
        for x in binds { b.append(x) }
        for try await v in try await client.query(PostgresQuery(unsafeSQL: sql, binds: b), logger: logger).decode(Int.self) { return v }
        throw Failure(description: "no row: \(sql)")
    }
}

extension Database {
    /// Creates an empty database on this server (for scratch databases: tests, tools).
    public func createDatabase(named name: String) async throws {
        guard name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" }), let first = name.first, first.isLetter else {
            throw Failure(description: "a database name must be letters, digits and _, starting with a letter: \(name)")
        }
        try await execute(unsafeSQL: "CREATE DATABASE \(name)")
    }
}

/// PostgreSQL is the store of record.
extension Database: ContinuumStore {}
