"""Remembers every API key and password the suite makes in-process, and every log line;
once every test of the process has run, searches everything they left on disk
(databases, data folders, server logs) and everything logged for any of them.

The search is the session fixture's last act, so a leak fails the run as an error
at the teardown of its last test. Under pytest-xdist each worker is a process of
its own, with its own base folder: each searches what its own tests made and left.
tests/conftest.py imports the fixture.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance.accounts import accounts, keys

HEX_RUN = re.compile(rb"[0-9a-f]{64}")


@dataclass
class Secrets:
    keys: set[str] = field(default_factory=set)
    passwords: set[str] = field(default_factory=set)
    log_file: Path | None = None


watched = Secrets()


@pytest.fixture(scope="session", autouse=True)
def secret_watch(tmp_path_factory) -> Iterator[Secrets]:
    real_generate, real_hash = keys.generate_key, accounts.hash_password

    def generate_key() -> str:
        key = real_generate()
        watched.keys.add(key)
        return key

    def hash_password(password: str) -> str:
        hashed = real_hash(password)
        # Only passwords that were accepted (and so stored as a hash): a refused
        # one may be as short as "" and would "match" every file.
        watched.passwords.add(password)
        return hashed

    keys.generate_key, accounts.hash_password = generate_key, hash_password
    watched.log_file = tmp_path_factory.getbasetemp() / "suite.log"
    handler = logging.FileHandler(watched.log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root, ours = logging.getLogger(), logging.getLogger("appliance")
    root.addHandler(handler)
    # The appliance's own INFO lines too (key created, job accepted...), where a
    # careless message would name a secret.
    previous_level = ours.level
    ours.setLevel(logging.INFO)
    try:
        yield watched
    finally:
        root.removeHandler(handler)
        ours.setLevel(previous_level)
        handler.close()
        keys.generate_key, accounts.hash_password = real_generate, real_hash
    # Every test of this process has now left its databases, data folders and server
    # logs under the base folder, and every log line of the process is in suite.log.
    assert watched.log_file.exists()
    if not (watched.keys or watched.passwords):
        return  # nothing to look for (the boot test's keys are made inside its machine)
    found = leaks(tmp_path_factory.getbasetemp(), watched.keys, watched.passwords)
    assert not found, "a key or a password was left behind:\n" + "\n".join(found)


def leaks(folder: Path, key_list: set[str], passwords: set[str]) -> list[str]:
    """Where under `folder` a key (whole or its 64 hex characters) or a password appears."""
    hex_parts = {key[len(keys.KEY_PREFIX):].encode() for key in key_list}
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        try:
            data = path.read_bytes()
        except OSError:
            continue  # a socket or a file another test is removing
        if any(match in hex_parts for match in HEX_RUN.findall(data)):
            found.append(f"an API key in {path}")
        for password in passwords:
            if password.encode() in data:
                found.append(f"a password in {path}")
    return found

