"""HTTPS built in: the certificate settings, their checks, and a real server speaking TLS
to httpx and to Chromium, trusting exactly the certificate the test made."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from appliance.accounts import accounts, audit, keys
from appliance.cli.main import main
from appliance.core.config import ConfigError, config_from_dict
from appliance.core.database import ConnectionPool
from appliance.core.tls import tls_context

from .serve_process import STARTUP_TIMEOUT, Launcher, alive, write_config

PASSWORD = "correct horse battery"
HEADER_TIMEOUT = 1.5


def make_certificate(folder: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed EC P-256 certificate for localhost and 127.0.0.1, and its key (0600),
    made with openssl as install.sh --tls makes one."""
    folder.mkdir(parents=True, exist_ok=True)
    certificate, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(certificate)],
                   check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    return certificate, key


def spki_digest(certificate: Path) -> str:
    """Base64 of the SHA-256 of the certificate's public key: what Chromium's
    --ignore-certificate-errors-spki-list trusts."""
    der = ssl.PEM_cert_to_DER_cert(certificate.read_text())
    public_key = subprocess.run(["openssl", "x509", "-inform", "DER", "-pubkey", "-noout"],
                                input=der, capture_output=True, check=True, timeout=60).stdout
    spki = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=public_key,
                          capture_output=True, check=True, timeout=60).stdout
    digest = subprocess.run(["openssl", "dgst", "-sha256", "-binary"], input=spki,
                            capture_output=True, check=True, timeout=60).stdout
    return base64.b64encode(digest).decode()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


def config_with(tmp_path: Path, **server):
    return config_from_dict({"server": server, "storage": {"data_dir": str(tmp_path / "data")}},
                            base_dir=tmp_path, source=tmp_path / "config.toml")


# --- the settings and their checks ----------------------------------------------------


def test_without_certificate_the_service_speaks_plain_http(tmp_path):
    assert tls_context(config_with(tmp_path)) is None


@pytest.mark.parametrize("given", ["tls_certificate", "tls_key"])
def test_a_certificate_without_its_key_or_the_other_way_round_is_refused(tmp_path, given):
    with pytest.raises(ConfigError) as refused:
        config_with(tmp_path, **{given: "server.pem"})
    assert str(refused.value) == ("server.tls_certificate and server.tls_key must be set"
                                  " together (both empty serves plain HTTP)")


def test_a_certificate_and_key_make_a_tls_context_relative_to_the_config(tmp_path):
    make_certificate(tmp_path / "tls")
    context = tls_context(config_with(tmp_path, tls_certificate="tls/server.crt",
                                      tls_key="tls/server.key"))
    assert isinstance(context, ssl.SSLContext)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_unusable_files_are_refused_with_one_line_naming_the_setting(tmp_path):
    certificate, key = make_certificate(tmp_path / "tls")
    other_certificate, other_key = make_certificate(tmp_path / "tls", "other")

    def problem(**server) -> str:
        with pytest.raises(ConfigError) as refused:
            tls_context(config_with(tmp_path, **server))
        assert "\n" not in str(refused.value)
        return str(refused.value)

    assert problem(tls_certificate="missing.crt", tls_key=str(key)) == \
        f"server.tls_certificate: {tmp_path / 'missing.crt'} does not exist"
    assert problem(tls_certificate=str(certificate), tls_key=str(tmp_path)) == \
        f"server.tls_key: {tmp_path} is not a file"
    assert "cannot be used" in problem(tls_certificate=str(certificate), tls_key=str(other_key))
    assert "cannot be used" in problem(tls_certificate=str(key), tls_key=str(key))
    # An encrypted key is refused at once, never asked for on the terminal.
    encrypted = tmp_path / "tls" / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret",
                    "-out", str(encrypted)], check=True, capture_output=True, timeout=60)
    encrypted.chmod(0o600)
    assert "cannot be used" in problem(tls_certificate=str(certificate), tls_key=str(encrypted))
    # A key any user can read is refused; one the group can read is allowed.
    key.chmod(0o644)
    assert problem(tls_certificate=str(certificate), tls_key=str(key)) == \
        f"server.tls_key: {key} is open to every user (mode 0644): make it private with" \
        f" chmod 600 {key}"
    key.chmod(0o640)
    assert tls_context(config_with(tmp_path, tls_certificate=str(certificate),
                                   tls_key=str(key))) is not None
    assert other_certificate.exists()


