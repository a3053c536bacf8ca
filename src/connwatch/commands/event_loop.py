"""The one way the commands run a coroutine: on uvloop when it is importable.

Shared by `run` (the primary), the worker processes it starts and `demo`, so that none of them
imports another command (or cli.py) for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["run_loop"]


def run_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `main` on uvloop when it is importable, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
