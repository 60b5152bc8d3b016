// DatabaseURL: a libpq-style connection URI, parsed into what PostgresClient
// needs. Accepted:
//   postgres[ql]://[user[:password]@]host[:port][/database][?param=value&…]
//   postgres[ql]://[user@]/database?host=/socket/dir[&port=N]
//   postgres[ql]://[user@]%2Fsocket%2Fdir[:port]/database
// As in libpq, a host that begins with "/" is the directory of a Unix-domain
// socket (the socket file is <dir>/.s.PGSQL.<port>), parameters in the query
// (host, port, user, password, dbname) override the authority's, and
// components are percent-decoded. Not accepted: several hosts, abstract
// sockets (host "@…"), relative socket directories. Other libpq parameters
// are ignored (sslmode too: TLS stays disabled, as it always was here).
import Foundation

struct DatabaseURL: Equatable, Sendable {
    enum Endpoint: Equatable, Sendable {
        case tcp(host: String, port: Int)
        /// The socket file itself: <directory>/.s.PGSQL.<port>.
        case unixSocket(path: String)
    }

    var endpoint: Endpoint
    var username: String
    var password: String?
    /// nil: the server's default (the user's name).
    var database: String?

    /// The longest socket path a sockaddr_un holds (sun_path is 108 bytes with its NUL).
    static let maxSocketPath = 107

    /// The socket file of a server whose socket directory is `directory` and port `port`.
    static func socketPath(directory: String, port: Int) -> String {
        (directory.hasSuffix("/") ? String(directory.dropLast()) : directory) + "/.s.PGSQL.\(port)"
    }

    init(endpoint: Endpoint, username: String, password: String? = nil, database: String? = nil) {
        self.endpoint = endpoint
        self.username = username
        self.password = password
        self.database = database
    }

    init(_ url: String) throws {
        func fail(_ why: String) -> Database.Failure {
            Database.Failure(description: "not a PostgreSQL URL (\(why)): \(Self.redacted(url)); expected "
                + "postgres://user[:password]@host[:port]/database or postgres://user@/database?host=/socket/dir&port=N")
        }
        func decoded(_ s: Substring, _ what: String) throws -> String {
            guard let d = String(s).removingPercentEncoding else { throw fail("bad percent-encoding in the \(what)") }
            return d
        }
        var rest: Substring
        if url.hasPrefix("postgres://") {
            rest = url.dropFirst("postgres://".count)
        } else if url.hasPrefix("postgresql://") {
            rest = url.dropFirst("postgresql://".count)
        } else {
            throw fail("the scheme is not postgres:// or postgresql://")
        }
        var query: Substring = ""
        if let q = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: q)...]
            rest = rest[..<q]
        }
        var path: Substring = ""
        if let slash = rest.firstIndex(of: "/") {
            path = rest[rest.index(after: slash)...]
            rest = rest[..<slash]
        }
        var user: String?, password: String?, host: String?, port: String?
        var database: String? = path.isEmpty ? nil : try decoded(path, "database name")
        // Authority: [user[:password]@]host[:port]
        var hostPort = rest
        if let at = rest.lastIndex(of: "@") {
            let info = rest[..<at]
            hostPort = rest[rest.index(after: at)...]
            if let colon = info.firstIndex(of: ":") {
                user = try decoded(info[..<colon], "user name")
                password = try decoded(info[info.index(after: colon)...], "password")
            } else {
                user = try decoded(info, "user name")
            }
        }
        if hostPort.contains(",") { throw fail("several hosts are not supported") }
        if hostPort.hasPrefix("[") {
            guard let close = hostPort.firstIndex(of: "]") else { throw fail("an IPv6 address without its closing ]") }
            host = String(hostPort[hostPort.index(after: hostPort.startIndex)..<close])
            let after = hostPort[hostPort.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw fail("text after the IPv6 address") }
                port = String(after.dropFirst())
            }
        } else if let colon = hostPort.lastIndex(of: ":") {
            host = try decoded(hostPort[..<colon], "host")
            port = String(hostPort[hostPort.index(after: colon)...])
        } else if !hostPort.isEmpty {
            host = try decoded(hostPort, "host")
        }
        // Query parameters override the authority.
        for pair in query.split(separator: "&", omittingEmptySubsequences: true) {
            guard let eq = pair.firstIndex(of: "=") else { throw fail("query parameter '\(pair)' has no value") }
            let key = try decoded(pair[..<eq], "query"), value = try decoded(pair[pair.index(after: eq)...], "query")
            switch key {
            case "host": host = value
            case "hostaddr": throw fail("hostaddr is not supported: give host")
            case "port": port = value
            case "user": user = value
            case "password": password = value
            case "dbname": database = value
            default: break   // sslmode, application_name, connect_timeout, …: not used (TLS stays disabled)
            }
        }
        var portNumber = 5432
        if let port, !port.isEmpty {
            guard port.allSatisfy({ $0.isASCII && $0.isNumber }), let p = Int(port), (1...65535).contains(p) else {
                throw fail("the port '\(port)' is not a number from 1 to 65535")
            }
            portNumber = p
        }
        guard let host, !host.isEmpty else {
            throw fail("no host: give host[:port], or a socket directory as ?host=/dir")
        }
        if host.contains(",") { throw fail("several hosts are not supported") }
        if host.hasPrefix("/") {
            let socket = Self.socketPath(directory: host, port: portNumber)
            guard socket.utf8.count <= Self.maxSocketPath else {
                throw fail("the socket path \(socket) is longer than \(Self.maxSocketPath) bytes")
            }
            endpoint = .unixSocket(path: socket)
        } else if host.hasPrefix("@") {
            throw fail("abstract Unix sockets are not supported")
        } else if host.contains("/") {
            throw fail("a socket directory must be an absolute path: \(host)")
        } else {
            endpoint = .tcp(host: host, port: portNumber)
        }
        self.username = user.flatMap { $0.isEmpty ? nil : $0 } ?? "postgres"
        self.password = password
        self.database = database.flatMap { $0.isEmpty ? nil : $0 }
    }

    /// `url` with a password replaced by ***, for error messages.
    static func redacted(_ url: String) -> String {
        guard let scheme = url.range(of: "://") else { return url }
        let afterScheme = url[scheme.upperBound...]
        let authorityEnd = afterScheme.firstIndex { $0 == "/" || $0 == "?" } ?? afterScheme.endIndex
        var out = String(url[..<scheme.upperBound])
        let authority = afterScheme[..<authorityEnd]
        if let at = authority.lastIndex(of: "@"), let colon = authority[..<at].firstIndex(of: ":") {
            out += authority[..<colon] + ":***" + authority[at...]
        } else {
            out += authority
        }
        var tail = String(afterScheme[authorityEnd...])
        if let q = tail.firstIndex(of: "?") {
            let params = tail[tail.index(after: q)...].split(separator: "&", omittingEmptySubsequences: false).map {
                $0.hasPrefix("password=") ? "password=***" : String($0)
            }
            tail = tail[...q] + params.joined(separator: "&")
        }
        return out + tail
    }
}
