"""Entry point: `python bench/run.py [scenario ...] [options]` (see bench/README.md)."""

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, bench/ is sys.path[0]; the package lives one level up.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.cli import main

    sys.exit(main())
