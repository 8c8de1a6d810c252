#!/usr/bin/env bash
# Refresh the pinned versions the test command installs (requirements/*.txt), from the
# ranges in pyproject.toml and requirements/*.in. Needs uv (`pip install uv`). Commit the
# result with the change that needed it; CI installs exactly these.
set -euo pipefail
cd "$(dirname "$0")/.."

# For Python 3.11 (the project's oldest) unless PYTHON_VERSION says otherwise.
compile() {
    uv pip compile --quiet --python-version "${PYTHON_VERSION:-3.11}" --universal \
        --generate-hashes "$@"
}

# The project's own dependencies with every extra, plus the build tools.
compile pyproject.toml requirements/build.in --extra dev --extra sklearn --extra loadtest \
    -o requirements/ci.txt
echo "requirements/ci.txt: $(grep -c '^[a-z]' requirements/ci.txt) pins"

# The kserve client's own environment (tests/clients.py): kserve pins protobuf<7, which
# the project's UPI stubs can't use, so it lives in a virtualenv of its own.
compile requirements/kserve-client.in -o requirements/kserve-client.txt
echo "requirements/kserve-client.txt: $(grep -c '^[a-z]' requirements/kserve-client.txt) pins"

# The published merlin-sdk and merlin-pyfunc-server (tests/test_merlin_published.py, in
# its own venv, tests/clients.py): they require Python < 3.11 and pin mlflow 1.26.1,
# pydantic 2.5.3 and protobuf<5, so the lock is for 3.10.
PYTHON_VERSION=3.10 compile requirements/merlin-pyfunc.in -o requirements/merlin-pyfunc.txt
echo "requirements/merlin-pyfunc.txt: $(grep -c '^[a-z]' requirements/merlin-pyfunc.txt) pins"

# Redocly's linter (tests/test_openapi_document.py), from npm.
npm install --silent --package-lock-only --prefix requirements/npm
echo "requirements/npm/package-lock.json refreshed"
