// continuum audit: the drift audit's reports as tables, from the database
// (the server computes them; GET /v1/audit and /v1/users/{user}/audit give
// the same as JSON, CSV and HTML).
import ArgumentParser
import Foundation
import Memory
import Store

struct Audit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print a tenant's users ranked by drift, or one user's drift over versions and recent audit events.")

    @OptionGroup var database: DatabaseOptions

    @Option(help: "The tenant's name.")
    var tenant: String

    @Option(help: "One user: their audited versions and recent events.")
    var user: String?

    @Option(help: ArgumentHelp("Rank by this metric: \(DriftMetric.allCases.map(\.rawValue).joined(separator: ", ")).",
                               valueName: "metric"))
    var metric = DriftMetric.klMean.rawValue

    func validate() throws {
        guard DriftMetric(rawValue: metric) != nil else {
            throw ValidationError("--metric must be one of \(DriftMetric.allCases.map(\.rawValue).joined(separator: ", "))")
        }
    }

    @Flag(help: "Only users whose latest report has flags.")
    var flagged = false

    @Option(help: "Only reports computed in the last N days.")
    var days: Double?

    @Option(help: "Most rows.")
    var limit = 50

    static let columns = ["kl_mean", "kl_max", "top1_agreement", "forgetting_ppl_ratio", "personalization_ppl_ratio", "param_norm"]

    static func metrics(_ json: String) -> [String: Any] {
        (try? JSONSerialization.jsonObject(with: Data(json.utf8))) as? [String: Any] ?? [:]
    }

    static func flags(_ json: String) -> String {
        ((try? JSONSerialization.jsonObject(with: Data(json.utf8))) as? [[String: Any]] ?? [])
            .compactMap { f in (f["metric"] as? String).map { "\($0)→\(f["action"] ?? "")" } }.joined(separator: ",")
    }

    static func cell(_ m: [String: Any], _ key: String) -> String {
        (m[key] as? NSNumber).map { String(format: "%.4g", $0.doubleValue) } ?? "-"
    }

    static func table(_ header: [String], _ rows: [[String]]) {
        let widths = header.indices.map { i in ([header[i]] + rows.map { $0[i] }).map(\.count).max()! }
        func line(_ r: [String]) -> String {
            r.enumerated().map { $1.padding(toLength: widths[$0], withPad: " ", startingAt: 0) }.joined(separator: "  ")
        }
        print(line(header))
        rows.forEach { print(line($0)) }
    }

    func run() async throws {
        try await withDatabase(database) { db in
            guard let t = try await db.tenant(named: tenant) else { throw CLIError("no tenant named '\(tenant)'") }
            if let name = user {
                let userName: UserName
                do { userName = try UserName(name) } catch { throw CLIError("\(error)") }
                guard let u = try await db.user(tenantID: t.id, name: userName) else { throw CLIError("no user '\(name)' in \(tenant)") }
                print("user \(u.name): version \(u.version), \(u.frozen ? "learning frozen" : "learning"), \(u.jobsApplied) jobs applied")
                Self.table(["version", "computed"] + Self.columns + ["flags"], try await db.driftReports(userID: u.id).map { r in
                    let m = Self.metrics(r.metrics)
                    return ["\(r.version)", ISO8601DateFormatter().string(from: r.computedAt)] + Self.columns.map { Self.cell(m, $0) }
                        + [Self.flags(r.flags)]
                })
                print("")
                Self.table(["time", "event", "from", "to", "actor", "cause"], try await db.auditEvents(userID: u.id, limit: limit).map { e in
                    [ISO8601DateFormatter().string(from: e.createdAt), e.event.rawValue, e.fromVersion.map(String.init) ?? "",
                     e.toVersion.map(String.init) ?? "", e.actor, e.causeID ?? ""]
                })
                return
            }
            let since = days.map { Date(timeIntervalSinceNow: -$0 * 86400) }
            let ranked: [RankedDrift]
            do {
                ranked = try await db.rankedDrift(tenantID: t.id, metric: metric, ascending: DriftMetric(rawValue: metric)?.lowIsDrift ?? false,
                                                  flaggedOnly: flagged, since: since, limit: limit)
            } catch let e as Database.Failure { throw ValidationError(e.description) }
            Self.table(["rank", "user", "version", "state"] + Self.columns + ["flags"], ranked.enumerated().map { i, r in
                let m = Self.metrics(r.report.metrics)
                return ["\(i + 1)", r.user, "\(r.report.version)", r.frozen ? "frozen" : "learning"] + Self.columns.map { Self.cell(m, $0) }
                    + [Self.flags(r.report.flags)]
            })
        }
    }
}
