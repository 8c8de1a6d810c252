"""``python -m merlin_dp``: the ``merlin-dp`` command, for where the script isn't on PATH."""

from merlin_dp.cli.main import main

raise SystemExit(main())
