"""``python -m loadtests.bench <benchmark>``: see :mod:`loadtests.bench.cli`."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # Imported here, not above: the autoscale benchmark's worker processes re-import this
    # module (as __mp_main__) and need none of the benchmarks' imports.
    from loadtests.bench.cli import main

    sys.exit(main())
