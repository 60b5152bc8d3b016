// Metrics in the Prometheus text exposition format (version 0.0.4), served at
// GET /metrics: request counts and latency by route and status, tokens,
// generations in flight, learning jobs queued and their lag, cache hits.
import Foundation
import Store
import Synchronization

/// A monotonically increasing count.
final class Counter: Sendable {
    private let value = Mutex(0.0)
    func increment(by n: Int = 1) { value.withLock { $0 += Double(n) } }
    var current: Double { value.withLock { $0 } }
}

/// Observations in cumulative buckets, with their sum and count.
final class Histogram: Sendable {
    let bounds: [Double]
    /// Per bound, the observations at most that bound; their sum and count.
    private struct Buckets {
        var counts: [Int]
        var sum = 0.0
        var count = 0
    }
    private let buckets: Mutex<Buckets>

    init(bounds: [Double]) {
        self.bounds = bounds
        buckets = Mutex(Buckets(counts: [Int](repeating: 0, count: bounds.count)))
    }

    func observe(_ v: Double) {
        let bounds = self.bounds
        buckets.withLock { b in
            for (i, bound) in bounds.enumerated() where v <= bound { b.counts[i] += 1 }
            b.sum += v
            b.count += 1
        }
    }

    func render(name: String, labels: String = "") -> String {
        let b = buckets.withLock { $0 }
        let sep = labels.isEmpty ? "" : labels + ","
        var out = ""
        for (i, bound) in bounds.enumerated() { out += "\(name)_bucket{\(sep)le=\"\(bound)\"} \(b.counts[i])\n" }
        out += "\(name)_bucket{\(sep)le=\"+Inf\"} \(b.count)\n"
        out += "\(name)_sum\(labels.isEmpty ? "" : "{\(labels)}") \(b.sum)\n"
        out += "\(name)_count\(labels.isEmpty ? "" : "{\(labels)}") \(b.count)\n"
        return out
    }
}

