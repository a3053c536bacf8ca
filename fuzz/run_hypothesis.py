"""Long fuzz runs with hypothesis (no compiler needed):

    python -m fuzz.run_hypothesis proxy --examples 200000
    python -m fuzz.run_hypothesis all --minutes 5

Prints the executions and the first failing input (shrunk) if any; exit 1 on a finding.
"""

from __future__ import annotations

import argparse
import sys
import time

from hypothesis import HealthCheck, given, settings

from fuzz.strategies import INPUTS
from fuzz.targets import TARGETS

_BATCH = 500  # examples per hypothesis run; the deadline is checked between runs


def run(name: str, examples: int, minutes: float) -> tuple[int, BaseException | None]:
    """Batches of fresh random examples until `examples` ran or `minutes` passed."""
    target = TARGETS[name]
    deadline = time.monotonic() + minutes * 60
    count = 0

    def counted(data: bytes) -> None:
        nonlocal count
        count += 1
        target(data)

    while count < examples and time.monotonic() < deadline:
        batch = settings(
            max_examples=min(_BATCH, examples - count),
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(given(INPUTS[name])(counted))
        try:
            batch()
        except Exception as exc:  # a finding: report it, do not crash the runner
            return count, exc
    return count, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.run_hypothesis")
    parser.add_argument("target", choices=[*TARGETS, "all"])
    parser.add_argument("--examples", type=int, default=1_000_000, help="per target")
    parser.add_argument("--minutes", type=float, default=5.0, help="per target")
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.target == "all" else [args.target]
    found = False
    for name in names:
        started = time.monotonic()
        count, error = run(name, args.examples, args.minutes)
        took = time.monotonic() - started
        print(f"{name}: {count} executions in {took:.0f}s ({count / took:.0f}/s): "
              f"{'FOUND ' + repr(error) if error else 'nothing found'}")  # fmt: skip
        found = found or error is not None
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
