//! Criterion micro-benchmarks of the engine hot paths live in `benches/`.
