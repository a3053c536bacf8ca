"""Coverage-guided fuzzing with atheris (libFuzzer):

    python -m fuzz.seeds /tmp/cw-corpus
    python -m fuzz.run_atheris proxy /tmp/cw-corpus/proxy -max_total_time=300
    python -m fuzz.run_atheris config /tmp/cw-corpus/config -dict=fuzz/config.dict \\
        -max_total_time=300 -timeout=10

Arguments after the target name go to libFuzzer unchanged (corpus directories, -runs=N,
-max_total_time=S, -jobs=N, -dict=FILE, ...). A finding is written as crash-<sha1> in the
working directory; replay it with `python -m fuzz.run_atheris TARGET crash-<sha1>`.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["connwatch", "fuzz"]):
    from fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz.run_atheris {{{','.join(TARGETS)}}} [libFuzzer args]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
