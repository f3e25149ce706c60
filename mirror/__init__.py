"""mirror: a regional OCI registry mirror (read-only pull-through cache)."""

__version__ = "0.1.0"
