#!/usr/bin/env bash
# Install refcount into .venv and run it as a sidecar on STORE (default: a sample store
# made under ./sample-store with two images sharing a base layer, plus a multi-arch index
# and a referrer). Ctrl-C (or SIGTERM) stops the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -m venv --help >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q -e .
store="${1:-}"
if [ -z "$store" ]; then
    store="$PWD/sample-store"
    if [ ! -e "$store/index.json" ]; then
        .venv/bin/python scripts/mkstore.py "$store" --images 20 --layers 4 --multiarch 0.1 --referrers 0.1
    fi
fi
.venv/bin/refcount --store "$store" init
.venv/bin/refcount --store "$store" tags | head -5
echo "watching $store (metrics on 127.0.0.1:9464; Ctrl-C to stop)"
exec .venv/bin/refcount --store "$store" watch --metrics-addr 127.0.0.1:9464
