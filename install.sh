#!/usr/bin/env bash
# AI Media Maker installer.
#
#   sudo ./install.sh [OPTIONS]          system install: a service user, code and virtual
#                                        environment in /opt/ai-media-maker, config in
#                                        /etc/ai-media-maker, data and models in
#                                        /var/lib/ai-media-maker, the systemd unit
#   ./install.sh --prefix DIR [OPTIONS]  everything under DIR, touching nothing else (no
#                                        user, no unit): DIR/bin/appliance serve starts it
#   ./install.sh --dev                   build .venv in this checkout (the README's commands)
#   ./install.sh --dev --test            the same, with the test tools
#   ./install.sh --uninstall [--purge] [--prefix DIR]
#                                        remove the service and the code; config, data and
#                                        models stay unless --purge (backups always stay)
#
# Running it again upgrades in place and keeps the config, the data and the model.
#
# Options:
#   --model REPO_ID    the model to download (default: common-canvas/CommonCanvas-S-C)
#   --model-dir DIR    copy this already downloaded model folder instead (offline servers)
#   --no-model         install no model; the service then makes the tiny demo model
#   --python PY        the Python 3.11+ to build the environment with (default: $PYTHON,
#                      else python3)
#   --reuse-packages   let the environment use the packages PY already has (a conda or
#                      vendor Python with a CUDA torch, another installation's environment):
#                      only what is missing gets installed
#   --tls              serve HTTPS: make a self-signed certificate for this machine (its
#                      name, localhost and its IP addresses; EC P-256, 825 days) in the data
#                      folder, unless one is there, and set server.tls_certificate and
#                      server.tls_key in the config (an existing config too)
#   --tls-cert FILE --tls-key FILE
#                      serve HTTPS with this certificate (PEM, any intermediates after it)
#                      and its unencrypted key instead: both are copied into the data folder
#   --database-url URL cluster mode (README: Scaling out): this node joins the PostgreSQL
#                      database postgresql://USER:PASSWORD@HOST:PORT/DBNAME that all nodes
#                      share, instead of a SQLite file of its own. The URL becomes
#                      storage.database in the config (an existing config too, once the
#                      database has answered), which is then readable only by root and the
#                      service's user. install.sh shows the URL with its password as ***.
#                      The password goes in the user part, its reserved characters
#                      percent-encoded (@ as %40, / as %2F)
#
# Environment:
#   PYTHON            the Python 3.11+ to build the virtual environment with (default: python3)
#   TORCH_SPEC        the torch requirement when torch is missing (default: torch==2.13.0
#                     without a GPU, torch with one)
#   TORCH_INDEX_URL   an extra package index for torch, e.g. https://download.pytorch.org/whl/cpu
#   pip's own settings apply too: PIP_INDEX_URL, or PIP_NO_INDEX=1 with PIP_FIND_LINKS=DIR
#   to install from a folder of wheels on a server without internet access.
#
# Everything runs inside main(), so a truncated download of this script does nothing.
set -eu

say() { printf '\033[1m>>> %s\033[0m\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
warn() { printf '\033[1;33m>>> warning: %s\033[0m\n' "$*" >&2; }

usage() {
    sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'
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

apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "install $* with this system's package manager, then run install.sh again"
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        sudo=sudo
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" || {
        $sudo apt-get update && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
    }
}

