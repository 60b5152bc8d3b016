// The drift audit as HTML pages: charts of drift over versions drawn
// server-side as inline SVG (no scripts, no external assets).
import Foundation
import Memory
import Store

enum AuditPage {
    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
    }

    static func page(_ title: String, _ body: String) -> String {
        """
        <!doctype html><html lang="en"><head><meta charset="utf-8"><title>\(escape(title))</title>
        <style>body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
        td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}
        .flag{color:#b00;font-weight:600}.charts{display:flex;flex-wrap:wrap;gap:1em}svg{background:#fafafa;border:1px solid #ddd}</style>
        .nav{display:flex;gap:1em;align-items:center}.nav form{margin:0}
        </head><body><div class="nav"><a href="/v1/audit?format=html">all users</a>
        <form method="post" action="/signout"><button type="submit">sign out</button></form></div>
        <h1>\(escape(title))</h1>\(body)</body></html>
        """
    }

    /// A user id as one percent-encoded path segment (everything but RFC 3986's unreserved characters encoded).
    static func pathSegment(_ s: String) -> String {
        let unreserved = CharacterSet(charactersIn: "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
        return s.addingPercentEncoding(withAllowedCharacters: unreserved) ?? ""
    }

    /// A metric to draw or print: none when not measured or not finite.
    static func number(_ metrics: Components.Schemas.DriftMetrics, _ metric: DriftMetric) -> Double? {
        metrics.value(metric).flatMap { $0.isFinite ? $0 : nil }
    }

    static func format(_ v: Double?) -> String { v.map { String(format: "%.4g", $0) } ?? "–" }

    /// A line chart of (version, value) points, with its axes' ranges labelled.
    static func chart(_ title: String, _ points: [(Double, Double)], threshold: Double? = nil) -> String {
        let w = 360.0, h = 180.0, pad = 36.0
        guard !points.isEmpty else { return "" }
        let xs = points.map(\.0), ys = points.map(\.1) + (threshold.map { [$0] } ?? [])
        let x0 = xs.min()!, x1 = max(xs.max()!, x0 + 1), y0 = min(0, ys.min()!), y1 = max(ys.max()!, y0 + 1e-9)
        func px(_ x: Double) -> Double { pad + (x - x0) / (x1 - x0) * (w - 2 * pad) }
        func py(_ y: Double) -> Double { h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad) }
        let path = points.map { String(format: "%.1f,%.1f", px($0.0), py($0.1)) }.joined(separator: " ")
        var svg = "<svg width=\"\(Int(w))\" height=\"\(Int(h))\" viewBox=\"0 0 \(Int(w)) \(Int(h))\" role=\"img\">"
        svg += "<title>\(escape(title))</title>"
        svg += "<text x=\"\(Int(pad))\" y=\"16\" font-size=\"12\">\(escape(title))</text>"
        svg += String(format: "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"#999\"/>", pad, h - pad, w - pad, h - pad)
        svg += String(format: "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"#999\"/>", pad, pad, pad, h - pad)
        svg += "<text x=\"2\" y=\"\(Int(py(y1)) + 4)\" font-size=\"10\">\(format(y1))</text>"
        svg += "<text x=\"2\" y=\"\(Int(py(y0)) + 4)\" font-size=\"10\">\(format(y0))</text>"
        svg += "<text x=\"\(Int(pad))\" y=\"\(Int(h) - 8)\" font-size=\"10\">v\(Int(x0))</text>"
        svg += "<text x=\"\(Int(w - pad) - 20)\" y=\"\(Int(h) - 8)\" font-size=\"10\">v\(Int(x1))</text>"
        if let t = threshold {
            svg += String(format: "<line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.0f\" y2=\"%.1f\" stroke=\"#b00\" stroke-dasharray=\"4 3\"/>",
                          pad, py(t), w - pad, py(t))
        }
        svg += "<polyline fill=\"none\" stroke=\"#2563eb\" stroke-width=\"2\" points=\"\(path)\"/>"
        for p in points { svg += String(format: "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"2.5\" fill=\"#2563eb\"/>", px(p.0), py(p.1)) }
        return svg + "</svg>"
    }

    static let charted: [(DriftMetric, String)] = [
        (.klMean, "KL(user ‖ backbone), mean"), (.top1Agreement, "top-1 agreement"),
        (.forgettingPPLRatio, "forgetting: reference ppl ratio"), (.personalizationPPLRatio, "personalisation: own-text ppl ratio"),
        (.paramNorm, "parameter norm"), (.paramChange, "change since previous version"),
    ]

    static func user(name: String, frozen: Bool, version: Int64, reports: [Components.Schemas.AuditVersion], events: [AuditEvent]) -> String {
        var body = "<p>Current version \(version)\(frozen ? " — <span class=\"flag\">learning frozen</span>" : ""); "
        body += "\(reports.count) audited versions.</p><div class=\"charts\">"
        for (metric, title) in charted {
            let points = reports.compactMap { r in number(r.metrics, metric).map { (Double(r.version), $0) } }
            let threshold = reports.last?.flags.first { $0.metric == metric.rawValue }.flatMap { $0.max ?? $0.min }
            body += chart(title, points, threshold: threshold)
        }
        body += "</div><h2>Versions</h2><table><tr><th>version</th><th>computed</th><th class=\"l\">flags</th>"
        body += charted.map { "<th>\(escape($0.0.rawValue))</th>" }.joined() + "</tr>"
        for r in reports.reversed() {
            let f = r.flagged.joined(separator: ", ")
            body += "<tr><td>\(r.version)</td><td>\(AuditController.iso(r.computedAt))</td><td class=\"l flag\">\(escape(f))</td>"
            body += charted.map { "<td>\(format(number(r.metrics, $0.0)))</td>" }.joined() + "</tr>"
        }
        body += "</table><h2>Recent events</h2><table><tr><th>time</th><th class=\"l\">event</th><th>from</th><th>to</th>"
        body += "<th class=\"l\">actor</th><th class=\"l\">cause</th></tr>"
        for e in events.reversed() {
            body += "<tr><td>\(AuditController.iso(e.createdAt))</td><td class=\"l\">\(escape(e.event.rawValue))</td>"
            body += "<td>\(e.fromVersion.map(String.init) ?? "")</td><td>\(e.toVersion.map(String.init) ?? "")</td>"
            body += "<td class=\"l\">\(escape(e.actor))</td><td class=\"l\">\(escape(e.causeID ?? ""))</td></tr>"
        }
        return page("Drift audit: \(name)", body + "</table>")
    }

    static func tenant(metric: DriftMetric, ranked: [Components.Schemas.RankedUser]) -> String {
        let top = ranked.compactMap { number($0.metrics, metric) }.max() ?? 1
        var body = "<p>Users ranked by their latest audited version's \(escape(metric.rawValue)).</p>"
        body += "<table><tr><th>rank</th><th class=\"l\">user</th><th>version</th><th class=\"l\">\(escape(metric.rawValue))</th>"
        body += "<th class=\"l\">flags</th><th class=\"l\">state</th></tr>"
        for r in ranked {
            let v = number(r.metrics, metric)
            let bar = v.map { String(format: "<svg width=\"120\" height=\"10\"><rect width=\"%.1f\" height=\"10\" fill=\"#2563eb\"/></svg> ",
                                     top > 0 ? 120 * max(0, $0) / top : 0) } ?? ""
            let flags = r.flags.map(\.metric).joined(separator: ", ")
            let href = "/v1/users/\(pathSegment(r.user))/audit?format=html"
            body += "<tr><td>\(r.rank)</td><td class=\"l\"><a href=\"\(escape(href))\">\(escape(r.user))</a></td><td>\(r.version)</td>"
            body += "<td class=\"l\">\(bar)\(format(v))</td><td class=\"l flag\">\(escape(flags))</td>"
            body += "<td class=\"l\">\(r.frozen ? "frozen" : "learning")</td></tr>"
        }
        return page("Drift audit: users by \(metric.rawValue)", body + "</table>")
    }
}
