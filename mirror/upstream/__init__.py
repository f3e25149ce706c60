"""Talking to origin registries: HTTP, auth challenges, tokens, resilience. Never touches disk."""