install_test_tools() {
    # The tests check the unit file with systemd-analyze.
    if ! command -v systemd-analyze >/dev/null 2>&1; then
        say "installing systemd's tools (the tests verify the unit file with them)"
        apt_install systemd
    fi
    # The HTTP benchmark (appliance bench-api) loads the server with wrk; its test runs it.
    if ! command -v wrk >/dev/null 2>&1; then
        say "installing wrk (the HTTP benchmark's load generator)"
        apt_install wrk
    fi
    # The boot test installs the appliance on a minimal Debian booted with systemd
    # as PID 1 in a container.
    if ! command -v systemd-nspawn >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
        say "installing systemd-nspawn and debootstrap (the boot test runs a minimal Debian)"
        apt_install systemd-container debootstrap
    fi
    # The HTTPS tests make their certificates with openssl, as --tls does.
    if ! command -v openssl >/dev/null 2>&1; then
        say "installing openssl (the HTTPS tests make certificates with it)"
        apt_install openssl
    fi
    # The console's browser tests drive Debian's chromium through Playwright,
    # which never downloads a browser of its own; a font keeps screenshots legible.
    if ! command -v chromium >/dev/null 2>&1; then
        say "installing chromium (the console's browser tests drive it)"
        apt_install chromium fonts-dejavu-core
    fi
    # Only the server binaries are used (initdb, pg_ctl): the tests make a server in a
    # folder of their own. Debian's package also sets up a cluster of its own; the tests
    # never use it.
    if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
        say "installing postgresql (the cluster-mode tests start a PostgreSQL server of their own)"
        apt_install postgresql
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
    if [ "$with_tests" = 1 ]; then
        install_test_tools
    fi
    say "done: run .venv/bin/appliance serve"
}

APP=ai-media-maker
SERVICE_USER=ai-media-maker
# CommonCanvas-S-C: Stable Diffusion 2 architecture at 512 px, trained only on
# Creative Commons images that allow commercial use; weights under CC BY-SA 4.0.
DEFAULT_MODEL=common-canvas/CommonCanvas-S-C

# Where everything goes: the system's standard places, or one folder (--prefix).
set_layout() {
    local prefix="$1"
    if [ -n "$prefix" ]; then
        OPT_DIR="$prefix"
        ETC_DIR="$prefix/etc"
        STATE_DIR="$prefix/var/lib"
        CACHE_DIR="$prefix/var/cache"
        BACKUP_DIR="$prefix/var/backups"
    else
        OPT_DIR="/opt/$APP"
        ETC_DIR="/etc/$APP"
        STATE_DIR="/var/lib/$APP"
        CACHE_DIR="/var/cache/$APP"
        BACKUP_DIR="/var/backups/$APP"
    fi
    VENV="$OPT_DIR/venv"
    WRAPPER="$OPT_DIR/bin/appliance"
    CONFIG="$ETC_DIR/config.toml"
    # Kept with the config, so that --purge still finds an installation whose code is gone.
    MARKER="$ETC_DIR/.installed-by-install.sh"
    UNIT="/etc/systemd/system/$APP.service"
}

absolute() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$PWD" "$1" ;;
    esac
}

systemd_runs() {
    [ -d /run/systemd/system ]
}

create_user() {
    if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
        say "creating the system user $SERVICE_USER"
        useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "AI Media Maker" "$SERVICE_USER"
    fi
    # The GPU's device nodes belong to these groups on most distributions.
    local group
    for group in video render; do
        if getent group "$group" >/dev/null 2>&1; then
            usermod -a -G "$group" "$SERVICE_USER"
        fi
    done
}

make_dirs() {
    local system="$1"
    if [ "$system" = 1 ]; then
        install -d -m 755 "$OPT_DIR" "$OPT_DIR/bin"
        install -d -m 750 -o root -g "$SERVICE_USER" "$ETC_DIR"
        install -d -m 750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR" "$CACHE_DIR" "$BACKUP_DIR"
    else
        mkdir -p "$OPT_DIR/bin" "$ETC_DIR" "$STATE_DIR" "$CACHE_DIR" "$BACKUP_DIR"
    fi
}

base_interpreter() {
    "$1" -c 'import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))'
}

