#!/usr/bin/env bash
# Set up a fresh Debian machine and run the test suite -- the one command to run:
#
#     scripts/test.sh [pytest arguments...]      e.g.  scripts/test.sh -q -k backends
#
# 1. Installs the servers the integration tests start (PostgreSQL, MariaDB, Redis, and nginx
#    with its stream module) with apt if any is missing, without starting the system services.
# 2. Installs clusterchat with its test extras (pip install -e ".[test]"); if python3 is
#    Debian's externally managed interpreter and no virtualenv is active, into ./.venv.
# 3. Runs pytest from the repository root; its exit code is this script's exit code.
#
# The tests never touch the system instances: every server they start runs on a free port
# with its data in a temporary folder (see src/clusterchat/launcher/backends.py).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

log() { printf '[test.sh] %s\n' "$*" >&2; }

python="${PYTHON:-python3}"

# ------------------------------------------------------------------ system packages

apt_packages=()
have() { command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" || -x "/usr/bin/$1" ]]; }

if ! have redis-server \
    || ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
    || ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null \
    || ! have psql \
    || ! have mariadbd || ! have mariadb-install-db || ! have mariadb; then
    apt_packages+=(redis-server postgresql mariadb-server mariadb-client)
fi
nginx_with_stream() {  # nginx, and its TCP proxy (stream) built in or as Debian's dynamic module
    local nginx info
    nginx="$(command -v nginx || echo /usr/sbin/nginx)"
    [[ -x "$nginx" ]] || return 1
    info="$("$nginx" -V 2>&1)" || return 1
    [[ "$info" =~ --with-stream( |$) ]] && return 0
    compgen -G '/usr/lib/nginx/modules/ngx_stream_module.so' >/dev/null
}
if ! nginx_with_stream; then
    apt_packages+=(nginx libnginx-mod-stream)
fi
if ! have "$python"; then
    apt_packages+=(python3)
    python=python3
fi

sudo=()
use_root() {  # run apt as root: directly, or through sudo if it exists
    if [[ "$(id -u)" -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            log "need root to install: $*; sudo is not available."
            log "install them as root: apt-get install -y --no-install-recommends $*"
            exit 1
        fi
    fi
}

policy_rc_d=/usr/sbin/policy-rc.d
created_policy=0
remove_policy() {
    if ((created_policy)); then
        "${sudo[@]}" rm -f "$policy_rc_d" || true
        created_policy=0
    fi
}

apt_install() {
    use_root "$@"
    # Keep Debian's maintainer scripts from starting the system services: exit code 101 from
    # policy-rc.d means "action forbidden" to invoke-rc.d. An existing policy is left alone.
    if [[ ! -e "$policy_rc_d" ]]; then
        trap remove_policy EXIT
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy_rc_d" >/dev/null
        "${sudo[@]}" chmod 755 "$policy_rc_d"
        created_policy=1
    fi
    local env=(env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1)
    "${sudo[@]}" "${env[@]}" apt-get update
    "${sudo[@]}" "${env[@]}" apt-get install -y --no-install-recommends "$@"
    remove_policy
}

if ((${#apt_packages[@]})); then
    log "installing system packages: ${apt_packages[*]}"
    apt_install "${apt_packages[@]}"
    # An existing policy-rc.d may have let the package start the system nginx (port 80): stop it;
    # the tests run their own nginx on free ports.
    if [[ " ${apt_packages[*]} " == *" nginx "* && -s /run/nginx.pid ]] \
        && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
        log "stopping the system nginx the package started"
        "${sudo[@]}" /usr/sbin/nginx -s stop || true
    fi
fi

# ------------------------------------------------------------------ Python packages

externally_managed() {
    "$1" - <<'EOF'
import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if not in_venv and os.path.exists(marker) else 1)
EOF
}

if externally_managed "$python"; then
    # Debian's own python3 refuses system-wide pip installs (PEP 668): use ./.venv.
    if [[ ! -x .venv/bin/python ]]; then
        if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c 'import ensurepip' 2>/dev/null; then
            log "installing python3-venv to create ./.venv"
            apt_install python3-venv python3-pip
        fi
        log "creating virtualenv ./.venv"
        "$python" -m venv .venv
    fi
    python=.venv/bin/python
elif ! "$python" -m pip --version >/dev/null 2>&1; then
    log "installing python3-pip"
    apt_install python3-pip
fi

log "installing clusterchat with test extras"
"$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e ".[test]"

# ------------------------------------------------------------------ tests

log "running: $python -m pytest $*"
exec "$python" -m pytest "$@"
