// LocalPostgres: a private PostgreSQL cluster from the system's binaries, for
// `continuum serve` without a database URL and for the tests. initdb into a
// data directory (once), then pg_ctl start at a chosen port. When running as
// root (PostgreSQL refuses to), the server runs as the `postgres` system user.
//
// Private means other local users cannot connect: the server listens on no
// TCP address (listen_addresses is empty, and pg_hba.conf rejects every host
// connection besides), only on a Unix-domain socket in a directory only the
// server's user (and root) can enter: the data directory (0700) when the
// socket path <dir>/.s.PGSQL.<port> fits in sun_path (107 bytes), else a fresh
// 0700 directory under /tmp. Connections through that socket are trusted.
// Clusters an older build created (trust on 127.0.0.1) get their host lines
// rewritten to reject before this build starts them.
import Foundation

/// A PostgreSQL server this process started and owns.
public final class LocalPostgres: @unchecked Sendable {
    public let dataDirectory: String
    /// The directory of the server's socket, .s.PGSQL.<port> (mode 0700).
    public let socketDirectory: String
    /// The port: it names the socket file (nothing listens on it over TCP).
    public let port: Int
    /// Whether this process started the server (and `stop` stops it).
    public let owned: Bool
    /// The role and database created at initdb (trust authentication over the Unix socket only).
    public var user: String { "continuum" }
    public var database: String { "continuum" }
    let binaries: String
    let runAs: String?
    /// Whether `socketDirectory` is a temporary directory this process made (removed at `stop`).
    let ownsSocketDirectory: Bool

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
            _ = try tool("initdb", ["-D", dir, "-U", "continuum", "--auth-local=trust", "--auth-host=reject",
                                    "-E", "UTF8", "--no-instructions"])
        }
        // A server already running on this directory (another continuum
        // process) is shared, not restarted; its port and socket directory
        // are in postmaster.pid.
        var chosen: Int, socketDirectory: String, ownsSocketDirectory = false, started = false
        if (try? tool("pg_ctl", ["-D", dir, "status"])) != nil, let running = try Self.runningServer(dir) {
            (chosen, socketDirectory) = running
        } else {
            chosen = port == 0 ? try Self.freePort() : port
            try Self.rejectHostTrust(hbaFile: dir + "/pg_hba.conf")
            if DatabaseURL.socketPath(directory: dir, port: chosen).utf8.count <= DatabaseURL.maxSocketPath {
                socketDirectory = dir
            } else {
                socketDirectory = try Self.makePrivateDirectory(runAs: runAs)
                ownsSocketDirectory = true
            }
            // pg_ctl hands -o to /bin/sh: listen_addresses='' is the empty list.
            let options = "-p \(chosen) -c listen_addresses='' -c unix_socket_directories='\(socketDirectory)'"
                + " -c unix_socket_permissions=0700"
            do {
                _ = try tool("pg_ctl", ["-D", dir, "-o", options, "-l", dir + "/server.log", "-w", "-t", "60", "start"])
            } catch {
                if ownsSocketDirectory { rmdir(socketDirectory) }
                throw error
            }
            started = true
        }
        // The database (initdb creates only postgres and the templates).
        do {
            _ = try tool("createdb", ["-h", socketDirectory, "-p", "\(chosen)", "-U", "continuum", "continuum"])
        } catch let e as Failure where e.description.contains("already exists") {}
        self.binaries = binaries
        self.runAs = runAs
        self.dataDirectory = dir
        self.socketDirectory = socketDirectory
        self.ownsSocketDirectory = ownsSocketDirectory
        self.port = chosen
        owned = started
    }

    /// postgres://continuum@/continuum?host=SOCKET_DIRECTORY&port=PORT
    public var url: String { url(database: database) }

    /// The URL of `database` on this server, through its Unix socket (libpq's form).
    public func url(database: String) -> String {
        let unreserved = CharacterSet(charactersIn: "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
        func encoded(_ s: String, _ allowed: CharacterSet) -> String { s.addingPercentEncoding(withAllowedCharacters: allowed) ?? s }
        return "postgres://\(encoded(user, unreserved))@/\(encoded(database, unreserved))"
            + "?host=\(encoded(socketDirectory, unreserved.union(CharacterSet(charactersIn: "/"))))&port=\(port)"
    }

    /// Stops the server if this process started it (fast shutdown: open sessions are ended).
    public func stop() {
        guard owned else { return }
        _ = try? Self.run(binaries: binaries, runAs: runAs, dataDirectory: dataDirectory, "pg_ctl", ["-D", dataDirectory, "stop", "-m", "fast", "-w"])
        if ownsSocketDirectory { rmdir(socketDirectory) }   // empty once the server is down
    }

    /// The port and socket directory of the server running on `directory`
    /// (postmaster.pid: line 4 the port, line 5 the first socket directory);
    /// nil when the file cannot be read.
    static func runningServer(_ directory: String) throws -> (port: Int, socketDirectory: String)? {
        guard let pid = try? String(contentsOfFile: directory + "/postmaster.pid", encoding: .utf8) else { return nil }
        let lines = pid.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        guard lines.count > 4, let port = Int(lines[3].trimmingCharacters(in: .whitespaces)) else { return nil }
        let socket = lines[4].trimmingCharacters(in: .whitespaces)
        guard !socket.isEmpty else {
            throw Failure(description: "the PostgreSQL running on \(directory) has no Unix socket: stop it (pg_ctl -D \(directory) stop)")
        }
        return (port, socket)
    }

    /// The authentication methods a pg_hba.conf line may name.
    static let hbaMethods: Set<Substring> = ["trust", "reject", "scram-sha-256", "md5", "password", "gss", "sspi",
                                             "ident", "peer", "ldap", "radius", "cert", "pam", "bsd"]

    /// `hba` with every host-type line (host, hostssl, hostnossl, hostgssenc,
    /// hostnogssenc) whose method is trust changed to reject; other lines,
    /// spacing and comments as they were. A line is TYPE DATABASE USER
    /// ADDRESS [MASK] METHOD [OPTIONS]: the method is the first field from
    /// the fifth on that names one.
    static func rejectingHostTrust(_ hba: String) -> String {
        hba.split(separator: "\n", omittingEmptySubsequences: false).map { line -> String in
            var fields: [Range<Substring.Index>] = [], i = line.startIndex
            while i < line.endIndex, line[i] != "#" {
                if line[i].isWhitespace { i = line.index(after: i); continue }
                let start = i
                var quoted = false
                while i < line.endIndex, quoted || !(line[i].isWhitespace || line[i] == "#") {
                    if line[i] == "\"" { quoted.toggle() }
                    i = line.index(after: i)
                }
                fields.append(start..<i)
            }
            guard fields.count >= 5, line[fields[0]].hasPrefix("host"),
                  let method = fields.dropFirst(4).first(where: { hbaMethods.contains(line[$0]) }),
                  line[method] == "trust" else { return String(line) }
            return String(line[..<method.lowerBound]) + "reject" + line[method.upperBound...]
        }.joined(separator: "\n")
    }

    /// Rewrites `hbaFile` with `rejectingHostTrust` when that changes it
    /// (a new file, same owner and mode, renamed over the old one).
    static func rejectHostTrust(hbaFile: String) throws {
        var st = stat()
        guard stat(hbaFile, &st) == 0, let data = FileManager.default.contents(atPath: hbaFile) else { return }
        let old = String(decoding: data, as: UTF8.self), new = rejectingHostTrust(old)
        guard new != old else { return }
        let temporary = hbaFile + ".continuum-new"
        guard FileManager.default.createFile(atPath: temporary, contents: Data(new.utf8),
                                             attributes: [.posixPermissions: Int(st.st_mode & 0o7777)]),
              chown(temporary, st.st_uid, st.st_gid) == 0, rename(temporary, hbaFile) == 0 else {
            unlink(temporary)
            throw Failure(description: "cannot rewrite \(hbaFile) to reject TCP connections: \(String(cString: strerror(errno)))")
        }
    }

    /// A new directory under /tmp, mode 0700, the server's user's (mkdtemp:
    /// a name nobody could have made in advance).
    static func makePrivateDirectory(runAs: String?) throws -> String {
        var template = Array("/tmp/continuum-pg-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) != nil }
        guard made else { throw Failure(description: "cannot make a directory under /tmp: \(String(cString: strerror(errno)))") }
        let path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        do {
            try ownForServer(path, runAs: runAs)
        } catch {
            rmdir(path)
            throw error
        }
        return path
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

    /// A TCP port on 127.0.0.1 nobody listens on now (the socket file's name
    /// is unique per port; a free TCP port is how it has always been chosen).
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
