"""Developer tools that are not benchmarks and not tests (run as scripts from the repository root)."""
