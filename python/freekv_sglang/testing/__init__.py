"""Helpers for tests, benchmarks and the demo: test models made without downloads, and a real
SGLang server on a loopback port. Not imported by the library itself."""
