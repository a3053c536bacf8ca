"""Start pproxy as it intends (on uvloop), under uvloop 0.23.

pproxy 2.7.9 calls `uvloop.install()` and then `asyncio.get_event_loop()`, which uvloop 0.23's
policy no longer answers without a loop set, so pproxy dies at start. This shim makes
`install()` also set a fresh uvloop loop, then runs pproxy's own `main()` unchanged; without
uvloop it runs pproxy as is. Usage: python bench/pproxy_uvloop.py <pproxy args>.
"""

from __future__ import annotations

import asyncio
import importlib
import sys


def patch_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    original = uvloop.install

    def install() -> None:
        original()
        asyncio.set_event_loop(uvloop.new_event_loop())

    uvloop.install = install


def main() -> int:
    patch_uvloop()
    # Imported by name: pproxy ships no type information.
    importlib.import_module("pproxy.server").main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
