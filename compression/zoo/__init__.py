"""Small fixture models with committed weights, for tests and benchmarks."""
