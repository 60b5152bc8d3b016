// RawHTTP: HTTP/1.1 over a plain socket, for requests the test client cannot
// make: a Content-Length the body never fills, a chunked body, a client that
// stops reading. Blocking POSIX calls, run off the cooperative pool.
import Foundation
#if canImport(Glibc)
import Glibc
#endif

struct RawHTTP {
    struct Failure: Error, CustomStringConvertible { let description: String }

    /// What came back: the status, the headers (lower-cased names) and the body bytes read.
    struct Reply {
        let status: Int
        let headers: [String: String]
        let body: Data
    }

    let fd: Int32

    /// Connects to 127.0.0.1:`port`; `receiveBuffer` sets SO_RCVBUF first (a small one makes the server's writes block).
    init(port: Int, receiveBuffer: Int32? = nil) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket() failed") }
        if var size = receiveBuffer {
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        }
        var timeout = timeval(tv_sec: 60, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
        guard ok else { close(fd); throw Failure(description: "connect to port \(port) failed") }
        self.fd = fd
    }

    func send(_ bytes: [UInt8]) throws {
        var sent = 0
        while sent < bytes.count {
            let n = bytes[sent...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { throw Failure(description: "send failed after \(sent) bytes (errno \(errno))") }
            sent += n
        }
    }

    func send(_ text: String) throws { try send(Array(text.utf8)) }

    /// Reads until the headers and `Content-Length` bytes of body arrived, or the peer closed.
    func reply() throws -> Reply {
        var data = Data(), buffer = [UInt8](repeating: 0, count: 65536)
        var headerEnd: Range<Data.Index>?
        var wanted: Int?
        while true {
            if let end = headerEnd, let wanted, data.count - end.upperBound >= wanted { break }
            let n = recv(fd, &buffer, buffer.count, 0)
            if n <= 0 { break }
            data.append(contentsOf: buffer[0..<n])
            if headerEnd == nil, let r = data.range(of: Data("\r\n\r\n".utf8)) {
                headerEnd = r
                let head = String(decoding: data[..<r.lowerBound], as: UTF8.self)
                wanted = head.split(separator: "\r\n").first { $0.lowercased().hasPrefix("content-length:") }
                    .flatMap { Int($0.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) }
            }
        }
        guard let end = headerEnd else { throw Failure(description: "no response head (\(data.count) bytes)") }
        let lines = String(decoding: data[..<end.lowerBound], as: UTF8.self).split(separator: "\r\n")
        guard let first = lines.first, let status = Int(first.split(separator: " ").dropFirst().first ?? "") else {
            throw Failure(description: "bad status line")
        }
        var headers: [String: String] = [:]
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return Reply(status: status, headers: headers, body: Data(data[end.upperBound...]))
    }

    /// Reads until the end of the response head; returns the status (the body is left unread).
    func headStatus() throws -> Int {
        var data = Data(), byte = [UInt8](repeating: 0, count: 1)
        while data.range(of: Data("\r\n\r\n".utf8)) == nil {
            guard recv(fd, &byte, 1, 0) == 1 else { throw Failure(description: "connection ended before the response head") }
            data.append(byte[0])
        }
        let line = String(decoding: data, as: UTF8.self).split(separator: "\r\n").first ?? ""
        guard let status = Int(line.split(separator: " ").dropFirst().first ?? "") else { throw Failure(description: "bad status line") }
        return status
    }

    /// Whether the peer has closed the connection (a read returns 0 or fails) within `seconds`.
    func closedByPeer(within seconds: Int) -> Bool {
        var timeout = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var buffer = [UInt8](repeating: 0, count: 65536)
        let start = Date()
        while Date().timeIntervalSince(start) < Double(seconds) {
            let n = recv(fd, &buffer, buffer.count, 0)
            if n == 0 { return true }
            if n < 0 { return errno == ECONNRESET }
        }
        return false
    }

    func shutdown() { close(fd) }

    /// Runs blocking socket work off Swift concurrency's threads.
    static func run<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { c in
            Thread.detachNewThread { c.resume(with: Result { try work() }) }
        }
    }
}