build_venv() {
    local python="$1" reuse="$2"
    if [ -x "$VENV/bin/python" ] && [ "$(base_interpreter "$VENV/bin/python")" != "$(base_interpreter "$python")" ]; then
        say "rebuilding $VENV on $python"
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating the virtual environment $VENV"
        if [ "$reuse" = 1 ]; then
            # pip and the build tools come from PY's packages too (see below).
            "$python" -m venv --without-pip "$VENV"
        else
            "$python" -m venv "$VENV"
        fi
    fi
    local site
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
    if [ "$reuse" = 1 ]; then
        # A .pth file appends PY's package folders to the environment's path: its own
        # packages still come first, and pip installs only what PY lacks.
        "$python" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
            >"$site/_reused_packages.pth"
        say "the environment reuses the packages of $python"
    else
        rm -f "$site/_reused_packages.pth"
    fi
    if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        "$VENV/bin/python" -m ensurepip --quiet
    fi
    if [ ! -x "$VENV/bin/pip" ]; then
        printf '#!/bin/sh\nexec "%s/bin/python" -m pip "$@"\n' "$VENV" >"$VENV/bin/pip"
        chmod 755 "$VENV/bin/pip"
    fi
}

write_wrapper() {
    local system="$1"
    {
        printf '#!/bin/sh\n'
        printf '# Written by install.sh: the appliance command with this installation'"'"'s config.\n'
        printf 'APPLIANCE_CONFIG="${APPLIANCE_CONFIG:-%s}"\n' "$CONFIG"
        printf 'HF_HOME="${HF_HOME:-%s/huggingface}"\n' "$CACHE_DIR"
        printf 'export APPLIANCE_CONFIG HF_HOME\n'
        if [ "$system" = 1 ]; then
            printf '# As root, run as the service user, so that the files it makes stay the service'"'"'s.\n'
            printf 'if [ "$(id -u)" = 0 ]; then\n'
            printf '    exec runuser -u %s -- "%s/bin/appliance" "$@"\n' "$SERVICE_USER" "$VENV"
            printf 'fi\n'
        fi
        printf 'exec "%s/bin/appliance" "$@"\n' "$VENV"
    } >"$WRAPPER.tmp"
    chmod 755 "$WRAPPER.tmp"
    mv "$WRAPPER.tmp" "$WRAPPER"
    if [ "$system" = 1 ] && { [ ! -e /usr/local/bin/appliance ] || [ -L /usr/local/bin/appliance ]; }; then
        ln -sfn "$WRAPPER" /usr/local/bin/appliance
    fi
}

write_config() {
    local root="$1" system="$2"
    if [ -f "$CONFIG" ]; then
        say "keeping the config $CONFIG"
        return
    fi
    say "writing the config $CONFIG"
    sed -e "s|^data_dir = \"data\"\$|data_dir = \"$STATE_DIR\"|" \
        -e "s|^database = \"data/appliance.db\"\$|database = \"$STATE_DIR/appliance.db\"|" \
        -e "s|^path = \"models/demo\"\$|path = \"$STATE_DIR/models/default\"|" \
        "$root/config.toml" >"$CONFIG.tmp"
    local expected
    for expected in "data_dir = \"$STATE_DIR\"" "database = \"$STATE_DIR/appliance.db\"" \
        "path = \"$STATE_DIR/models/default\""; do
        grep -qxF "$expected" "$CONFIG.tmp" || {
            rm -f "$CONFIG.tmp"
            die "config.toml in the checkout no longer has the default paths this script rewrites"
        }
    done
    if [ "$system" = 1 ]; then
        chown "root:$SERVICE_USER" "$CONFIG.tmp"
        chmod 640 "$CONFIG.tmp"
    fi
    mv "$CONFIG.tmp" "$CONFIG"
}

# Every address of this machine but loopback and IPv6 link-local, one a line.
machine_addresses() {
    if hostname -I >/dev/null 2>&1; then
        hostname -I | tr ' ' '\n' | sed '/^$/d'
    elif command -v ip >/dev/null 2>&1; then
        ip -o addr show scope global | awk '{ sub("/.*", "", $4); print $4 }'
    fi
}

