"""Clients and benchmarks for the MGM Triton server."""
