#!/usr/bin/env bash
# Debian's redis-server, for the Redis job store's tests (they start their own server on a free port)
# and for a multi-host deployment's store (job_store = "redis"). Where it cannot be installed (not root,
# no apt), the Redis tests skip; CI installs it.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then exit 0; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
else
  echo "warning: redis-server not installed and not root: the Redis job store's tests will skip" >&2
fi
