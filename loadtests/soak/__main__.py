"""``python -m loadtests.soak``: see :mod:`loadtests.soak.cli`. The controller's runtime
also starts the soak's replicas this way (``--serve-replica``)."""

from __future__ import annotations

import sys

from loadtests.soak.cli import main

if __name__ == "__main__":
    sys.exit(main())
