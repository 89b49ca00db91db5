"""install.sh --database-url: a node that joins a PostgreSQL database (cluster mode)."""

from __future__ import annotations

import stat
import sys
import time
from urllib.parse import quote

import psycopg
import pytest

from .serve_process import free_port
from .test_install import install

# With an @ in it, the URL carries it percent-encoded: neither form may ever be printed.
PASSWORD = "s3cret-p@ss"
SECRETS = (PASSWORD, quote(PASSWORD, safe=""))


def never_shown(result) -> None:
    shown = result.stdout + result.stderr
    assert not any(secret in shown for secret in SECRETS), shown


@pytest.mark.system
def test_a_prefix_install_joins_a_postgresql_database_and_never_prints_its_password(
        tmp_path, postgres):
    dbname = postgres.new_database().rsplit("/", 1)[1]
    role = f"{dbname}_node"
    # The database's owner, as the README sets it up: it may create the schema and the
    # citext extension. (The test server trusts every local login: the password is
    # carried, not checked.)
    with psycopg.connect(postgres.url("postgres"), autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
        admin.execute(f"ALTER DATABASE {dbname} OWNER TO {role}")
    url = f"postgresql://{role}:{SECRETS[1]}@127.0.0.1:{postgres.port}/{dbname}"
    prefix = tmp_path / "opt"
    config = prefix / "etc" / "config.toml"

    started = time.monotonic()
    joined = install("--prefix", str(prefix), "--python", sys.executable, "--reuse-packages",
                     "--no-model", "--database-url", url, cwd=tmp_path)
    assert joined.returncode == 0, joined.stdout + joined.stderr
    installed_in = time.monotonic() - started
    never_shown(joined)
    assert f"joining the database postgresql://{role}:***@127.0.0.1:{postgres.port}/{dbname}" \
        in joined.stdout
    assert f'database = "{url}"' in config.read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert not (prefix / "var" / "lib" / "appliance.db").exists()
    with psycopg.connect(postgres.url(dbname)) as db:
        applied = {name for (name,) in db.execute("SELECT name FROM appliance_migrations")}
        owner = db.execute("SELECT tableowner FROM pg_tables"
                           " WHERE tablename = 'appliance_migrations'").fetchone()
    assert "m001_initial" in applied
    assert owner == (role,)

    # A URL the service cannot use, or a database that does not answer, fails the run in
    # one line, and the config keeps the database it had. A URL the service cannot use
    # is refused before anything is installed; a database that does not answer is found
    # once the package is, and a config of the operator's that others could read has
    # been made private by then all the same.
    config.chmod(0o644)
    port = free_port()
    for wrong, message in [
        (f"postgresql://{role}:{SECRETS[1]}@127.0.0.1:{port}", "must name a host and a database"),
        (f"postgresql://{role}:{SECRETS[1]}@127.0.0.1:{port}/{dbname}",
         f"the database postgresql://{role}:***@127.0.0.1:{port}/{dbname} cannot be reached"),
    ]:
        refused = install("--prefix", str(prefix), "--python", sys.executable,
                          "--reuse-packages", "--no-model", "--database-url", wrong, cwd=tmp_path)
        assert refused.returncode != 0
        never_shown(refused)
        problem = refused.stderr.strip().splitlines()[-1]
        assert message in problem, refused.stderr
        assert [line for line in refused.stderr.splitlines() if "database" in line] == [problem]
        assert f'database = "{url}"' in config.read_text()
        unusable = message == "must name a host and a database"
        installed = "installing AI Media Maker" in refused.stdout
        tightened = f"made {config} readable by its owner only" in refused.stdout
        assert (installed, tightened) == (not unusable, not unusable), refused.stdout
        assert stat.S_IMODE(config.stat().st_mode) == (0o644 if unusable else 0o600)
    print(f"cluster prefix install took {installed_in:.1f} s")
    # Gone with its copy of the package, whose source holds the suite's test passwords
    # (the end-of-suite search for secrets would find them there).
    purged = install("--uninstall", "--purge", "--prefix", str(prefix), cwd=tmp_path)
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert not (prefix / "venv").exists()


@pytest.mark.system
def test_install_refuses_a_database_url_it_cannot_use_without_printing_it(tmp_path):
    assert "--database-url URL" in install("--help", cwd=tmp_path).stdout
    prefix = str(tmp_path / "p")
    cases = [
        (["--prefix", prefix, "--database-url", f"mysql://node:{PASSWORD}@db/app"],
         "--database-url takes a postgresql:// URL"),
        (["--prefix", prefix, "--database-url", f"node:{PASSWORD}@db/app"],
         "--database-url takes a postgresql:// URL"),
        (["--prefix", prefix, "--database-url", f'postgresql://node:"{PASSWORD}@db/app'],
         "--database-url holds a space, quote or backslash"),
        (["--prefix", prefix, "--database-url",
          f"postgresql://node@db/app?sslmode=require&password={SECRETS[1]}"],
         "not in a password= parameter"),
        (["--dev", "--database-url", f"postgresql://node:{PASSWORD}@db/app"],
         "--database-url goes with a system or --prefix install"),
    ]
    for args, message in cases:
        refused = install(*args, cwd=tmp_path)
        assert refused.returncode != 0 and message in refused.stderr, (args, refused.stderr)
        never_shown(refused)
    assert not (tmp_path / "p").exists()
