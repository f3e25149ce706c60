"""What aiohttp does not do for us: the manifest fast path, sendfile bodies, shared headers."""
