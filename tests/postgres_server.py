"""A PostgreSQL server of the tests' own, from Debian's server binaries, in a folder of its own.

The cluster-mode tests run the store on PostgreSQL. Nothing here touches a system cluster:
the server is made with initdb in a fresh folder, listens on 127.0.0.1 at a free port, and
is removed with its folder at the end. Durability is switched off (fsync, synchronous
commit, full-page writes): a test server's data need not survive a power cut, and the
tests are several times faster without it.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import pytest

from appliance.bench.serving import free_port

# Debian installs each major version's server binaries here (package postgresql-NN).
DEBIAN_BIN_DIRS = "/usr/lib/postgresql/*/bin"
MISSING = "PostgreSQL's server binaries are not installed (./install.sh --dev --test installs them)"
# initdb and pg_ctl refuse to run as root; Debian's package makes this system user.
SERVER_USER = "postgres"
SUPERUSER = "postgres"
# Seconds pg_ctl waits for the server to start or stop before it gives up.
PG_CTL_WAIT = 60
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    # The cluster-mode tests run several appliance processes, each with a pool.
    "max_connections": "300",
}
# Where the server's folder goes when it has room: a RAM-backed file system. Each new
# database is some 300 files copied from template0, and creating them on a disk took
# 50-120 ms a database where this takes 10-20 ms. Every user can reach it (mode 1777).
RAM_FOLDER = Path("/dev/shm")
# Each database takes some 8 MB; room for a few hundred of them, else the temp folder.
RAM_FOLDER_ROOM = 4 << 30


def _has_server(bin_dir: Path) -> bool:
    return (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file()


def _version(bin_dir: Path) -> tuple[int, ...]:
    """(15,) for /usr/lib/postgresql/15/bin, (9, 6) for .../9.6/bin: compared as numbers,
    so that 15 ranks above 9.6."""
    return tuple(int(part) for part in re.findall(r"\d+", bin_dir.parent.name))


def postgres_bin_dir() -> Path | None:
    """The folder of the newest installed initdb and pg_ctl; None when there are none."""
    debian = [Path(path) for path in glob.glob(DEBIAN_BIN_DIRS) if _has_server(Path(path))]
    if debian:
        return max(debian, key=_version)
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    # Debian's /usr/bin/pg_config (libpq-dev) names /usr/bin, which has no initdb:
    # hence the check rather than trusting it.
    found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
    bin_dir = Path(found.stdout.strip())
    return bin_dir if found.returncode == 0 and _has_server(bin_dir) else None


def server_parent() -> str:
    """The RAM-backed folder where it exists with room to spare, else the temp folder: never
    pytest's tmp_path, whose 0700 parents the server's user cannot pass when we are root."""
    if (os.access(RAM_FOLDER, os.W_OK | os.X_OK)
            and shutil.disk_usage(RAM_FOLDER).free > RAM_FOLDER_ROOM):
        return str(RAM_FOLDER)
    return tempfile.gettempdir()


def require_postgres() -> Path:
    """The binaries' folder; where they are missing, skips the test, or fails it under CI,
    where a missing server must not pass unnoticed."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    return bin_dir


class PostgresServer:
    """One server: its binaries, its folder (data and log) and its port on 127.0.0.1."""

    def __init__(self, bin_dir: Path, folder: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.folder = folder
        self.port = port
        self.data = folder / "data"
        self.log = folder / "server.log"
        self._numbers = itertools.count(1)

    @classmethod
    def start(cls, folder: Path | None = None, bin_dir: Path | None = None) -> PostgresServer:
        """initdb in `folder` (by default a new one under server_parent()), then starts the
        server and waits until it answers."""
        bin_dir = bin_dir or postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError(MISSING)
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="appliance-pg-", dir=server_parent()))
        server = cls(bin_dir, folder, free_port())
        try:
            server._initdb()
            server.start_server()
        except BaseException:
            server.remove_folder()
            raise
        return server

    def _as_server_user(self) -> dict[str, Any]:
        """subprocess arguments that run a command as the postgres user when we are root."""
        if os.geteuid() != 0:
            return {}
        user = pwd.getpwnam(SERVER_USER)
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def _run(self, *command: str) -> None:
        tool = self.bin_dir / command[0]
        done = subprocess.run([str(tool), *command[1:]], capture_output=True, text=True,
                              cwd=self.folder, timeout=PG_CTL_WAIT + 30,
                              **self._as_server_user())
        if done.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}\n{log}")

    def _initdb(self) -> None:
        if os.geteuid() == 0:
            user = pwd.getpwnam(SERVER_USER)
            os.chown(self.folder, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync")
        # In postgresql.conf rather than on pg_ctl's command line, so that a restart keeps
        # them, the port above all.
        settings = {**SETTINGS, "port": str(self.port),
                    "unix_socket_directories": f"'{self.folder}'"}
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# The test server's own settings.\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def _pg_ctl(self, action: str, *options: str) -> None:
        self._run("pg_ctl", action, "-D", str(self.data), "-l", str(self.log),
                  "-w", "-t", str(PG_CTL_WAIT), *options)

    def url(self, dbname: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A new, empty database of its own for one test; its URL."""
        name = f"appliance_test_{next(self._numbers)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as admin:
            # file_copy copies template0's files as they are; the default (wal_log)
            # writes them all through the WAL as well, which took twice as long.
            admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY file_copy")
        return self.url(name)

    def start_server(self) -> None:
        """Starts the server on its data, on its port; returns once it answers."""
        self._pg_ctl("start")

    def stop_server(self) -> None:
        """Stops the server, ending every connection, and keeps its data: for tests of the
        database going away; start_server() brings it back on the same URL. A clean stop
        rather than an immediate one: with synchronous_commit off, an immediate stop could
        lose the last commits, and the data is the point of coming back."""
        self._pg_ctl("stop", "-m", "fast")

    def restart(self) -> None:
        """Stops the server cleanly (ending every connection) and starts it again."""
        self._pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        """Stops the server if it runs, and removes its folder with its data."""
        try:
            if (self.data / "postmaster.pid").exists():
                # Immediate: the data is about to be removed, so nothing is worth writing out.
                self._pg_ctl("stop", "-m", "immediate")
        finally:
            self.remove_folder()

    def remove_folder(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
