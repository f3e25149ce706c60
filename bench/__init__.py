"""Benchmark harness for the mirror: peers, link emulation and scenarios (`python -m bench`)."""
