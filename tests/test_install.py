"""install.sh in its --prefix mode, end to end, and the systemd unit."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from .serve_process import free_port

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "ai-media-maker.service"
# The exposure `systemd-analyze security` gives the unit (0 best, 10 worst); the
# README records it. Hardening that is loosened must raise this on purpose.
MOST_EXPOSURE = 2.0


def install(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # PIP_NO_INDEX: nothing may come from a package index, as on a server
    # without internet access: the packages come from --reuse-packages.
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    return subprocess.run([str(ROOT / "install.sh"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def serve_installed(prefix: Path, tmp_path: Path, url: str,
                    verify: ssl.SSLContext | bool = True) -> subprocess.Popen:
    """Starts the installation's `appliance serve` and waits until `url`/readyz answers 200."""
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen([str(prefix / "bin" / "appliance"), "serve"], cwd=tmp_path,
                                  stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        try:
            ready = httpx.get(f"{url}/readyz", verify=verify, timeout=2)
            if ready.status_code == 200:
                assert ready.json()["checks"] == {"database": "ok", "disk": "ok", "model": "ok",
                                                  "worker": "ok"}
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise AssertionError(log_path.read_text())
        time.sleep(0.2)


def stop(server: subprocess.Popen, tmp_path: Path) -> None:
    server.terminate()
    server.wait(timeout=60)
    assert "ready: serving" in (tmp_path / "serve.log").read_text()


# One installation's whole life: installing and upgrading in place each cost a
# virtual environment's worth of time, so one prefix goes through all of it.
@pytest.mark.system
def test_a_prefix_install_serves_upgrades_turns_on_https_and_uninstalls(tmp_path, tiny_model):
    prefix = tmp_path / "opt"
    started = time.monotonic()
    made = install("--prefix", str(prefix), "--python", sys.executable, "--reuse-packages",
                   "--model-dir", str(tiny_model), cwd=tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    installed_in = time.monotonic() - started
    appliance = prefix / "bin" / "appliance"
    config = prefix / "etc" / "config.toml"
    model = prefix / "var" / "lib" / "models" / "default"
    assert (model / "model_index.json").exists()
    assert (prefix / "var" / "lib" / "appliance.db").exists()
    assert f'data_dir = "{prefix}/var/lib"' in config.read_text()

    # The installed package, not this checkout, is what the command imports.
    where = subprocess.run([str(prefix / "venv" / "bin" / "python"), "-c",
                            "import appliance; print(appliance.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(prefix / "venv"), where

    port = free_port()
    config.write_text(config.read_text().replace("port = 8000", f"port = {port}")
                      .replace('device = "auto"', 'device = "cpu"')
                      .replace("width = 512", "width = 64").replace("height = 512", "height = 64")
                      .replace("steps = 25", "steps = 2"))
    server = serve_installed(prefix, tmp_path, f"http://127.0.0.1:{port}")
    try:
        # The wrapper finds the installation's config by itself; restore refuses
        # while the service runs.
        backup = subprocess.run([str(appliance), "backup", str(tmp_path / "backup")],
                                capture_output=True, text=True, timeout=120)
        assert backup.returncode == 0, backup.stderr
        refused = subprocess.run([str(appliance), "restore", str(tmp_path / "backup")],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1
        assert "cannot restore: the service is running" in refused.stderr
    finally:
        stop(server, tmp_path)

    # Running it again, now with --tls, upgrades in place: the config and the data
    # stay, and a certificate for this machine is made and set in the config.
    edited = config.read_text()
    secured = install("--prefix", str(prefix), "--python", sys.executable, "--reuse-packages",
                      "--tls", cwd=tmp_path)
    assert secured.returncode == 0, secured.stdout + secured.stderr
    assert "keeping the config" in secured.stdout and "keeping the model" in secured.stdout
    certificate = prefix / "var" / "lib" / "tls" / "server.crt"
    key = prefix / "var" / "lib" / "tls" / "server.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    text = config.read_text()
    assert f'tls_certificate = "{certificate}"' in text and f'tls_key = "{key}"' in text
    # Those two settings are all that changed.
    changed = set(text.splitlines()) ^ set(edited.splitlines())
    assert {line.split(" = ")[0] for line in changed} <= {"tls_certificate", "tls_key"}, changed
    names, addresses = certificate_names(certificate)
    assert {"localhost", socket.gethostname()} <= names
    assert {ipaddress.ip_address("127.0.0.1"), *machine_addresses()} <= addresses
    dates = subprocess.run(["openssl", "x509", "-in", str(certificate), "-noout", "-startdate",
                            "-enddate"], capture_output=True, text=True, check=True,
                           timeout=60).stdout
    begins, ends = (datetime.strptime(line.split("=", 1)[1], "%b %d %H:%M:%S %Y %Z")
                    for line in dates.splitlines())
    assert (ends - begins).days == 825

    # The installed service serves HTTPS with it, and nothing on plain HTTP.
    trust = ssl.create_default_context(cafile=str(certificate))
    server = serve_installed(prefix, tmp_path, f"https://127.0.0.1:{port}", verify=trust)
    try:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    finally:
        stop(server, tmp_path)

    # Running it again keeps the certificate; given files replace it.
    kept = install("--prefix", str(prefix), "--python", sys.executable, "--reuse-packages",
                   "--tls", cwd=tmp_path)
    assert kept.returncode == 0 and "keeping the certificate" in kept.stdout, kept.stderr
    own = tmp_path / "own"
    own.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "30", "-subj", "/CN=images",
                    "-keyout", str(own / "k.pem"), "-out", str(own / "c.pem")],
                   check=True, capture_output=True, timeout=60)
    given = install("--prefix", str(prefix), "--python", sys.executable, "--reuse-packages",
                    "--tls-cert", str(own / "c.pem"), "--tls-key", str(own / "k.pem"),
                    cwd=tmp_path)
    assert given.returncode == 0, given.stdout + given.stderr
    assert certificate.read_bytes() == (own / "c.pem").read_bytes()
    assert key.read_bytes() == (own / "k.pem").read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert f'tls_certificate = "{certificate}"' in config.read_text()

    removed = install("--uninstall", "--prefix", str(prefix), cwd=tmp_path)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not (prefix / "venv").exists() and not appliance.exists()
    assert config.exists() and (model / "model_index.json").exists()
    assert "kept the config" in removed.stdout
    # Nothing of the installation is left behind (the suite's leak search reads every file).
    purged = install("--uninstall", "--purge", "--prefix", str(prefix), cwd=tmp_path)
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert not config.exists() and not model.exists() and not certificate.exists()
    # Backups are never deleted.
    assert (prefix / "var" / "backups").is_dir()
    again = install("--uninstall", "--prefix", str(prefix), cwd=tmp_path)
    assert again.returncode != 0 and "holds no installation made by install.sh" in again.stderr
    print(f"prefix install took {installed_in:.1f} s")


@pytest.mark.system
def test_install_refuses_what_it_cannot_do(tmp_path):
    not_a_model = tmp_path / "nothing"
    not_a_model.mkdir()
    cases = [
        (["--frobnicate"], "unknown option --frobnicate"),
        (["--purge"], "--purge goes with --uninstall"),
        (["--test"], "--test goes with --dev"),
        (["--uninstall", "--prefix", str(tmp_path / "never")], "holds no installation made by"),
        (["--prefix", str(tmp_path / "p"), "--python", "/nonexistent/python"],
         "is not Python 3.11 or newer"),
        (["--prefix", str(tmp_path / "p"), "--tls-cert", str(tmp_path / "a.crt")],
         "--tls-cert and --tls-key go together"),
        (["--dev", "--tls"], "--tls-key go with a system or --prefix install"),
        (["--prefix", str(tmp_path / "p"), "--tls-cert", str(tmp_path / "a.crt"),
          "--tls-key", str(tmp_path / "a.key")], f"{tmp_path / 'a.crt'} is not a file"),
    ]
    for args, message in cases:
        result = install(*args, cwd=tmp_path)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)


def certificate_names(certificate: Path) -> tuple[set[str], set[ipaddress.IPv4Address
                                                             | ipaddress.IPv6Address]]:
    shown = subprocess.run(["openssl", "x509", "-in", str(certificate), "-noout", "-ext",
                            "subjectAltName"], capture_output=True, text=True, check=True,
                           timeout=60).stdout
    entries = [entry.strip() for entry in shown.splitlines()[-1].split(",")]
    names = {entry.removeprefix("DNS:") for entry in entries if entry.startswith("DNS:")}
    addresses = {ipaddress.ip_address(entry.removeprefix("IP Address:"))
                 for entry in entries if entry.startswith("IP Address:")}
    return names, addresses


def machine_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    shown = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=60)
    return {ipaddress.ip_address(word) for word in shown.stdout.split()}


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory) -> Path:
    """An image of the installed system: the unit, its command, and systemd's own units."""
    root = tmp_path_factory.mktemp("root")
    command = root / "opt" / "ai-media-maker" / "venv" / "bin" / "appliance"
    command.parent.mkdir(parents=True)
    command.write_text("#!/bin/sh\n")
    command.chmod(0o755)
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc" / "systemd" / "system" / UNIT.name)
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system",
                    symlinks=True)
    return root