def test_serve_with_an_unusable_key_stops_with_one_line(tmp_path, capsys,
                                                         root_handlers_restored):
    certificate, key = make_certificate(tmp_path / "tls")
    key.chmod(0o604)
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\ntls_certificate = "{certificate}"\ntls_key = "{key}"\n'
                      f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
                      f'database = "{tmp_path / "data" / "appliance.db"}"\n')
    assert main(["serve", "--config", str(config)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (f"appliance: server.tls_key: {key} is open to every user (mode 0604):"
                     f" make it private with chmod 600 {key}")


# --- a real server over HTTPS ----------------------------------------------------------


class TlsServer:
    """`appliance serve` with a certificate, forked by the launcher, and what reaching it needs."""

    def __init__(self, folder: Path, tiny_model: Path, launcher: Launcher,
                 certificate: tuple[Path, Path]):
        self.certificate, key = certificate
        config = write_config(folder, tiny_model, server={
            "tls_certificate": str(self.certificate), "tls_key": str(key),
            "header_timeout_seconds": HEADER_TIMEOUT})
        port = next(line for line in config.read_text().splitlines() if line.startswith("port"))
        self.port = int(port.split("=")[1])
        self.url = f"https://127.0.0.1:{self.port}"
        self.config = config
        self.log_path = folder / "serve.log"
        self.database_path = folder / "data" / "appliance.db"
        self.pid = launcher.serve(config, self.log_path)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self.ready():
            assert alive(self.pid) and time.monotonic() < deadline, self.log_path.read_text()
            time.sleep(0.1)

    def trust(self) -> ssl.SSLContext:
        """What a client that trusts this certificate, and only it, verifies with."""
        return ssl.create_default_context(cafile=str(self.certificate))

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", verify=self.trust(), timeout=2
                             ).status_code == 200
        except httpx.TransportError:
            return False

    def account_with_key(self, email: str) -> str:
        database = ConnectionPool(self.database_path)
        try:
            account = accounts.create_account(database.db(), email, PASSWORD, audit.Actor.cli(),
                                              credits=4)
            return keys.create_key(database.db(), account.id, "TLS", audit.Actor.cli())[1]
        finally:
            database.close()

    def stop(self) -> None:
        os.kill(self.pid, 15)
        deadline = time.monotonic() + 60
        while alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(self.pid):
            os.kill(self.pid, 9)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, tiny_model, launcher, certificate):
    server = TlsServer(tmp_path_factory.mktemp("tls-server"), tiny_model, launcher, certificate)
    yield server
    server.stop()


@pytest.mark.system
def test_the_api_answers_over_https_to_a_client_that_trusts_the_certificate(tls_server):
    key = tls_server.account_with_key("tls@example.com")
    trusted = httpx.Client(base_url=tls_server.url, verify=tls_server.trust(),
                           headers={"Authorization": f"Bearer {key}"}, timeout=30)
    with trusted:
        created = trusted.post("/api/playground/images", json={"prompts": ["a lighthouse"]})
        assert created.status_code == 200, created.text
        job_id = created.json()["jobId"]
        deadline = time.monotonic() + 60
        while (job := trusted.get(f"/api/playground/images/{job_id}").json())["status"] not in (
                "completed", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job["status"] == "completed"
        # The links the API hands out lead back over HTTPS, and work.
        url = job["images"][0]["url"]
        assert url.startswith(f"{tls_server.url}/")
        image = trusted.get(url)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    # A client that does not trust it stops at the handshake.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_server.url}/healthz", timeout=10)
    assert "ready: serving on https://" in tls_server.log_path.read_text()


@pytest.mark.system
def test_doctor_finds_the_service_ready_over_https(tls_server):
    result = subprocess.run([sys.executable, "-m", "appliance", "doctor", "--config",
                             str(tls_server.config)], capture_output=True, text=True, timeout=120)
    assert f"ready at {tls_server.url}/readyz" in result.stdout, result.stdout + result.stderr


@pytest.mark.system
def test_plain_http_is_not_served_on_the_https_port(tls_server):
    lines_before = len(tls_server.log_path.read_text().splitlines())
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{tls_server.port}/healthz", timeout=10)
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = sock.recv(4096)
    assert b"HTTP/1.1" not in answer and b'{"status"' not in answer
    # A failed handshake is the client's problem: nothing about it in the log.
    time.sleep(0.2)
    new_lines = tls_server.log_path.read_text().splitlines()[lines_before:]
    assert not [line for line in new_lines if "level=warning" in line or "level=error" in line]


@pytest.mark.system
def test_silent_connections_to_the_https_port_are_closed_at_the_header_deadline(tls_server):
    context = tls_server.trust()
    started = time.monotonic()
    # One that never starts the handshake, one that completes it and says nothing.
    raw = socket.create_connection(("127.0.0.1", tls_server.port), timeout=10)
    secured = context.wrap_socket(socket.create_connection(("127.0.0.1", tls_server.port),
                                                           timeout=10),
                                  server_hostname="127.0.0.1")
    with raw, secured:
        assert raw.recv(1024) == b""
        assert secured.recv(1024) == b""
    took = time.monotonic() - started
    assert HEADER_TIMEOUT - 0.1 <= took < HEADER_TIMEOUT + 1.5, took


@pytest.mark.system
def test_the_console_signs_in_through_chromium_over_https_with_secure_cookies(
        tls_server, tmp_path):
    # Imported here: that module skips itself where chromium is missing, which must not
    # skip this module's other tests.
    from .browser_helpers import CHROMIUM, CHROMIUM_ARGS
    sync_playwright = pytest.importorskip("playwright.sync_api")
    tls_server.account_with_key("console@example.com")
    # Chromium trusts exactly the certificates whose public keys it is given.
    stranger, _ = make_certificate(tmp_path, "stranger")
    with sync_playwright.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            *CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki_digest(stranger)}"])
        try:
            with pytest.raises(sync_playwright.Error, match="ERR_CERT_AUTHORITY_INVALID"):
                browser.new_page().goto(f"{tls_server.url}/login")
        finally:
            browser.close()
        trust = f"--ignore-certificate-errors-spki-list={spki_digest(tls_server.certificate)}"
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=[*CHROMIUM_ARGS, trust])
        try:
            context = browser.new_context(base_url=tls_server.url)
            page = context.new_page()
            response = page.goto("/login")
            assert response is not None and response.ok
            assert response.headers.get("strict-transport-security", "").startswith("max-age=")
            page.fill("input[name=email]", "console@example.com")
            page.fill("input[name=password]", PASSWORD)
            page.click("button:has-text('Sign in')")
            page.wait_for_url(f"{tls_server.url}/console")
            assert page.inner_text("[data-testid=balance]") == "4"
            cookies = context.cookies()
            assert cookies, "the console set no cookie"
            assert all(cookie["secure"] for cookie in cookies), cookies
        finally:
            browser.close()
