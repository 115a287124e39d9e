"""Developer tooling: benchmarks, the demo, sample texts, the local broker."""
