#!/usr/bin/env bash
# System packages inspectray needs beyond Python: a real redis-server (Debian
# package) for the result cache, result stream and test fixtures.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
  echo "redis-server present: $(redis-server --version | head -1)"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root or sudo to install redis-server" >&2; exit 1; }
  SUDO="sudo"
fi
echo "installing redis-server (Debian package)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
# The package starts a system-wide service on port 6379; inspectray starts its
# own servers on free ports and does not need it.
redis-server --version | head -1
