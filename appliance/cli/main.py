"""The `appliance` command."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from appliance.accounts import accounts, audit, keys
from appliance.core.config import Config, ConfigError, load_config
from appliance.core.database import ConnectionPool
from appliance.core.errors import ApplianceError
from appliance.runtime.logs import configure_logging

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

    gen = command("generate", cmd_generate,
                  "generate images through a running server's API and save the PNGs"
                  " (the key comes from $AI_MEDIA_MAKER_API_KEY)")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="one image per prompt")
    gen.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                     help="folder for the PNGs (default: the current one)")
    gen.add_argument("--url", help="the server (default: $AI_MEDIA_MAKER_URL, else the one"
                                   " config.toml describes, http://127.0.0.1:8000)")
    gen.add_argument("--negative-prompt", metavar="TEXT", help="what the images should not show")
    gen.add_argument("--width", type=_whole_number, help="pixels, a multiple of 8")
    gen.add_argument("--height", type=_whole_number, help="pixels, a multiple of 8")
    gen.add_argument("--steps", type=_whole_number, help="denoising steps")
    gen.add_argument("--guidance-scale", type=float, metavar="SCALE", help="guidance scale")
    gen.add_argument("--seed", type=_whole_number,
                     help="base seed: image i uses seed + i, so a run can be repeated")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    backup = command("backup", cmd_backup, "copy the database (online, while the service runs),"
                     " the images and the secret into a new folder")
    backup.add_argument("path", type=Path, help="the folder to create")
    restore = command("restore", cmd_restore, "replace the data with a backup's; the service must"
                      " be stopped (the data replaced is moved aside, not deleted)")
    restore.add_argument("path", type=Path, help="a folder made by `appliance backup`")
    command("doctor", cmd_doctor, "check the GPU, driver, model, database and config, and say"
            " what is wrong")

    bench = command("bench", cmd_bench,
                    "time the plain diffusers loop against the appliance end to end, on the same"
                    " model and settings (defaults: the config's); see BENCHMARKS.md")
    bench.add_argument("--model", type=Path, metavar="DIR", help="model folder")
    bench.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    bench.add_argument("--devices", help="the appliance's GPUs: all, or cuda:0,cuda:1,...")
    bench.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    bench.add_argument("--width", type=_whole_number)
    bench.add_argument("--height", type=_whole_number)
    bench.add_argument("--steps", type=_whole_number)
    bench.add_argument("--guidance", type=float, metavar="SCALE")
    bench.add_argument("--batch-size", type=_whole_number)
    bench.add_argument("--batch-window", type=float, metavar="SECONDS")
    bench.add_argument("--compile", choices=["off", "default", "reduce-overhead", "max-autotune",
                                             "max-autotune-no-cudagraphs"])
    bench.add_argument("--vae-decode-chunk", type=_whole_number, metavar="N")
    bench.add_argument("--tiny-vae", metavar="DIR", help="a folder with an AutoencoderTiny")
    bench.add_argument("--png-compress-level", type=_whole_number, metavar="LEVEL")
    bench.add_argument("--png-threads", type=_whole_number, metavar="N")
    bench.add_argument("--images", type=_whole_number, default=64,
                       help="images the appliance makes (default: 64)")
    bench.add_argument("--baseline-images", type=_whole_number, default=8,
                       help="images the plain loop makes (default: 8)")
    bench.add_argument("--clients", type=_whole_number, default=4,
                       help="concurrent clients, an account each (default: 4)")
    bench.add_argument("--job-size", type=_whole_number, default=8,
                       help="prompts per job (default: 8)")
    bench.add_argument("--poll-seconds", type=float, default=1.0, metavar="SECONDS",
                       help="how often each client asks for its job's status (default: 1, as"
                            " the README's examples)")
    bench.add_argument("--peak-tflops", type=float, default=790.0,
                       help="the GPU's dense half-precision peak, for the compute fraction"
                            " (default: 790, an H100 or H200 SXM)")
    bench.add_argument("--json", type=Path, metavar="FILE",
                       help="results file (default: bench/results/<time>.json)")
    bench.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"), metavar="FILE",
                       help="table to append a row to (default: BENCHMARKS.md)")
    bench.add_argument("--no-record", action="store_true", help="only print the figures")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(getattr(args, "config", None))
        configure_logging(config.logging)
        return args.handler(args, config) or 0
    except (ConfigError, ApplianceError, CommandError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _database(config: Config) -> ConnectionPool:
    return ConnectionPool(config.storage.database, config.storage.busy_timeout_seconds)


def cmd_init(args, config: Config) -> int:
    from appliance.ops.initialise import initialise

    for line in initialise(config):
        print(line)
    return 0


def cmd_serve(args, config: Config) -> int:
    from appliance.ops.initialise import initialise
    from appliance.runtime.serve import run_service

    for line in initialise(config):
        log.info("%s", line)
    host = args.host or config.server.host
    port = args.port or config.server.port
    return run_service(config, host, port)


def _file_problem(exc: OSError) -> CommandError:
    # Run through the installed `appliance` as root, commands run as the service
    # user: a folder only root may write is the usual cause.
    return CommandError(f"{exc.filename or 'a file'}: {exc.strerror or exc}"
                        f" (running as {getpass.getuser()})")


def cmd_backup(args, config: Config) -> int:
    from appliance.ops.backup import create_backup

    try:
        summary = create_backup(config, args.path)
    except OSError as exc:
        raise _file_problem(exc) from None
    print(f"backed up {summary.rows.get('jobs', 0)} jobs, {summary.rows.get('accounts', 0)}"
          f" accounts and {summary.images} images to {summary.path} (integrity check: ok)")
    return 0


def cmd_restore(args, config: Config) -> int:
    from appliance.ops.backup import restore_backup

    try:
        summary = restore_backup(config, args.path)
    except OSError as exc:
        raise _file_problem(exc) from None
    print(f"restored {summary.rows.get('jobs', 0)} jobs, {summary.rows.get('accounts', 0)}"
          f" accounts and {summary.images} images from {args.path}")
    if summary.previous:
        print(f"the data it replaced is kept in {summary.previous}; delete it once the service"
              " works with the restored data")
    return 0


def cmd_doctor(args, config: Config) -> int:
    from appliance.ops.doctor import PROBLEM, diagnose

    findings = diagnose(config)
    for finding in findings:
        print(f"{finding.level:<8} {finding.area:<9} {finding.text}")
    problems = sum(finding.level == PROBLEM for finding in findings)
    print(f"{problems} problem(s) found" if problems else "no problems found")
    return 1 if problems else 0


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
    database = _database(config)
    account = accounts.create_account(database.db(), args.email, password, audit.Actor.cli(),
                                      is_admin=args.admin, credits=args.credits)
    role = "admin" if account.is_admin else "user"
    print(f"created {role} account {account.email} with {account.credits} credits")
    return 0


def cmd_credits_grant(args, config: Config) -> int:
    database = _database(config)
    balance = accounts.grant_credits(database.db(), args.email, args.amount, audit.Actor.cli(),
                                     reason=args.reason)
    print(f"{args.email.strip().lower()} now has {balance} credits")
    return 0


def cmd_keys_create(args, config: Config) -> int:
    db = _database(config).db()
    account = accounts.find_account(db, args.email)
    info, raw = keys.create_key(db, account.id, args.name, audit.Actor.cli())
    print(f"created key {info.name!r} ({info.prefix}) for {account.email}.", file=sys.stderr)
    print("Copy it now: it is shown only this once.", file=sys.stderr)
    print(raw)
    return 0


def cmd_keys_list(args, config: Config) -> int:
    db = _database(config).db()
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
    db = _database(config).db()
    account = accounts.find_account(db, args.email)
    key = keys.delete_key(db, account.id, args.prefix, audit.Actor.cli(), name=args.name)
    print(f"deleted key {key.name!r} ({key.prefix}) of {account.email}; it is refused from now on")
    return 0


def cmd_models_synth(args, config: Config) -> int:
    from appliance.engine.synth import synthesize

    try:
        path = synthesize(args.dir, args.size, seed=args.seed)
    except FileExistsError:
        raise CommandError(f"{args.dir} already exists and is not empty") from None
    print(f"wrote a {args.size} pipeline with random weights to {path}")
    return 0


def cmd_generate(args, config: Config) -> int:
    from appliance.cli.client import Client, ClientError, api_key, default_url, generate

    # httpx logs every request at INFO; here that would bury the progress bar.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    body: dict = {"prompts": args.prompts}
    for option, name in (("negative_prompt", "negativePrompt"), ("width", "width"),
                         ("height", "height"), ("steps", "steps"),
                         ("guidance_scale", "guidanceScale"), ("seed", "seed")):
        if getattr(args, option) is not None:
            body[name] = getattr(args, option)
    try:
        client = Client(args.url or default_url(config), api_key())
        try:
            outcome = generate(client, body, args.out, show_progress=not args.quiet)
        finally:
            client.close()
    except ClientError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        print("appliance: interrupted; the images not yet started were cancelled and refunded",
              file=sys.stderr)
        return 130
    for path in outcome.saved:
        print(path)
    total = len(args.prompts)
    if len(outcome.saved) < total:
        problems = outcome.failed + ([f"{outcome.cancelled} cancelled"] if outcome.cancelled else [])
        problems += [f"{outcome.pending} still pending"] if outcome.pending else []
        raise CommandError(f"{len(outcome.saved)} of {total} images saved (job {outcome.job_id});"
                           f" {'; '.join(problems)}")
    return 0


def cmd_bench(args, config: Config) -> int:
    import json
    from datetime import datetime

    from appliance.bench import (
        append_markdown,
        check_options,
        options_from,
        report_lines,
        run_benchmark,
    )

    devices = args.devices
    if devices and devices != "all":
        devices = tuple(name.strip() for name in devices.split(",") if name.strip())
    options = options_from(
        config, model=args.model, device=args.device, devices=devices, dtype=args.dtype,
        width=args.width, height=args.height, steps=args.steps, guidance=args.guidance,
        batch_size=args.batch_size, batch_window=args.batch_window, compile=args.compile,
        vae_decode_chunk=args.vae_decode_chunk,
        tiny_vae=str(Path(args.tiny_vae).resolve()) if args.tiny_vae else None,
        png_compress_level=args.png_compress_level, png_threads=args.png_threads,
        images=args.images, baseline_images=args.baseline_images, clients=args.clients,
        job_size=args.job_size, peak_tflops=args.peak_tflops, poll_seconds=args.poll_seconds)
    problem = check_options(options)
    if args.model and not (args.model / "model_index.json").is_file():
        # Only the configured model.path is made (the demo model) when missing.
        problem = f"{args.model} is not a diffusers model folder (no model_index.json)"
    if problem:
        raise CommandError(problem)
    # Each request would otherwise be logged at INFO among the figures.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        result = run_benchmark(options)
    except RuntimeError as exc:
        raise CommandError(f"the benchmark failed: {exc}") from None
    for line in report_lines(result):
        print(line)
    if not args.no_record:
        path = args.json or Path("bench/results") / (
            datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{result['architecture']}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        append_markdown(args.markdown, result)
        print(f"results: {path}; a row was added to {args.markdown}")
    return 0


def cmd_models_pull(args, config: Config) -> int:
    from appliance.engine.hub import ModelPullError, pull

    target = args.dir or config.model.path
    try:
        path = pull(args.repo_id, target, revision=args.revision)
    except ModelPullError as exc:
        raise CommandError(str(exc)) from None
    print(f"downloaded {args.repo_id} to {path}")
    if Path(os.path.abspath(path)) != Path(os.path.abspath(config.model.path)):
        print(f"set model.path = \"{path}\" in the config file to use it", file=sys.stderr)
    return 0
