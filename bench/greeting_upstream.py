"""An upstream that speaks first, as MySQL or SMTP do: `delay` seconds after accept it sends a
banner line, then echoes. Standalone (stdlib, uvloop if importable) so the harness runs it as its
own process: `python bench/greeting_upstream.py --port P [--delay 0.05]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

BANNER = b"220 bench greeter ready\r\n"


async def serve(port: int, delay: float) -> None:
    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            await asyncio.sleep(delay)
            writer.write(BANNER)
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(one, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.05)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, args.delay))
    else:
        uvloop.run(serve(args.port, args.delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
