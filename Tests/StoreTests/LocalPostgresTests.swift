// The private cluster is private: no TCP listener, a Unix socket in a 0700
// directory, host lines that reject; a second process shares it.
import Foundation
import StoreTestSupport
import Testing
@testable import Store

/// Whether a TCP connection to 127.0.0.1:`port` is accepted.
func tcpConnects(port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = UInt16(port).bigEndian
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    return withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
    }
}

/// The mode bits (rwx for owner, group, others) and owner of `path`.
func modeAndOwner(_ path: String) throws -> (mode: Int, owner: uid_t) {
    var st = stat()
    guard stat(path, &st) == 0 else { throw LocalPostgres.Failure(description: "cannot stat \(path)") }
    return (Int(st.st_mode & 0o777), st.st_uid)
}

/// The user id the server runs as (postgres when the tests run as root).
func serverUID() -> uid_t { geteuid() == 0 ? getpwnam("postgres").pointee.pw_uid : geteuid() }

@Suite("LocalPostgres")
struct LocalPostgresTests {
    @Test("the private cluster accepts no TCP connection; its socket is in a 0700 directory; host lines reject")
    func noTCP() async throws {
        let pg = try TestDatabase.server.get()
        #expect(!tcpConnects(port: pg.port))
        #expect(pg.socketDirectory == pg.dataDirectory)   // the scratch path is short enough
        let (mode, owner) = try modeAndOwner(pg.socketDirectory)
        #expect(mode == 0o700 && owner == serverUID())
        #expect(FileManager.default.fileExists(atPath: pg.socketDirectory + "/.s.PGSQL.\(pg.port)"))
        let db = try Database(url: pg.url)
        #expect(try await db.integer(unsafeSQL: "SELECT length(current_setting('listen_addresses'))") == 0)
        #expect(try await db.integer(unsafeSQL: """
            SELECT count(*) FROM pg_hba_file_rules WHERE type LIKE 'host%' AND auth_method <> 'reject'
            """) == 0)
        #expect(try await db.integer(unsafeSQL: "SELECT count(*) FROM pg_hba_file_rules WHERE type = 'local'") > 0)
        await db.close()
    }

    @Test("a Database over the socket URL migrates and answers; a second LocalPostgres shares the running server")
    func socketURL() async throws {
        let pg = try TestDatabase.server.get()
        #expect(try DatabaseURL(pg.url) == DatabaseURL(endpoint: .unixSocket(path: pg.socketDirectory + "/.s.PGSQL.\(pg.port)"),
                                                       username: "continuum", database: "continuum"))
        let name = "u_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased()
        let admin = try Database(url: pg.url)
        try await admin.createDatabase(named: name)
        await admin.close()
        let db = try Database(url: pg.url(database: name))
        try await db.migrate()
        #expect(try await db.isMigrated())
        #expect(try await db.currentDatabase() == name)
        _ = try await db.createTenant(name: "acme")
        #expect(try await db.tenants().map(\.name) == ["acme"])
        await db.close()

        let shared = try LocalPostgres(dataDirectory: pg.dataDirectory)
        #expect(!shared.owned && shared.port == pg.port && shared.socketDirectory == pg.socketDirectory)
        shared.stop()   // not its server: nothing happens
        let again = try Database(url: shared.url)
        try await again.ping()
        await again.close()
    }

    @Test("an older build's cluster (trust on 127.0.0.1) in a deep directory: started socket-only in a private /tmp directory")
    func legacyDeepCluster() async throws {
        let dir = NSTemporaryDirectory() + "continuum-store-legacy-\(getpid())/" + String(repeating: "d", count: 90)
        defer { try? FileManager.default.removeItem(atPath: NSTemporaryDirectory() + "continuum-store-legacy-\(getpid())") }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let runAs = geteuid() == 0 ? "postgres" : nil
        try LocalPostgres.ownForServer(dir, runAs: runAs)
        _ = try LocalPostgres.run(binaries: try LocalPostgres.findBinaries(), runAs: runAs, dataDirectory: dir, "initdb",
                                  ["-D", dir, "-U", "continuum", "--auth=trust", "-E", "UTF8", "--no-instructions"])
        let before = try String(contentsOfFile: dir + "/pg_hba.conf", encoding: .utf8)
        #expect(before.contains("127.0.0.1/32            trust"))
        let hbaBefore = try modeAndOwner(dir + "/pg_hba.conf")

        let pg = try LocalPostgres(dataDirectory: dir)
        defer { pg.stop() }
        #expect(pg.owned)
        #expect(pg.socketDirectory.hasPrefix("/tmp/continuum-pg-"))
        let (mode, owner) = try modeAndOwner(pg.socketDirectory)
        #expect(mode == 0o700 && owner == serverUID())
        #expect(!tcpConnects(port: pg.port))
        let after = try String(contentsOfFile: dir + "/pg_hba.conf", encoding: .utf8)
        #expect(!after.contains("127.0.0.1/32            trust") && after.contains("127.0.0.1/32            reject"))
        #expect(try modeAndOwner(dir + "/pg_hba.conf") == hbaBefore)
        let db = try Database(url: pg.url)
        #expect(try await db.integer(unsafeSQL: """
            SELECT count(*) FROM pg_hba_file_rules WHERE type LIKE 'host%' AND auth_method <> 'reject'
            """) == 0)
        await db.close()
        let shared = try LocalPostgres(dataDirectory: dir)   // finds the /tmp socket from postmaster.pid
        #expect(!shared.owned && shared.socketDirectory == pg.socketDirectory)
        pg.stop()
        #expect(!FileManager.default.fileExists(atPath: pg.socketDirectory))
    }

    @Test("pg_hba.conf: host-type trust lines become reject; local lines, other methods and comments stay")
    func hbaRewrite() {
        let hba = """
            # TYPE  DATABASE        USER            ADDRESS                 METHOD
            local   all             all                                     trust
            host    all             all             127.0.0.1/32            trust
            hostssl all             all             ::1/128                 trust   # ipv6
            host    replication     all             10.0.0.1 255.255.255.255 trust
            hostnossl "trust"       all             samehost                md5
            host    all             all             0.0.0.0/0               scram-sha-256
            #host   all             all             127.0.0.1/32            trust

            """
        let expected = """
            # TYPE  DATABASE        USER            ADDRESS                 METHOD
            local   all             all                                     trust
            host    all             all             127.0.0.1/32            reject
            hostssl all             all             ::1/128                 reject   # ipv6
            host    replication     all             10.0.0.1 255.255.255.255 reject
            hostnossl "trust"       all             samehost                md5
            host    all             all             0.0.0.0/0               scram-sha-256
            #host   all             all             127.0.0.1/32            trust

            """
        #expect(LocalPostgres.rejectingHostTrust(hba) == expected)
        #expect(LocalPostgres.rejectingHostTrust(expected) == expected)
    }
}
