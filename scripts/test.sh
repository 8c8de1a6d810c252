#!/usr/bin/env bash
# The whole test suite, from a fresh machine: install, lint, type-check, test.
# README's second set-up command; .ci/run runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[dev]'

echo "== ruff"
python3 -m ruff check .
python3 -m ruff format --check .
echo "== mypy"
python3 -m mypy
echo "== pytest"
# CI has 15 minutes; the suite takes about 4. Never let it hang past that.
timeout --signal=TERM --kill-after=30 780 python3 -m pytest -q "$@"
