"""Write a starting corpus for each target: `python -m fuzz.seeds DIR` fills DIR/<target>/."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from connwatch.wire import proxy_protocol
from connwatch.wire.heartbeat_frame import decode, ping, pong_for
from fuzz.strategies import FULL_CONFIG

REPO = Path(__file__).resolve().parents[1]


def seeds() -> dict[str, list[bytes]]:
    v4 = (("192.0.2.1", 56324), ("198.51.100.7", 443))
    v6 = (("2001:db8::1", 1), ("::1", 65535))
    pong = pong_for(decode(ping(42)))
    frames = [ping(1_700_000_000_000), ping(0) + ping(1), ping(5)[:9], ping(9) + pong]
    return {
        "proxy": [
            bytes([2, 5, 30]) + proxy_protocol.encode_v1(*v4) + b"GET / HTTP/1.1\r\n",
            bytes([0]) + proxy_protocol.encode_v1(*v6),
            bytes([1, 13]) + proxy_protocol.encode_v2(*v4),
            bytes([3, 1, 12, 2]) + proxy_protocol.encode_v2(*v6) + b"\x00",
            bytes([0]) + proxy_protocol.encode_v2(None, None, local=True),
            bytes([0]) + proxy_protocol.encode_v1(None, None),
        ],
        "frames": [bytes([2, 3, 16]) + f for f in frames] + [bytes([0]) + pong],
        "config": [
            (REPO / "config" / "connwatch.yaml").read_bytes(),
            yaml.safe_dump(FULL_CONFIG).encode(),
            b"listeners: [{name: a, listen: ':1', upstreams: ['h:1']}]\n",
        ],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m fuzz.seeds DIR", file=sys.stderr)
        return 2
    root = Path(argv[0])
    for target, items in seeds().items():
        folder = root / target
        folder.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(items):
            (folder / f"seed-{i}").write_bytes(data)
        print(f"{folder}: {len(items)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
