"""Integration tests: the mirror between a real Distribution registry and real clients."""
