"""Benchmarks: ``python -m bench NAME [args]``; each prints one JSON object."""
