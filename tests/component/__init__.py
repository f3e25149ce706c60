"""Component tests: the real app (create_app) against an in-process fake registry."""
