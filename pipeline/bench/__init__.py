"""Benchmarks and simulations: tooling above everything, never imported by the layers below."""
