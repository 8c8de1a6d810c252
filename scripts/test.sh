#!/usr/bin/env bash
# The whole test suite, from a fresh machine: install, lint, type-check, test.
# README's second set-up command; .ci/run runs exactly this.
#
# Installs the pinned versions of requirements/ci.txt (hashes checked), so a dependency's
# new release can't turn CI red; `bash scripts/lock.sh` refreshes the pins. Outside a
# virtualenv it makes one (.venv in the checkout) and runs in it: Debian's own pip
# refuses to install into the system Python (PEP 668), and a clean environment is what
# CI should test anyway.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
    [ -x .venv/bin/python3 ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi

pip_install() { python3 -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install --require-hashes -r requirements/ci.txt

echo "== ruff"
python3 -m ruff check .
python3 -m ruff format --check .

# The type check runs while the build compiles the hot path: two cores, and mypyc's
# compile (not incremental) writes no mypy cache. It needs the UPI stubs, made first.
python3 -m merlin_dp.protos._generate
mypy_report=$(mktemp)
python3 -m mypy > "$mypy_report" 2>&1 &
mypy_pid=$!
# The project itself, against the pinned build tools just installed (no isolated build
# environment that would fetch unpinned ones).
pip_install --no-deps --no-build-isolation -e .
python3 -m pip check --disable-pip-version-check
# Bytecode for the project's modules now: the tests start hundreds of processes, and
# where PYTHONDONTWRITEBYTECODE is set each would compile what it imports again.
python3 -m compileall -q merlin_dp tests loadtests > /dev/null
python3 -c 'from merlin_dp.common import hot_path; print("hot path:", hot_path.state)'

echo "== mypy"
mypy_status=0
wait "$mypy_pid" || mypy_status=$?
cat "$mypy_report"
rm -f "$mypy_report"
[ "$mypy_status" -eq 0 ] || exit "$mypy_status"

echo "== pytest"
# Two workers, a test file each at a time (its module fixtures stay on one worker): the
# suite mostly waits on real processes and clocks: serially 0.7 of a core busy for 12.5
# minutes on this 2-core VM, on two workers 1.3 cores for about 5. Then the tests marked
# `alone` (judged on real clocks in one process: a neighbour's CPU would be read as theirs),
# by themselves, about 3. CI has 15 minutes, the install takes about 3: never let the
# tests hang past 13. Exit code 5 is "no test selected" (a file given here may hold none
# of one kind).
deadline=$(( $(date +%s) + 780 ))
run_pytest() {
    local status=0 left=$(( deadline - $(date +%s) ))
    [ "$left" -gt 0 ] || { echo "scripts/test.sh: out of time before pytest $*"; exit 124; }
    timeout --signal=TERM --kill-after=30 "$left" python3 -m pytest -q "$@" || status=$?
    [ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"
}
run_pytest -n 2 --dist loadfile -m "not alone" "$@"
echo "== pytest: the tests that run alone"
run_pytest -m alone "$@"
