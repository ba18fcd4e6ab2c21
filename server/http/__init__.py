"""The HTTP layer: aiohttp routes, SSE, auth, access log and metrics around the API layer."""
