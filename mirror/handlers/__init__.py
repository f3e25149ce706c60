"""aiohttp glue: parse the request, call one service, build the response."""
