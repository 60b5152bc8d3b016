// The store's errors that callers tell apart: a row a request names does not
// exist (404), one it would create exists (409), learning jobs that can never
// be applied by this server. Anything else (Database.Failure, PostgreSQL's
// errors) is a fault of the store's.

/// Thrown by a `learnNext` body when the user's jobs can never be applied by
/// this server (their stored memory cannot be read, e.g. it was made under
/// another level configuration or backbone): `learnNext` marks the jobs
/// `failed` with a `learning_failed` audit event instead of retrying them.
public struct JobsUnlearnable: Error, CustomStringConvertible {
    public let reason: String
    public init(reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// A row that a request names does not exist (→ 404).
public struct NotFound: Error, CustomStringConvertible {
    public let description: String
}

/// A row that a request would create exists already (→ 409).
public struct Conflict: Error, CustomStringConvertible {
    public let description: String
}
