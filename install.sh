#!/usr/bin/env bash
# AI Media Maker installer.
#
#   ./install.sh --dev          build .venv in this checkout (the README's commands)
#   ./install.sh --dev --test   the same, with the test tools
#
# Environment:
#   PYTHON            the Python 3.11+ to build the virtual environment with (default: python3)
#   TORCH_SPEC        the torch requirement when torch is missing (default: torch==2.13.0
#                     without a GPU, torch with one)
#   TORCH_INDEX_URL   an extra package index for torch, e.g. https://download.pytorch.org/whl/cpu
#
# Everything runs inside main(), so a truncated download of this script does nothing.
set -eu

say() { printf '\033[1m>>> %s\033[0m\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
}

has_nvidia_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

check_python() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
        die "$1 is not Python 3.11 or newer (set PYTHON to one that is)"
}

install_torch() {
    local pip="$1"
    if "$pip" show torch >/dev/null 2>&1; then
        return
    fi
    local spec
    if has_nvidia_gpu; then
        say "NVIDIA GPU found: installing the CUDA build of torch"
        spec="${TORCH_SPEC:-torch}"
    else
        say "no NVIDIA GPU found: installing the CPU build of torch (generation will be slow)"
        spec="${TORCH_SPEC:-torch==2.13.0}"
    fi
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "$pip" install --extra-index-url "$TORCH_INDEX_URL" "$spec"
    else
        "$pip" install "$spec"
    fi
}

install_dev() {
    local with_tests="$1"
    local root python venv
    root="$(cd "$(dirname "$0")" && pwd)"
    python="${PYTHON:-python3}"
    venv="$root/.venv"
    check_python "$python"
    if [ ! -x "$venv/bin/python" ]; then
        say "creating $venv"
        "$python" -m venv "$venv"
    fi
    install_torch "$venv/bin/pip"
    local target="$root"
    [ "$with_tests" = 1 ] && target="$root[test]"
    say "installing AI Media Maker into $venv"
    "$venv/bin/pip" install --quiet -e "$target"
    say "done: run .venv/bin/appliance serve"
}

main() {
    local mode="" with_tests=0
    while [ $# -gt 0 ]; do
        case "$1" in
            --dev) mode=dev ;;
            --test) with_tests=1 ;;
            -h|--help) usage; exit 0 ;;
            *) die "unknown option $1 (see --help)" ;;
        esac
        shift
    done
    case "$mode" in
        dev) install_dev "$with_tests" ;;
        *) die "only the developer install (--dev) is available in this version; see README.md" ;;
    esac
}

main "$@"
