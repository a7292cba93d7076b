"""Benchmarks: connection rate and latency through Service addresses, and programming scale."""
