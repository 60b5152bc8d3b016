// The test targets' one PostgreSQL fixture: a private cluster started from
// the system's binaries for this test process (StoreTests and ServiceTests
// share it). It depends on the store alone, so the store's tests link
// neither the model nor its kernels. A missing PostgreSQL fails the tests
// that need it, saying why; it is never skipped.
import Foundation
import Logging
import Store

public enum TestDatabase {
    /// One private PostgreSQL per test process, in a temporary directory
    /// (short enough that its Unix socket lives in it), removed at exit.
    public static let server: Result<LocalPostgres, Error> = Result {
        let pg = try LocalPostgres(dataDirectory: NSTemporaryDirectory() + "continuum-tests-\(getpid())")
        pg.stopAtExit(removingData: true)
        return pg
    }

    /// A fresh, empty (unmigrated) database on the shared server: each test its own.
    public static func make(logger: Logger = Logger(label: "continuum.store")) async throws -> Database {
        let pg = try server.get()
        let name = "t_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased()
        let admin = try Database(url: pg.url)
        try await admin.createDatabase(named: name)
        await admin.close()
        return try Database(url: pg.url(database: name), logger: logger)
    }
}
