// Database URLs: libpq's TCP and Unix-socket forms, and clear refusals.
import Testing
@testable import Store

@Suite("Database URLs")
struct DatabaseURLTests {
    @Test("socket URLs: the directory in the query or percent-encoded in the authority, port default 5432")
    func socketURLs() throws {
        #expect(try DatabaseURL("postgres://continuum@/t_1?host=/tmp/x&port=5433")
            == DatabaseURL(endpoint: .unixSocket(path: "/tmp/x/.s.PGSQL.5433"), username: "continuum", database: "t_1"))
        #expect(try DatabaseURL("postgresql://u@/db?host=%2Fvar%2Frun%2Fpostgresql")
            == DatabaseURL(endpoint: .unixSocket(path: "/var/run/postgresql/.s.PGSQL.5432"), username: "u", database: "db"))
        #expect(try DatabaseURL("postgresql://%2Fvar%2Frun%2Fpostgresql:6000/db")
            == DatabaseURL(endpoint: .unixSocket(path: "/var/run/postgresql/.s.PGSQL.6000"), username: "postgres", database: "db"))
        #expect(try DatabaseURL("postgres://h:1/db?host=/s/&user=bob&password=pw&dbname=other&sslmode=disable")
            == DatabaseURL(endpoint: .unixSocket(path: "/s/.s.PGSQL.1"), username: "bob", password: "pw", database: "other"))
    }

    @Test("TCP URLs as before: user, password, host, port, database; IPv6 in brackets; other parameters ignored")
    func tcpURLs() throws {
        #expect(try DatabaseURL("postgres://continuum:continuum-dev-password@postgres:5432/continuum")
            == DatabaseURL(endpoint: .tcp(host: "postgres", port: 5432), username: "continuum",
                           password: "continuum-dev-password", database: "continuum"))
        #expect(try DatabaseURL("postgresql://alice:s%40cret@db.example.com:6543/app?sslmode=prefer&application_name=x")
            == DatabaseURL(endpoint: .tcp(host: "db.example.com", port: 6543), username: "alice", password: "s@cret", database: "app"))
        #expect(try DatabaseURL("postgres://127.0.0.1/")
            == DatabaseURL(endpoint: .tcp(host: "127.0.0.1", port: 5432), username: "postgres"))
        #expect(try DatabaseURL("postgres://u@[::1]:5433/d")
            == DatabaseURL(endpoint: .tcp(host: "::1", port: 5433), username: "u", database: "d"))
    }

    @Test("malformed URLs are refused with a clear error that hides the password",
          arguments: ["mysql://u@h/db", "postgres://", "postgres:///db", "postgres://u@/db", "postgres://h:x/db",
                      "postgres://h:70000/db", "postgres://h:+5/db", "postgres://a,b/db", "postgres://h/db?host",
                      "postgres://h/db?host=relative/dir", "postgres://h/db?host=@abstract", "postgres://u@/db?hostaddr=1.2.3.4",
                      "postgres://u@/db?host=/" + String(repeating: "s", count: 100), "postgres://h/%zz", "postgres://[::1/db",
                      "postgres://u:secret@h:x/db", "postgres://u@h:x/db?password=secret"])
    func malformed(url: String) {
        let error = #expect(throws: Database.Failure.self) { _ = try Database(url: url) }
        #expect(error?.description.hasPrefix("not a PostgreSQL URL (") == true)
        #expect(error?.description.contains("secret") == false)
    }
}
