#!/usr/bin/env bash
# System packages inspectray needs beyond Python: a real redis-server (Debian
# package) for the result cache, result stream and test fixtures, and Debian's
# chromium, the headless browser the operator page's tests drive through Playwright.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)

if [ ${#missing[@]} -eq 0 ]; then
  echo "redis-server present: $(redis-server --version | head -1)"
  echo "chromium present: $(chromium --version 2>/dev/null | head -1)"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root or sudo to install ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
echo "installing ${missing[*]} (Debian packages)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The redis-server package starts a system-wide service on port 6379; inspectray
# starts its own servers on free ports and does not need it.
redis-server --version | head -1
chromium --version 2>/dev/null | head -1
