"""Bytes on disk, addressed by digest. Knows nothing of registries over HTTP."""
