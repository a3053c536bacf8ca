"""Upstream health: active checks, the rise/fall monitor, the heartbeat protocol on asyncio."""
