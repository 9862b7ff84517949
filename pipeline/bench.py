"""Benchmarks (placeholder until written)."""