/// The service's metrics.
final class Metrics: Sendable {
    static let latencyBounds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]

    /// Requests by route: count by status, and latency.
    private struct Routes {
        var requests: [String: [Int: Int]] = [:]
        var latency: [String: Histogram] = [:]
    }
    private let routes = Mutex(Routes())

    let promptTokens = Counter()
    let completionTokens = Counter()
    let jobsEnqueued = Counter()
    let jobsApplied = Counter()
    let tokensLearned = Counter()
    let learningFailures = Counter()
    let jobsFailed = Counter()
    let learningLag = Histogram(bounds: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300])
    /// A learning round, claim to commit; and its compute part (decode, learn, encode).
    let learningRound = Histogram(bounds: latencyBounds)
    let learningCompute = Histogram(bounds: latencyBounds)
    /// Drift audits run, those with a flag, and the policies' actions taken, by action.
    let auditsRun = Counter()
    let auditsFlagged = Counter()
    /// An audit's compute (the drift measurement), background and on demand.
    let auditSeconds = Histogram(bounds: latencyBounds)
    let policyActions: [Policy.Action: Counter] = [.warn: Counter(), .freeze: Counter(), .rollback: Counter()]
    /// Consolidations run by this replica by trigger ("demand": the on-demand
    /// endpoint), those that changed nothing, and their compute time.
    let consolidations: [String: Counter] = Dictionary(uniqueKeysWithValues: (ConsolidationTrigger.allCases.map(\.rawValue) + ["demand"])
        .map { ($0, Counter()) })
    let consolidationsUnchanged = Counter()
    let consolidationsEnqueued = Counter()
    let consolidationSeconds = Histogram(bounds: latencyBounds + [120, 300, 600])

    /// Counts a consolidation that ran (trigger nil: on demand).
    func consolidated(trigger: ConsolidationTrigger?, seconds: Double, changed: Bool) {
        consolidations[trigger?.rawValue ?? "demand"]?.increment()
        if !changed { consolidationsUnchanged.increment() }
        consolidationSeconds.observe(seconds)
    }

    func record(route: String, status: Int, seconds: Double) {
        let h = routes.withLock { r in
            r.requests[route, default: [:]][status, default: 0] += 1
            let h = r.latency[route] ?? Histogram(bounds: Self.latencyBounds)
            r.latency[route] = h
            return h
        }
        h.observe(seconds)
    }

    /// A sample of a value kept elsewhere: a gauge, or a counter (`counter`: it only increases).
    struct Sample {
        let name: String
        let help: String
        let value: Double
        var counter = false
    }

    /// The exposition text; `samples` are taken by the caller (queue depths, cache).
    func render(samples: [Sample]) -> String {
        var out = ""
        func header(_ name: String, _ type: String, _ help: String) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
        }
        let (requests, latency) = routes.withLock { ($0.requests, $0.latency) }
        header("continuum_http_requests_total", "counter", "HTTP requests by route and status.")
        for (route, byStatus) in requests.sorted(by: { $0.key < $1.key }) {
            for (status, n) in byStatus.sorted(by: { $0.key < $1.key }) {
                out += "continuum_http_requests_total{route=\"\(route)\",status=\"\(status)\"} \(n)\n"
            }
        }
        header("continuum_http_request_duration_seconds", "histogram", "HTTP request latency by route (to the response head).")
        for (route, h) in latency.sorted(by: { $0.key < $1.key }) {
            out += h.render(name: "continuum_http_request_duration_seconds", labels: "route=\"\(route)\"")
        }
        let counters: [(String, String, Counter)] = [
            ("continuum_prompt_tokens_total", "Prompt tokens processed.", promptTokens),
            ("continuum_completion_tokens_total", "Tokens generated.", completionTokens),
            ("continuum_learning_jobs_enqueued_total", "Learning jobs committed by this replica.", jobsEnqueued),
            ("continuum_learning_jobs_applied_total", "Learning jobs applied by this replica's workers.", jobsApplied),
            ("continuum_learned_tokens_total", "Learnable tokens applied by this replica's workers.", tokensLearned),
            ("continuum_learning_failures_total", "Learning rounds that failed and were retried.", learningFailures),
            ("continuum_learning_jobs_failed_total", "Learning jobs marked failed by this replica's workers (the user's stored memory cannot be read; not retried).", jobsFailed),
            ("continuum_audits_total", "Drift audits run by this replica (background and on demand).", auditsRun),
            ("continuum_consolidations_unchanged_total", "Consolidations that found nothing to consolidate (no version made).", consolidationsUnchanged),
            ("continuum_idle_consolidations_enqueued_total", "Consolidations of idle users this replica's sweep queued.", consolidationsEnqueued),
            ("continuum_audits_flagged_total", "Drift audits whose report crossed a policy.", auditsFlagged),
        ]
        for (name, help, c) in counters {
            header(name, "counter", help)
            out += "\(name) \(c.current)\n"
        }
        header("continuum_policy_actions_total", "counter", "Policy actions taken on flagged reports, by action.")
        for (action, c) in policyActions.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
            out += "continuum_policy_actions_total{action=\"\(action.rawValue)\"} \(c.current)\n"
        }
        header("continuum_consolidations_total", "counter", "Consolidations run by this replica, by trigger (demand: the on-demand endpoint).")
        for (trigger, c) in consolidations.sorted(by: { $0.key < $1.key }) {
            out += "continuum_consolidations_total{trigger=\"\(trigger)\"} \(c.current)\n"
        }
        header("continuum_consolidation_seconds", "histogram", "A consolidation's compute (distillation and encoding).")
        out += consolidationSeconds.render(name: "continuum_consolidation_seconds")
        header("continuum_audit_seconds", "histogram", "A drift audit's compute (the measurement of one memory version).")
        out += auditSeconds.render(name: "continuum_audit_seconds")
        header("continuum_learning_lag_seconds", "histogram", "From a learning job's commit to its application.")
        out += learningLag.render(name: "continuum_learning_lag_seconds")
        header("continuum_learning_round_seconds", "histogram", "A learning round of one user's jobs, claim to commit.")
        out += learningRound.render(name: "continuum_learning_round_seconds")
        header("continuum_learning_compute_seconds", "histogram", "A round's compute: decode the state, learn, encode the changes.")
        out += learningCompute.render(name: "continuum_learning_compute_seconds")
        for s in samples {
            header(s.name, s.counter ? "counter" : "gauge", s.help)
            out += "\(s.name) \(s.value)\n"
        }
        return out
    }
}
