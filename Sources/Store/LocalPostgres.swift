// LocalPostgres: a private PostgreSQL cluster from the system's binaries, for
// `continuum serve` without a database URL and for the tests. initdb into a
// data directory (once), then pg_ctl start on 127.0.0.1 at a chosen port with
// the socket inside the data directory. When running as root (PostgreSQL
// refuses to), the server runs as the `postgres` system user.
import Foundation

/// A PostgreSQL server this process started and owns.
public final class LocalPostgres: @unchecked Sendable {
    public let dataDirectory: String
    public let port: Int
    /// Whether this process started the server (and `stop` stops it).
    public let owned: Bool
    /// The role and database created at initdb (trust authentication on loopback only).
    public var user: String { "continuum" }
    public var database: String { "continuum" }
    let binaries: String
    let runAs: String?

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    /// The directory holding initdb and pg_ctl: $CONTINUUM_PG_BIN, else the
    /// newest /usr/lib/postgresql/N/bin, else the directory of `initdb` on PATH.
    public static func findBinaries() throws -> String {
        let fm = FileManager.default
        if let dir = ProcessInfo.processInfo.environment["CONTINUUM_PG_BIN"] { return dir }
        if let versions = try? fm.contentsOfDirectory(atPath: "/usr/lib/postgresql") {
            for v in versions.sorted(by: { (Int($0) ?? 0) > (Int($1) ?? 0) }) {
                let dir = "/usr/lib/postgresql/\(v)/bin"
                if fm.isExecutableFile(atPath: dir + "/initdb") { return dir }
            }
        }
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":") {
            if fm.isExecutableFile(atPath: "\(dir)/initdb") && fm.isExecutableFile(atPath: "\(dir)/pg_ctl") { return String(dir) }
        }
        throw Failure(description: "PostgreSQL server binaries (initdb, pg_ctl) not found: install PostgreSQL (Debian: apt-get install postgresql), set CONTINUUM_PG_BIN, or give a database URL")
    }

    /// Creates the cluster in `dataDirectory` if it has none, and starts it on
    /// `port` (0: a free port). Waits until it accepts connections.
    public init(dataDirectory: String, port: Int = 0) throws {
        let fm = FileManager.default
        let binaries = try Self.findBinaries(), runAs = geteuid() == 0 ? "postgres" : nil
        let dir = URL(fileURLWithPath: dataDirectory).standardizedFileURL.path
        func tool(_ name: String, _ arguments: [String]) throws -> String {
            try Self.run(binaries: binaries, runAs: runAs, dataDirectory: dir, name, arguments)
        }
        try fm.createDirectory(atPath: dir, withIntermediateDirectories: true)
        if !fm.fileExists(atPath: dir + "/PG_VERSION") {
            try Self.ownForServer(dir, runAs: runAs)
            _ = try tool("initdb", ["-D", dir, "-U", "continuum", "--auth=trust", "-E", "UTF8", "--no-instructions"])
        }
        // A server already running on this directory (another continuum
        // process) is shared, not restarted; its port is in postmaster.pid.
        var chosen = port == 0 ? try Self.freePort() : port
        var started = false
        if (try? tool("pg_ctl", ["-D", dir, "status"])) != nil,
           let pid = try? String(contentsOfFile: dir + "/postmaster.pid", encoding: .utf8),
           let running = pid.split(separator: "\n", omittingEmptySubsequences: false).dropFirst(3).first.flatMap({ Int($0) }) {
            chosen = running
        } else {
            let options = "-p \(chosen) -c listen_addresses=127.0.0.1 -c unix_socket_directories='\(dir)'"
            _ = try tool("pg_ctl", ["-D", dir, "-o", options, "-l", dir + "/server.log", "-w", "-t", "60", "start"])
            started = true
        }
        // The database (initdb creates only postgres and the templates).
        do {
            _ = try tool("createdb", ["-h", "127.0.0.1", "-p", "\(chosen)", "-U", "continuum", "continuum"])
        } catch let e as Failure where e.description.contains("already exists") {}
        self.binaries = binaries
        self.runAs = runAs
        self.dataDirectory = dir
        self.port = chosen
        owned = started
    }

    /// postgres://continuum@127.0.0.1:PORT/continuum
    public var url: String { "postgres://\(user)@127.0.0.1:\(port)/\(database)" }

    /// Stops the server if this process started it (fast shutdown: open sessions are ended).
    public func stop() {
        guard owned else { return }
        _ = try? Self.run(binaries: binaries, runAs: runAs, dataDirectory: dataDirectory, "pg_ctl", ["-D", dataDirectory, "stop", "-m", "fast", "-w"])
    }

    /// Runs one of the PostgreSQL tools; returns its standard output.
    /// posix_spawn and waitpid rather than Foundation's Process, whose
    /// waitUntilExit can miss the child's exit when called from Swift
    /// concurrency's threads; output goes to files, not pipes, because pg_ctl
    /// start leaves a server running that could hold a pipe open.
    static func run(binaries: String, runAs: String?, dataDirectory: String, _ tool: String, _ arguments: [String]) throws -> String {
        let argv = runAs.map { ["/usr/sbin/runuser", "-u", $0, "--", binaries + "/" + tool] } ?? [binaries + "/" + tool]
        let all = argv + arguments
        let base = NSTemporaryDirectory() + "continuum-pg-\(UUID().uuidString)"
        defer {
            try? FileManager.default.removeItem(atPath: base + ".out")
            try? FileManager.default.removeItem(atPath: base + ".err")
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, base + ".out", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, base + ".err", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        var cArgs = all.map { strdup($0) } + [nil]
        defer { for a in cArgs { free(a) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, all[0], &actions, nil, &cArgs, environ)
        guard spawned == 0 else { throw Failure(description: "cannot run \(all[0]): error \(spawned)") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let output = FileManager.default.contents(atPath: base + ".out") ?? Data()
        let errors = FileManager.default.contents(atPath: base + ".err") ?? Data()
        let exited = (status & 0x7f) == 0, code = (status >> 8) & 0xff
        guard exited && code == 0 else {
            var message = String(decoding: errors, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            if tool == "pg_ctl", let log = try? String(contentsOfFile: dataDirectory + "/server.log", encoding: .utf8) {
                message += "\n" + log.split(separator: "\n").suffix(10).joined(separator: "\n")
            }
            throw Failure(description: "\(tool) failed (status \(exited ? code : -1)): \(message)")
        }
        return String(decoding: output, as: UTF8.self)
    }

    /// As root, hands the directory (and its parent chain's search permission) to the server's user.
    static func ownForServer(_ path: String, runAs: String?) throws {
        guard let runAs else { return }
        do {
            _ = try run(binaries: "/bin", runAs: nil, dataDirectory: path, "chown", ["-R", "\(runAs):\(runAs)", path])
        } catch {
            throw Failure(description: "cannot give \(path) to the \(runAs) user: \(error)")
        }
        // The server user must be able to reach the directory.
        var dir = URL(fileURLWithPath: path).deletingLastPathComponent()
        while dir.path != "/" {
            if let attrs = try? FileManager.default.attributesOfItem(atPath: dir.path),
               let mode = attrs[.posixPermissions] as? Int, mode & 0o001 == 0 {
                try? FileManager.default.setAttributes([.posixPermissions: mode | 0o001], ofItemAtPath: dir.path)
            }
            dir.deleteLastPathComponent()
        }
    }

    /// A TCP port on 127.0.0.1 nobody listens on now.
    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket() failed") }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = 0
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
        }
        guard bound else { throw Failure(description: "cannot find a free port") }
        return Int(UInt16(bigEndian: addr.sin_port))
    }
}

/// Servers to stop (and data directories to remove) when the process exits.
nonisolated(unsafe) private var exitList: [(LocalPostgres, Bool)] = []
private let exitLock = NSLock()
private let exitHook: Void = {
    atexit {
        exitLock.lock()
        let list = exitList
        exitList = []
        exitLock.unlock()
        for (server, remove) in list {
            server.stop()
            if remove { try? FileManager.default.removeItem(atPath: server.dataDirectory) }
        }
    }
}()

extension LocalPostgres {
    /// Stops this server when the process exits normally (for scratch servers:
    /// tests, tools), removing its data directory if `removingData`.
    public func stopAtExit(removingData: Bool = false) {
        _ = exitHook
        exitLock.lock()
        exitList.append((self, removingData))
        exitLock.unlock()
    }
}