make_certificate() {
    local cert="$1" key="$2" host names address
    command -v openssl >/dev/null 2>&1 ||
        die "--tls needs openssl to make a certificate: install it, or give one with --tls-cert and --tls-key"
    host="$(hostname 2>/dev/null || true)"
    names="DNS:localhost,IP:127.0.0.1,IP:::1"
    if [ -n "$host" ] && [ "$host" != localhost ]; then
        names="DNS:$host,$names"
    fi
    for address in $(machine_addresses); do
        names="$names,IP:$address"
    done
    say "making a self-signed certificate for $names"
    # 825 days: the longest validity macOS and iOS accept for a certificate they are told to trust.
    (umask 077 && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
        -subj "/CN=${host:-localhost}" -addext "subjectAltName=$names" \
        -addext "extendedKeyUsage=serverAuth" -keyout "$key" -out "$cert" 2>/dev/null) ||
        die "openssl could not make the certificate"
}

# Sets a [server] setting in the config's copy $CONFIG.tmp, adding it if the config predates it.
set_server_setting() {
    local name="$1" value="$2"
    if grep -q "^$name = " "$CONFIG.tmp"; then
        sed -i "s|^$name = .*\$|$name = \"$value\"|" "$CONFIG.tmp"
    elif grep -qx '\[server\]' "$CONFIG.tmp"; then
        sed -i "/^\[server\]\$/a $name = \"$value\"" "$CONFIG.tmp"
    else
        printf '\n[server]\n%s = "%s"\n' "$name" "$value" >>"$CONFIG.tmp"
    fi
}

install_tls() {
    local system="$1" tls="$2" tls_cert="$3" tls_key="$4"
    local dir="$STATE_DIR/tls"
    local cert="$dir/server.crt" key="$dir/server.key"
    if [ "$tls" = 0 ]; then
        return
    fi
    mkdir -p "$dir"
    rm -f "$cert.tmp" "$key.tmp"
    if [ -n "$tls_cert" ]; then
        say "installing the certificate $tls_cert and its key as $cert and $key"
        cp "$tls_cert" "$cert.tmp"
        (umask 077 && cp "$tls_key" "$key.tmp")
    elif [ -f "$cert" ] && [ -f "$key" ]; then
        say "keeping the certificate $cert"
    else
        make_certificate "$cert.tmp" "$key.tmp"
    fi
    if [ -f "$cert.tmp" ]; then
        chmod 644 "$cert.tmp"
        chmod 600 "$key.tmp"
        if [ "$system" = 1 ]; then
            chown "$SERVICE_USER:$SERVICE_USER" "$dir" "$cert.tmp" "$key.tmp"
        fi
        mv "$key.tmp" "$key"
        mv "$cert.tmp" "$cert"
    fi
    # A copy that keeps the config's owner and mode, edited, then put in place whole.
    cp -p "$CONFIG" "$CONFIG.tmp"
    set_server_setting tls_certificate "$cert"
    set_server_setting tls_key "$key"
    mv "$CONFIG.tmp" "$CONFIG"
    # The service's own check of the files, so that a problem shows now, not at its start.
    "$VENV/bin/python" -c '
import sys
from appliance.core.config import ConfigError, load_config
from appliance.core.tls import tls_context
try:
    tls_context(load_config(sys.argv[1]))
except ConfigError as problem:
    sys.exit(f"install.sh: {problem}")
' "$CONFIG" || die "the service could not use the certificate (see above)"
    say "HTTPS is on; clients trust the certificate $cert, e.g. curl --cacert server.crt https://$(hostname 2>/dev/null || echo localhost):PORT/healthz"
}

