#!/usr/bin/env bash
# Refresh the pinned versions the test command installs (requirements/*.txt), from the
# ranges in pyproject.toml and requirements/*.in. Needs uv (`pip install uv`). Commit the
# result with the change that needed it; CI installs exactly these.
set -euo pipefail
cd "$(dirname "$0")/.."

compile() { uv pip compile --quiet --python-version 3.11 --universal --generate-hashes "$@"; }

# The project's own dependencies with every extra, plus the build tools.
compile pyproject.toml requirements/build.in --extra dev --extra sklearn --extra loadtest \
    -o requirements/ci.txt
echo "requirements/ci.txt: $(grep -c '^[a-z]' requirements/ci.txt) pins"
