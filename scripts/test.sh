#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: system tools, a virtualenv with the
# test dependencies, then lint, types, import contracts and pytest. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq umoci skopeo oci-image-tool python3-venv chromium >/dev/null
fi
# The PostgreSQL tests use the local server; start it when it is installed but down.
if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
# The extractor plug-ins tests/test_extractors.py finds through real entry points.
.venv/bin/pip install -q -e tests/plugins/refcount_testext
export PATH="$PWD/.venv/bin:$PATH"

ruff check refcount tests scripts
ruff format --check refcount tests scripts
mypy
lint-imports
# Two passes of the suite at once (two cores; each test has its own directories, ports and
# database, so they do not meet): the whole suite on SQLite, and every database-backed test
# once more on the local PostgreSQL (REFCOUNT_TEST_DB: tests/conftest.py gives each test a
# schema of its own). Left out of the second: `no_database` tests, which never open one,
# and `postgres` ones, which name their own database on the server in the first pass.
# The PostgreSQL pass is for a whole run only (no arguments), when the server answers; its
# output is shown once it ends, so that the two passes' lines do not interleave.
pg_pid=""
if [ "$#" = 0 ] && command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
    pg_log=$(mktemp)
    (
        started=$SECONDS
        pg_status=0
        REFCOUNT_TEST_DB=postgresql python -m pytest -q -m "not postgres and not no_database" \
            >"$pg_log" 2>&1 || pg_status=$?
        echo "PostgreSQL pass: $((SECONDS - started)) s" >>"$pg_log"
        exit "$pg_status"
    ) &
    pg_pid=$!
fi

started=$SECONDS
status=0
python -m pytest -q "$@" || status=$?
echo "SQLite pass: $((SECONDS - started)) s"
# pytest's 5 means "no tests collected" (e.g. a -k that matches nothing): not a failure.
[ "$status" = 5 ] && status=0

if [ -n "$pg_pid" ]; then
    pg_status=0
    wait "$pg_pid" || pg_status=$?
    echo "--- PostgreSQL pass (REFCOUNT_TEST_DB=postgresql) ---"
    cat "$pg_log"
    rm -f "$pg_log"
    [ "$pg_status" = 5 ] && pg_status=0
    [ "$status" = 0 ] && status=$pg_status
fi
exit "$status"
