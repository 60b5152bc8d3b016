// Signing in to the drift audit's HTML reports from a browser. The sign-in
// page takes an admin API key and exchanges it for a session: a random token
// in an HttpOnly, SameSite=Strict cookie (the browser's scripts cannot read
// it, other sites' requests do not carry it), kept by the store only as its
// hash, dying with its key and after session_hours. The cookie stands for the
// key only on the audit's read-only GET reports (Endpoints' `sessions`), so
// it can never change anything; everything else still needs the
// Authorization header.
import Foundation
import Hummingbird
import Store

struct SessionController {
    static let cookieName = "continuum_session"
    let configuration: ServiceConfiguration
    let keys: any TenantStore

    func register(on router: Router<AppContext>) {
        router.get("/signin") { _, _ in Self.html(Self.page(message: nil), status: .ok) }
        router.post("/signin") { request, _ in try await signIn(request) }
        router.post("/signout") { request, _ in try await signOut(request) }
    }

    func signIn(_ request: Request) async throws -> Response {
        let form = Self.form(String(buffer: try await request.body.collect(upTo: configuration.maxBodyBytes)))
        guard let key = form["key"]?.trimmingCharacters(in: .whitespacesAndNewlines), !key.isEmpty,
              let principal = try await keys.authenticate(key: key) else {
            return Self.html(Self.page(message: "That is not a valid API key."), status: .unauthorized)
        }
        guard principal.role.permits(.admin) else {
            return Self.html(Self.page(message: "The reports need an admin key; this is an app key."), status: .forbidden)
        }
        let seconds = configuration.sessionHours * 3600
        let token = try await keys.createSession(for: principal, seconds: seconds)
        var response = Response(status: .seeOther, headers: [.location: "/v1/audit?format=html"])
        response.setCookie(Cookie(name: Self.cookieName, value: token, maxAge: Int(seconds), path: "/",
                                  secure: configuration.sessionCookieSecure, httpOnly: true, sameSite: .strict))
        return response
    }

    func signOut(_ request: Request) async throws -> Response {
        if let token = request.cookies[Self.cookieName]?.value { try await keys.endSession(token: token) }
        var response = Response(status: .seeOther, headers: [.location: "/signin"])
        response.setCookie(Cookie(name: Self.cookieName, value: "", maxAge: 0, path: "/", secure: configuration.sessionCookieSecure,
                                  httpOnly: true, sameSite: .strict))
        return response
    }

    /// The fields of an `application/x-www-form-urlencoded` body (the last of repeated names).
    static func form(_ body: String) -> [String: String] {
        var out: [String: String] = [:]
        for pair in body.split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            func decode(_ s: Substring) -> String { s.replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? "" }
            out[decode(parts[0])] = parts.count > 1 ? decode(parts[1]) : ""
        }
        return out
    }

    static func html(_ text: String, status: HTTPResponse.Status) -> Response {
        Response(status: status, headers: [.contentType: "text/html; charset=utf-8", .cacheControl: "no-store"],
                 body: ResponseBody(byteBuffer: ByteBuffer(string: text)))
    }

    static func page(message: String?) -> String {
        """
        <!doctype html><html lang="en"><head><meta charset="utf-8"><title>Continuum: sign in</title>
        <style>body{font:14px system-ui,sans-serif;margin:4em auto;max-width:28em;color:#222}input{width:100%;padding:.4em;margin:.5em 0}
        .error{color:#b00}</style></head><body><h1>Drift audit</h1>
        <p>Sign in with an admin API key to read the drift reports in this browser.</p>
        \(message.map { "<p class=\"error\" id=\"error\">\(AuditPage.escape($0))</p>" } ?? "")
        <form method="post" action="/signin"><label for="key">API key</label>
        <input id="key" name="key" type="password" autocomplete="off" required>
        <button type="submit" id="submit">Sign in</button></form></body></html>
        """
    }
}
