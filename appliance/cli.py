"""The `appliance` command."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import accounts, audit, keys
from .config import Config, ConfigError, load_config
from .db import Store
from .errors import ApplianceError

log = logging.getLogger("appliance")


class CommandError(Exception):
    """A problem worded for the operator; printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line instead of argparse's usage block, so scripts log something readable.
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="config file (default: $APPLIANCE_CONFIG, else ./config.toml)")


def _whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="appliance", description="AI Media Maker: bulk image generation.")
    _config_option(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    def command(name: str, handler: Callable, help: str, parent=commands) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, description=help)
        _config_option(sub)
        sub.set_defaults(handler=handler)
        return sub

    command("init", cmd_init, "create the data folder, database and secrets (safe to repeat)")

    serve = command("serve", cmd_serve, "run the HTTP API and the engine")
    serve.add_argument("--host", help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port)")

    account_cmds = commands.add_parser("accounts", help="manage accounts").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    create = command("create", cmd_accounts_create, "create an account", account_cmds)
    create.add_argument("email")
    create.add_argument("--admin", action="store_true", help="make the account an admin")
    create.add_argument("--credits", type=_whole_number, default=0, help="initial credits")
    create.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")

    credit_cmds = commands.add_parser("credits", help="manage credits").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    grant = command("grant", cmd_credits_grant,
                    "add credits to an account (a negative number removes them)", credit_cmds)
    grant.add_argument("email")
    grant.add_argument("amount", type=_whole_number)
    grant.add_argument("--reason", default="grant", help="why, for the ledger")

    key_cmds = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    key_create = command("create", cmd_keys_create,
                         "create an API key; prints it once, as the last line", key_cmds)
    key_create.add_argument("email")
    key_create.add_argument("--name", required=True, help="a descriptive name, e.g. Production")
    key_list = command("list", cmd_keys_list, "list an account's live keys", key_cmds)
    key_list.add_argument("email")
    key_delete = command("delete", cmd_keys_delete, "revoke a key, at once and for good", key_cmds)
    key_delete.add_argument("email")
    key_delete.add_argument("prefix", help="the key's first 12 characters, as listed")
    key_delete.add_argument("--name", help="the key's name, where two keys share a prefix")

    model_cmds = commands.add_parser("models", help="install models").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    synth = command("synth", cmd_models_synth,
                    "write a Stable Diffusion pipeline with random weights", model_cmds)
    synth.add_argument("dir", type=Path)
    synth.add_argument("--size", choices=["tiny", "sd15"], default="tiny",
                       help="tiny: the demo/test model; sd15: SD 1.5-sized, for benchmarks")
    synth.add_argument("--seed", type=int, default=0)
    pull = command("pull", cmd_models_pull,
                   "download a diffusers model from the Hugging Face Hub", model_cmds)
    pull.add_argument("repo_id", help="e.g. stable-diffusion-v1-5/stable-diffusion-v1-5")
    pull.add_argument("dir", type=Path, nargs="?", help="target folder (default: model.path)")
    pull.add_argument("--revision", help="a branch, tag or commit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(getattr(args, "config", None))
        return args.handler(args, config) or 0
    except (ConfigError, ApplianceError, CommandError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _store(config: Config) -> Store:
    return Store(config.storage.database)


def cmd_init(args, config: Config) -> int:
    from .setup import initialise

    for line in initialise(config):
        print(line)
    return 0


def cmd_serve(args, config: Config) -> int:
    import uvicorn

    from .app import create_app
    from .setup import initialise

    for line in initialise(config):
        log.info("%s", line)
    host = args.host or config.server.host
    port = args.port or config.server.port
    # log_config=None: uvicorn's records go through the root logger's format.
    uvicorn.run(create_app(config), host=host, port=port, log_config=None,
                timeout_graceful_shutdown=30)
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CommandError("no password on standard input")
        return password
    if not sys.stdin.isatty():
        raise CommandError("no terminal to ask for the password: use --password-stdin")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != password:
        raise CommandError("the two passwords differ")
    return password


def cmd_accounts_create(args, config: Config) -> int:
    if args.credits < 0:
        raise CommandError("--credits cannot be negative")
    password = _read_password(args.password_stdin)
    store = _store(config)
    account = accounts.create_account(store.db(), args.email, password, audit.Actor.cli(),
                                      is_admin=args.admin, credits=args.credits)
    role = "admin" if account.is_admin else "user"
    print(f"created {role} account {account.email} with {account.credits} credits")
    return 0


def cmd_credits_grant(args, config: Config) -> int:
    store = _store(config)
    balance = accounts.grant_credits(store.db(), args.email, args.amount, audit.Actor.cli(),
                                     reason=args.reason)
    print(f"{args.email.strip().lower()} now has {balance} credits")
    return 0


def cmd_keys_create(args, config: Config) -> int:
    db = _store(config).db()
    account = accounts.find_account(db, args.email)
    info, raw = keys.create_key(db, account.id, args.name, audit.Actor.cli())
    print(f"created key {info.name!r} ({info.prefix}) for {account.email}.", file=sys.stderr)
    print("Copy it now: it is shown only this once.", file=sys.stderr)
    print(raw)
    return 0


def cmd_keys_list(args, config: Config) -> int:
    db = _store(config).db()
    account = accounts.find_account(db, args.email)
    rows = [("NAME", "PREFIX", "LAST USED", "CREATED")] + [
        (k.name, k.prefix, k.last_used_at or "never", k.created_at)
        for k in keys.list_keys(db, account.id)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_keys_delete(args, config: Config) -> int:
    db = _store(config).db()
    account = accounts.find_account(db, args.email)
    key = keys.delete_key(db, account.id, args.prefix, audit.Actor.cli(), name=args.name)
    print(f"deleted key {key.name!r} ({key.prefix}) of {account.email}; it is refused from now on")
    return 0


def cmd_models_synth(args, config: Config) -> int:
    from .engine.synth import synthesize

    try:
        path = synthesize(args.dir, args.size, seed=args.seed)
    except FileExistsError:
        raise CommandError(f"{args.dir} already exists and is not empty") from None
    print(f"wrote a {args.size} pipeline with random weights to {path}")
    return 0


def cmd_models_pull(args, config: Config) -> int:
    from .engine.hub import ModelPullError, pull

    target = args.dir or config.model.path
    try:
        path = pull(args.repo_id, target, revision=args.revision)
    except ModelPullError as exc:
        raise CommandError(str(exc)) from None
    print(f"downloaded {args.repo_id} to {path}")
    if Path(os.path.abspath(path)) != Path(os.path.abspath(config.model.path)):
        print(f"set model.path = \"{path}\" in the config file to use it", file=sys.stderr)
    return 0
