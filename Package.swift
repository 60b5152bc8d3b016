// swift-tools-version:6.0
// Continuum: a model server in which every user's model keeps learning.
import PackageDescription

/// Compute targets are compiled optimised even in debug builds, so `swift test`
/// and `swift build` run the maths at full speed. The C kernels pick their
/// AVX2/FMA/F16C path at run time, so the binary stays portable.
let computeSettings: [SwiftSetting] = [.unsafeFlags(["-O"])]

let package = Package(
    name: "Continuum",
    platforms: [.macOS(.v14)],
    // Only the executable: the compute targets use unsafeFlags, which SwiftPM
    // refuses in another package's dependencies, so no library is offered.
    products: [
        .executable(name: "continuum", targets: ["continuum"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/vapor/postgres-nio", from: "1.33.2"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/apple/swift-openapi-generator", from: "1.14.3"),
        .package(url: "https://github.com/apple/swift-openapi-runtime", from: "1.13.4"),
        .package(url: "https://github.com/hummingbird-project/swift-openapi-hummingbird", from: "2.1.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
    ],
    targets: [
        .systemLibrary(name: "CBLAS", path: "Sources/CBLAS"),
        .target(name: "CKernels", cSettings: [.unsafeFlags(["-O3", "-fno-math-errno"])]),
        .target(name: "Tensor", dependencies: ["CBLAS", "CKernels"], swiftSettings: computeSettings),
        // SHA-256 on its own, so the store hashes keys without linking the model and its kernels.
        .target(name: "Digest", swiftSettings: computeSettings),
        .target(name: "Model", dependencies: ["Tensor", "Digest"], swiftSettings: computeSettings),
        // Memory reads level configurations from YAML; only it imports Yams.
        .target(name: "Memory", dependencies: ["Model", "Tensor", "Digest", .product(name: "Yams", package: "Yams")],
                swiftSettings: computeSettings),
        // The store: PostgreSQL through PostgresNIO (only it imports PostgresNIO). It keeps bytes and
        // never decodes them, so it needs neither the model nor the memory levels.
        .target(name: "Store", dependencies: ["Digest", .product(name: "PostgresNIO", package: "postgres-nio"),
                                              .product(name: "Logging", package: "swift-log")],
                resources: [.copy("Migrations")]),
        // The HTTP service: Hummingbird 2 and the server generated from openapi.yaml
        // (only it imports Hummingbird, its service lifecycle and the OpenAPI runtime).
        .target(
            name: "Service",
            dependencies: [
                "Store", "Memory", "Model", "Tensor",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "OpenAPIRuntime", package: "swift-openapi-runtime"),
                .product(name: "OpenAPIHummingbird", package: "swift-openapi-hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
            ],
            resources: [.copy("openapi.yaml"), .copy("Audit")],
            plugins: [.plugin(name: "OpenAPIGenerator", package: "swift-openapi-generator")]
        ),
        .executableTarget(
            name: "continuum",
            dependencies: ["Service", "Store", "Memory", "Model", "Tensor", .product(name: "ArgumentParser", package: "swift-argument-parser"),
                           .product(name: "Logging", package: "swift-log")]
        ),
        // Shared by the test targets that run a model: the one loader of the tiny Llama and the backbone, fixture paths, gradient checks.
        .target(name: "TestSupport", dependencies: ["Model", "Tensor"], path: "Tests/TestSupport"),
        // The one PostgreSQL fixture (a private cluster per test process) for StoreTests and ServiceTests;
        // it needs only the store, so StoreTests link neither the model nor its kernels.
        .target(name: "StoreTestSupport", dependencies: ["Store", .product(name: "Logging", package: "swift-log")],
                path: "Tests/StoreTestSupport"),
        .testTarget(name: "TensorTests", dependencies: ["Tensor", "CKernels", "TestSupport"], swiftSettings: computeSettings),
        .testTarget(
            name: "ModelTests", dependencies: ["Model", "Tensor", "Digest", "TestSupport"],
            exclude: ["Fixtures"], swiftSettings: computeSettings
        ),
        .testTarget(name: "StoreTests", dependencies: ["Store", "StoreTestSupport"]),
        .testTarget(name: "ServiceTests", dependencies: [
            "Service", "Store", "Memory", "Model", "Tensor", "TestSupport", "StoreTestSupport",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "HummingbirdTesting", package: "hummingbird"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "HTTPTypes", package: "swift-http-types"),
            // Reads openapi.yaml to check the endpoint table against it.
            .product(name: "Yams", package: "Yams"),
        ]),
        .testTarget(name: "MemoryTests", dependencies: ["Memory", "Model", "Tensor", "TestSupport"], exclude: ["Fixtures"],
                    swiftSettings: computeSettings),
    ]
)
