"""The heartbeat protocol (SPEC section 7), the public face for services that want to speak it.

The frame codec lives in `connwatch.wire.heartbeat_frame` (pure, no I/O) and the asyncio pieces in
`connwatch.health.heartbeat_io`; this module re-exports both so that `import connwatch.heartbeat`
stays the one name to remember. Nothing inside connwatch imports this module.
"""

from __future__ import annotations

from connwatch.health.heartbeat_io import (
    PongResponder,
    ProtocolErrorCallback,
    close_writer,
    exchange,
    start_responder,
)
from connwatch.wire.heartbeat_frame import (
    FRAME_SIZE,
    MAGIC,
    VERSION,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    decode,
    encode,
    now_ms,
    ping,
    pong_for,
)

__all__ = [
    "FRAME_SIZE",
    "MAGIC",
    "VERSION",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameType",
    "PongResponder",
    "ProtocolErrorCallback",
    "close_writer",
    "decode",
    "encode",
    "exchange",
    "now_ms",
    "ping",
    "pong_for",
    "start_responder",
]
