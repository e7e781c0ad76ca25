#!/bin/sh
# Set up everything mailgate needs on a Debian/Ubuntu machine, then run it or its tests.
#   ./bootstrap.sh run  [mailgate serve options]   set up, then start the gateway
#   ./bootstrap.sh test [pytest options]           set up, then run the whole test suite
set -eu
cd "$(dirname "$0")"

# The Debian packages the gateway and its test suite need (real peers included).
SYSTEM_PACKAGES=$(grep -v '^#' .ci/system-packages 2>/dev/null | tr '\n' ' ')
[ -n "$SYSTEM_PACKAGES" ] || SYSTEM_PACKAGES="python3 python3-venv python3-dev gcc libmilter-dev
    openssl ca-certificates swaks libnet-ssleay-perl libio-socket-ssl-perl"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing_packages() {
    for pkg in $SYSTEM_PACKAGES; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            # A Python 3.11+ from elsewhere (pyenv, a source build) also satisfies python3*.
            case "$pkg" in
                python3|python3-venv|python3-dev) python_ok && continue ;;
            esac
            printf '%s ' "$pkg"
        fi
    done
}

python_ok() {
    command -v python3 >/dev/null 2>&1 &&
        python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

install_system_packages() {
    command -v dpkg-query >/dev/null 2>&1 || return 0
    pkgs=$(missing_packages)
    [ -n "$pkgs" ] || return 0
    echo "bootstrap: installing system packages: $pkgs"
    # Packages must not start daemons of their own on this machine (the tests run private
    # instances); the guard is removed again afterwards if this script put it there.
    guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod +x /usr/sbin/policy-rc.d
        guard=yes
    fi
    as_root apt-get update -qq
    # Postfix asks how to configure itself; the tests give it a private configuration.
    echo 'postfix postfix/main_mailer_type select No configuration' | as_root debconf-set-selections 2>/dev/null || true
    # shellcheck disable=SC2086
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
    [ -z "$guard" ] || as_root rm -f /usr/sbin/policy-rc.d
}

setup_venv() {
    if [ ! -x .venv/bin/python ]; then
        echo "bootstrap: creating .venv"
        python3 -m venv .venv
    fi
    stamp=.venv/.mailgate-installed
    # The strict editable layout is a link tree that mypy can follow too; it is rebuilt
    # whenever the project changed since the last install (a new module needs a new link).
    if [ ! -e "$stamp" ] || [ -n "$(find pyproject.toml core milters policies -newer "$stamp" -print -quit)" ]; then
        echo "bootstrap: installing mailgate and its dependencies into .venv"
        .venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
        .venv/bin/python -m pip install -q -e ".[test]" --config-settings editable_mode=strict
        touch "$stamp"
    fi
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    run)
        install_system_packages
        setup_venv
        exec .venv/bin/mailgate serve "$@"
        ;;
    test)
        install_system_packages
        setup_venv
        exec .venv/bin/python -m pytest "$@"
        ;;
    *)
        echo "usage: $0 run [serve options] | test [pytest options]" >&2
        exit 2
        ;;
esac