# The database URL as install.sh prints it: the password in its user part replaced by
# ***. The parts are cut as Python's urlsplit cuts them.
masked_url() {
    local url="$1" scheme rest authority tail user
    scheme="${url%%://*}"
    rest="${url#*://}"
    authority="${rest%%[/?#]*}"
    tail="${rest#"$authority"}"
    if [[ "$authority" == *@* ]]; then
        user="${authority%@*}"
        if [[ "$user" == *:* ]]; then
            authority="${user%%:*}:***@${authority##*@}"
        fi
    fi
    printf '%s://%s%s\n' "$scheme" "$authority" "$tail"
}

# Refuses what is not a postgresql:// URL before anything is installed, never naming it
# (it may hold a password).
check_database_url() {
    local url="$1"
    case "${url,,}" in
        postgresql://*|postgres://*) ;;
        *) die "--database-url takes a postgresql:// URL: postgresql://USER:PASSWORD@HOST:PORT/DBNAME" ;;
    esac
    # Only a URL's own characters: the URL is written into the config as a TOML string,
    # which no quote or backslash may end.
    local allowed='^[][A-Za-z0-9._~:/?#@!$&'"'"'()*+,;=%-]+$'
    [[ "$url" =~ $allowed ]] ||
        die "--database-url holds a space, quote or backslash: percent-encode it (a space as %20)"
    # The service masks the password of the user part only, wherever it shows the URL.
    case "$url" in
        *[?\&]password=*)
            die "--database-url: put the password in the user part (postgresql://USER:PASSWORD@HOST:PORT/DBNAME), not in a password= parameter" ;;
    esac
}

# The service's own check of the URL (host, port, database name), refused as the option
# it came from, before anything is installed: a URL the service cannot use costs no
# minutes of package downloads to find out. Read from the checkout (the check needs
# nothing beyond the standard library); in the environment, not on a command line
# others can read.
check_database_url_fits() {
    local python="$1" root="$2" url="$3"
    DATABASE_URL="$url" ROOT="$root" "$python" -B -c '
import os, sys
sys.path.insert(0, os.environ["ROOT"])
from appliance.core.database_url import DatabaseUrl
try:
    DatabaseUrl(os.environ["DATABASE_URL"])
except ValueError as problem:
    sys.exit(f"install.sh: --database-url {problem}")
' || exit 1
}

