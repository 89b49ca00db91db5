"""HTTPS: the server's TLS context, from server.tls_certificate and server.tls_key.

In core, below every layer: the service serves with it, and a check of the
config (doctor, install.sh) can load the files just as the service will.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

from appliance.core.config import Config, ConfigError

# Permission bits that let users other than the owner and the group at a file.
_OTHERS = stat.S_IRWXO


def _no_password() -> bytes:
    # Without a password callback, OpenSSL would ask for an encrypted key's
    # password on the terminal and hang a service; with it, such a key fails to load.
    return b""


def _readable_file(key: str, path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{key}: {path} is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{key}: {path} cannot be read by this user")


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The context to serve HTTPS with; None for plain HTTP. A ConfigError names
    what is wrong with the files."""
    server = config.server
    if not server.tls_certificate.strip():
        return None
    certificate = config.resolve(server.tls_certificate)
    key = config.resolve(server.tls_key)
    _readable_file("server.tls_certificate", certificate)
    _readable_file("server.tls_key", key)
    mode = stat.S_IMODE(key.stat().st_mode)
    if mode & _OTHERS:
        raise ConfigError(f"server.tls_key: {key} is open to every user (mode {mode:04o}):"
                          f" make it private with chmod 600 {key}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(certificate, key, password=_no_password)
    except ssl.SSLError as exc:
        raise ConfigError(f"server.tls_certificate {certificate} and server.tls_key {key}"
                          f" cannot be used: {exc.reason or exc} (an unencrypted PEM"
                          " certificate and its own key are needed)") from None
    return context
