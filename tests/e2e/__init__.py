"""End-to-end tests: real servers on real ports, driven by real clients (the SDK, grpcurl,
the CLI)."""