# Cluster mode: sets storage.database to the URL, in a private copy of the config that
# `appliance init` tries first, so that the config changes only once the database has
# answered and holds the schema. The local SQLite file is never made.
install_database() {
    local system="$1" url="$2"
    if [ -z "$url" ]; then
        return
    fi
    say "joining the database $(masked_url "$url")"
    rm -f "$CONFIG.tmp"
    # Private before the password is written into it.
    (umask 077 && : >"$CONFIG.tmp")
    if [ "$system" = 1 ]; then
        chown "root:$SERVICE_USER" "$CONFIG.tmp"
        chmod 640 "$CONFIG.tmp"
    fi
    DATABASE_URL="$url" awk '
        function put() { print "database = \"" ENVIRON["DATABASE_URL"] "\""; done = 1 }
        /^\[/ {
            if (section == "storage" && !done) put()
            section = $0
            gsub(/^\[[[:space:]]*|[[:space:]]*\].*$/, "", section)
        }
        section == "storage" && /^[[:space:]]*database[[:space:]]*=/ { if (!done) put(); next }
        { print }
        END {
            if (!done) {
                if (section != "storage") print "\n[storage]"
                put()
            }
        }
    ' "$CONFIG" >"$CONFIG.tmp"
    # Its one line says why (the password masked); the config stays as it was.
    "$WRAPPER" --config "$CONFIG.tmp" init || {
        rm -f "$CONFIG.tmp"
        exit 1
    }
    mv "$CONFIG.tmp" "$CONFIG"
    if [ -f "$STATE_DIR/appliance.db" ]; then
        warn "the accounts, keys and images of $STATE_DIR/appliance.db stay in that file: this node serves the cluster's database instead"
    fi
}

# A config whose database URL may hold a password is readable by root and the service's
# user only (an operator's own config too: its mode is only ever tightened).
protect_config() {
    local system="$1" before
    grep -qiE '^[[:space:]]*database[[:space:]]*=[[:space:]]*["'"'"']postgres(ql)?://' "$CONFIG" ||
        return 0
    before="$(stat -c %a "$CONFIG")"
    if [ "$system" = 1 ]; then
        chmod o-rwx "$CONFIG"
    else
        chmod go-rwx "$CONFIG"
    fi
    if [ "$(stat -c %a "$CONFIG")" != "$before" ]; then
        say "the config holds the database's URL: made $CONFIG readable by its owner$([ "$system" = 1 ] && echo " and the group $SERVICE_USER") only"
    fi
}

install_model() {
    local system="$1" model="$2" model_dir="$3" no_model="$4"
    local model_path
    model_path="$("$VENV/bin/python" -c 'import sys; from appliance.core.config import load_config; print(load_config(sys.argv[1]).model.path)' "$CONFIG")"
    if [ -f "$model_path/model_index.json" ]; then
        say "keeping the model in $model_path"
        return
    fi
    if [ -n "$model_dir" ]; then
        [ -f "$model_dir/model_index.json" ] ||
            die "$model_dir is not a diffusers model folder (it has no model_index.json)"
        [ ! -e "$model_path" ] || die "$model_path exists but holds no model: remove it first"
        say "copying the model from $model_dir to $model_path"
        mkdir -p "$(dirname "$model_path")"
        rm -rf "$model_path.partial"
        cp -R "$model_dir" "$model_path.partial"
        if [ "$system" = 1 ]; then
            chown -R "$SERVICE_USER:$SERVICE_USER" "$(dirname "$model_path")"
        fi
        mv "$model_path.partial" "$model_path"
        return
    fi
    if [ "$no_model" = 1 ]; then
        warn "no model installed (--no-model): the service will make the tiny demo model in $model_path, whose images are noise"
        return
    fi
    say "downloading $model into $model_path (several GB)"
    # model.path is a folder in model.dir: pulled under its name, it is the default model.
    "$WRAPPER" models pull "$model" "$(basename "$model_path")" ||
        die "the download of $model failed (see above); re-run with --model-dir DIR to copy a model downloaded elsewhere, or with --no-model"
}

install_unit() {
    local root="$1"
    if ! systemd_runs; then
        say "systemd is not running here: start the service with $WRAPPER serve (as root it runs as $SERVICE_USER)"
        return
    fi
    install -m 644 "$root/systemd/$APP.service" "$UNIT"
    systemctl daemon-reload
    systemctl enable "$APP.service"
    say "starting $APP (it reports ready once the model is loaded)"
    if ! systemctl restart "$APP.service"; then
        explain_failed_start
        die "the service did not start (the reason is above); after fixing it, run install.sh again or systemctl restart $APP"
    fi
    say "running: systemctl status $APP, journalctl -u $APP -f"
}

# Why the unit did not become active: its state, and its last journal lines
# with systemd's own messages about it (such as a user or group it could not
# set up), which `journalctl -u` leaves out.
explain_failed_start() {
    printf '\n' >&2
    systemctl status --no-pager --lines=0 "$APP.service" >&2 || true
    printf '\n--- the last journal lines of %s:\n' "$APP" >&2
    journalctl --no-pager --quiet -n 40 "_SYSTEMD_UNIT=$APP.service" + "UNIT=$APP.service" >&2 || true
    printf -- '---\n' >&2
}

install_service() {
    local prefix="$1" python="$2" reuse="$3" model="$4" model_dir="$5" no_model="$6"
    local tls="$7" tls_cert="$8" tls_key="$9" database_url="${10}"
    local root system=1
    root="$(cd "$(dirname "$0")" && pwd)"
    [ -f "$root/pyproject.toml" ] || die "run install.sh from a checkout of AI Media Maker"
    if [ -n "$prefix" ]; then system=0; fi
    set_layout "$prefix"
    check_python "$python"
    if [ -n "$database_url" ]; then
        check_database_url_fits "$python" "$root" "$database_url"
    fi
    if [ -n "$model_dir" ]; then
        model_dir="$(absolute "$model_dir")"
    fi
    local given
    for given in "$tls_cert" "$tls_key"; do
        if [ -n "$given" ] && [ ! -f "$given" ]; then
            die "$given is not a file (--tls-cert and --tls-key name the certificate and its key)"
        fi
    done
    if [ "$system" = 1 ]; then
        [ "$(id -u)" = 0 ] || die "the system install needs root: run it with sudo, or use --prefix DIR"
        create_user
    fi
    make_dirs "$system"
    build_venv "$python" "$reuse"
    if [ "$system" = 1 ] && ! runuser -u "$SERVICE_USER" -- "$VENV/bin/python" -c '' 2>/dev/null; then
        rm -rf "$VENV"
        die "the user $SERVICE_USER cannot run $python (is it inside a private home folder?): pass --python with a system-wide Python, e.g. --python /usr/bin/python3"
    fi
    if has_nvidia_gpu; then
        say "NVIDIA GPU found: $(nvidia-smi -L | head -n 1)"
    else
        warn "no NVIDIA GPU found (nvidia-smi): images will be generated on the CPU, slowly"
    fi
    install_torch "$VENV/bin/pip"
    say "installing AI Media Maker into $VENV"
    # pip always rebuilds and replaces a project installed from a folder, so a
    # re-run upgrades the code even when the version number has not changed.
    # Where the environment has the build tools already, the build uses them and
    # asks no package index (an offline server, PIP_NO_INDEX=1).
    local isolation=""
    if "$VENV/bin/python" -c 'import sys; from importlib.metadata import version; sys.exit(int(version("setuptools").split(".")[0]) < 69)' 2>/dev/null; then
        isolation=--no-build-isolation
    fi
    "$VENV/bin/pip" install --quiet $isolation "$root"
    write_wrapper "$system"
    write_config "$root" "$system"
    printf 'layout=%s\nconfig=%s\ndata=%s\n' "$([ "$system" = 1 ] && echo system || echo prefix)" \
        "$CONFIG" "$STATE_DIR" >"$MARKER"
    protect_config "$system"
    install_database "$system" "$database_url"
    install_tls "$system" "$tls" "$tls_cert" "$tls_key"
    "$WRAPPER" init
    install_model "$system" "$model" "$model_dir" "$no_model"
    if [ "$system" = 1 ]; then
        install_unit "$root"
    else
        say "installed in $prefix: start it with $WRAPPER serve (config: $CONFIG)"
    fi
    say "check it at any time with: $WRAPPER doctor"
}

uninstall_service() {
    local prefix="$1" purge="$2" system=1
    if [ -n "$prefix" ]; then system=0; fi
    set_layout "$prefix"
    if [ "$system" = 1 ]; then
        [ "$(id -u)" = 0 ] || die "--uninstall of the system install needs root: run it with sudo"
    fi
    [ -f "$MARKER" ] || die "nothing to uninstall: $ETC_DIR holds no installation made by install.sh"
    if [ "$system" = 1 ] && [ -f "$UNIT" ]; then
        if systemd_runs; then
            systemctl disable --now "$APP.service" || true
        fi
        rm -f "$UNIT"
        if systemd_runs; then
            systemctl daemon-reload
        fi
    fi
    if [ -L /usr/local/bin/appliance ] && [ "$(readlink /usr/local/bin/appliance)" = "$WRAPPER" ]; then
        rm -f /usr/local/bin/appliance
    fi
    say "removing the code and the environment in $OPT_DIR"
    rm -rf "$VENV" "$OPT_DIR/bin" "$CACHE_DIR"
    if [ "$purge" = 1 ]; then
        say "removing the config $ETC_DIR and the data and models in $STATE_DIR"
        rm -rf "$ETC_DIR" "$STATE_DIR"
        if [ "$system" = 1 ] && id -u "$SERVICE_USER" >/dev/null 2>&1; then
            userdel "$SERVICE_USER" || warn "could not remove the user $SERVICE_USER"
        fi
        if [ -d "$BACKUP_DIR" ]; then
            if [ "$system" = 1 ]; then
                # Its owner is gone; a later user given the same id must not inherit them.
                chown -R root:root "$BACKUP_DIR"
                say "kept the backups in $BACKUP_DIR, now owned by root"
            else
                say "kept the backups in $BACKUP_DIR"
            fi
        fi
    else
        say "kept the config in $ETC_DIR and the data and models in $STATE_DIR (--purge removes them)"
    fi
    rmdir "$OPT_DIR" 2>/dev/null || true
}

main() {
    local mode=service with_tests=0 prefix="" purge=0 reuse=0 no_model=0
    local python="${PYTHON:-python3}" model="$DEFAULT_MODEL" model_dir=""
    local tls=0 tls_cert="" tls_key="" database_url=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --dev) mode=dev ;;
            --test) with_tests=1 ;;
            --uninstall) mode=uninstall ;;
            --purge) purge=1 ;;
            --prefix) [ $# -ge 2 ] || die "--prefix needs a folder"; prefix="$(absolute "$2")"; shift ;;
            --python) [ $# -ge 2 ] || die "--python needs an interpreter"; python="$2"; shift ;;
            --reuse-packages) reuse=1 ;;
            --model) [ $# -ge 2 ] || die "--model needs a Hugging Face model id"; model="$2"; shift ;;
            --model-dir) [ $# -ge 2 ] || die "--model-dir needs a folder"; model_dir="$2"; shift ;;
            --no-model) no_model=1 ;;
            --tls) tls=1 ;;
            --tls-cert) [ $# -ge 2 ] || die "--tls-cert needs a certificate file"; tls_cert="$(absolute "$2")"; shift ;;
            --tls-key) [ $# -ge 2 ] || die "--tls-key needs a key file"; tls_key="$(absolute "$2")"; shift ;;
            --database-url) [ $# -ge 2 ] || die "--database-url needs a postgresql:// URL"; database_url="$2"; shift ;;
            -h|--help) usage; exit 0 ;;
            *) die "unknown option $1 (see --help)" ;;
        esac
        shift
    done
    if [ "$with_tests" = 1 ] && [ "$mode" != dev ]; then
        die "--test goes with --dev"
    fi
    if [ "$purge" = 1 ] && [ "$mode" != uninstall ]; then
        die "--purge goes with --uninstall"
    fi
    if [ "$mode" = dev ] && [ -n "$prefix" ]; then
        die "--dev builds .venv in the checkout; it takes no --prefix"
    fi
    if [ -n "$tls_cert" ] || [ -n "$tls_key" ]; then
        { [ -n "$tls_cert" ] && [ -n "$tls_key" ]; } || die "--tls-cert and --tls-key go together"
        tls=1
    fi
    if [ "$tls" = 1 ] && [ "$mode" != service ]; then
        die "--tls, --tls-cert and --tls-key go with a system or --prefix install"
    fi
    if [ -n "$database_url" ]; then
        [ "$mode" = service ] || die "--database-url goes with a system or --prefix install"
        check_database_url "$database_url"
    fi
    case "$mode" in
        dev) install_dev "$with_tests" ;;
        uninstall) uninstall_service "$prefix" "$purge" ;;
        service) install_service "$prefix" "$python" "$reuse" "$model" "$model_dir" "$no_model" \
            "$tls" "$tls_cert" "$tls_key" "$database_url" ;;
    esac
}

main "$@"
