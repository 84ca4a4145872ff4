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
exit "$status"
