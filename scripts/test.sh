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
status=0
python -m pytest -q "$@" || status=$?
# pytest's 5 means "no tests collected" (e.g. a -k that matches nothing): not a failure.
[ "$status" = 5 ] && status=0

# The database-backed part once more, on PostgreSQL (tests/conftest.py: REFCOUNT_TEST_DB gives
# every test a database of its own): every command, the daemon and the CLI through it,
# migrations, concurrency and crash recovery. The `postgres`-marked tests already ran on it
# above. Only for a whole run (no arguments), and only when the server answers.
# (The daemon on PostgreSQL, and the CLI through it, are in test_four_writers.py above.)
PG_PASS=(
    tests/test_core.py tests/test_cli.py tests/test_schema.py tests/test_crash.py
    tests/test_concurrency.py tests/test_batch_delete.py
)
if [ "$#" = 0 ] && command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
    started=$SECONDS
    pg_status=0
    REFCOUNT_TEST_DB=postgresql python -m pytest -q -m "not postgres" "${PG_PASS[@]}" \
        || pg_status=$?
    echo "PostgreSQL pass: $((SECONDS - started)) s"
    [ "$status" = 0 ] && status=$pg_status
fi
exit "$status"