def test_unit_verifies_clean(unit_root):
    result = subprocess.run(["systemd-analyze", "verify", f"--root={unit_root}", UNIT.name],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


def test_unit_hardening_keeps_the_gpu_usable_and_scores_well(unit_root):
    text = UNIT.read_text()
    settings = [line for line in text.splitlines() if line and not line.startswith("#")]
    for wanted in ("Type=notify", "WatchdogSec=60s", "Restart=on-failure", "ProtectSystem=strict",
                   "StateDirectory=ai-media-maker", "CacheDirectory=ai-media-maker",
                   "NoNewPrivileges=yes", "DevicePolicy=closed", "DeviceAllow=/dev/nvidiactl rw",
                   "DeviceAllow=char-nvidia-frontend rw",
                   "Environment=HF_HOME=/var/cache/ai-media-maker/huggingface",
                   "Environment=TRITON_CACHE_DIR=/var/cache/ai-media-maker/triton"):
        assert wanted in settings, wanted
    for breaks_cuda in ("PrivateDevices", "MemoryDenyWriteExecute", "ProcSubset"):
        assert not any(line.startswith(breaks_cuda + "=") for line in settings), breaks_cuda
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--root={unit_root}",
                             UNIT.name], capture_output=True, text=True, timeout=120)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found[1]) <= MOST_EXPOSURE, result.stdout
