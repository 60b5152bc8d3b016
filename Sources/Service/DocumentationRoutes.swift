// /openapi.yaml (the spec this server was generated from) and /docs (a
// self-contained page listing the operations, then the spec).
import Foundation
import Hummingbird

enum DocumentationRoutes {
    /// The spec as built into this binary.
    static let spec: String = {
        guard let url = Bundle.module.url(forResource: "openapi", withExtension: "yaml"),
              let text = try? String(contentsOf: url, encoding: .utf8) else { return "" }
        return text
    }()

    static func register(on router: Router<AppContext>) {
        router.get("/openapi.yaml") { _, _ in
            Response(status: .ok, headers: [.contentType: "application/yaml"], body: ResponseBody(byteBuffer: ByteBuffer(string: spec)))
        }
        router.get("/docs") { _, _ in
            Response(status: .ok, headers: [.contentType: "text/html; charset=utf-8"],
                     body: ResponseBody(byteBuffer: ByteBuffer(string: page())))
        }
    }

    /// The operations (method, path, summary) read from the spec's `paths`.
    static func operations() -> [(method: String, path: String, summary: String)] {
        var out: [(String, String, String)] = []
        var inPaths = false, path = "", method = ""
        for raw in spec.split(separator: "\n", omittingEmptySubsequences: false) {
            let line = String(raw)
            if line.hasPrefix("paths:") { inPaths = true; continue }
            if inPaths, !line.isEmpty, !line.hasPrefix(" ") { inPaths = false }
            guard inPaths else { continue }
            if line.hasPrefix("  /"), line.hasSuffix(":"), !line.hasPrefix("   ") {
                path = String(line.dropFirst(2).dropLast())
            } else if line.hasPrefix("    "), !line.hasPrefix("     "), line.hasSuffix(":") {
                method = String(line.dropFirst(4).dropLast()).uppercased()
            } else if line.hasPrefix("      summary:") {
                out.append((method, path, line.replacingOccurrences(of: "      summary:", with: "").trimmingCharacters(in: .whitespaces)))
            }
        }
        return out
    }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }

    static func page() -> String {
        let rows = operations().map { "<tr><td><code>\($0.method)</code></td><td><code>\(escape($0.path))</code></td><td>\(escape($0.summary))</td></tr>" }
        return """
            <!doctype html>
            <html lang="en"><head><meta charset="utf-8"><title>Continuum API</title>
            <style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
            table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:.3rem .6rem;text-align:left}
            pre{background:#f6f6f6;padding:1rem;overflow-x:auto}</style></head>
            <body><h1>Continuum API</h1>
            <p>Authenticate with <code>Authorization: Bearer &lt;API key&gt;</code>. The machine-readable spec is at
            <a href="/openapi.yaml">/openapi.yaml</a>.</p>
            <table><tr><th>method</th><th>path</th><th>summary</th></tr>
            \(rows.joined(separator: "\n"))
            </table>
            <h2>Specification</h2><pre>\(escape(spec))</pre></body></html>
            """
    }
}
