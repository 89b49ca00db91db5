"""`appliance models`: the installed models (model.dir), and putting one there.

A running service reads model.dir again every few seconds (jobs/catalog.py), so
these commands change what it serves without a restart. Both pull and remove
work under a hidden name (a leading dot, which no model name has) and rename at
the end: the service never sees half a model.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import click

from appliance.cli.common import WHOLE_NUMBER, CommandError, CommandGroup, pass_config
from appliance.core.config import Config
from appliance.engine.synth import ALLOWED_SIZES
from appliance.jobs.catalog import NAME, RESCAN_SECONDS, Catalog, InstalledModel

# A model being downloaded: kept on failure, so that pulling again resumes it.
PULLING_PREFIX = ".pulling-"
# In a download's folder: the repository and revision being downloaded into it.
PULL_SOURCE = ".pull-source"
REMOVING_PREFIX = ".removing-"


@click.group("models", cls=CommandGroup)
def group() -> None:
    """install, list and remove models"""


def _disk_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _model_row(model: InstalledModel, default_name: str, demo_path: Path) -> tuple[str, ...]:
    from appliance.core.numbers import size_text

    name = f"{model.name} (default)" if model.name == default_name else model.name
    problem = model.problem or ""
    if not model.path.exists() and model.path == demo_path:
        problem = "not created yet: the service makes the tiny demo model here when it starts"
    defaults = model.defaults
    return (name, model.pipeline or "-", f"{defaults.width}x{defaults.height}",
            str(defaults.steps), str(model.credits_per_image),
            size_text(_disk_bytes(model.path)) if model.path.exists() else "-", problem)


def _echo_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo("  ".join(cells).rstrip())


@group.command("list")
@pass_config
def list_models(config: Config) -> None:
    """list the installed models, then the LoRA adapters and the models they fit"""
    catalog = Catalog(config)
    _echo_table([("NAME", "PIPELINE", "SIZE", "STEPS", "CREDITS", "DISK", "PROBLEM")] + [
        _model_row(model, catalog.default_name, config.model.path)
        for model in catalog.models()])
    loras = catalog.loras()
    if loras:
        click.echo()
        _echo_table([("LORA", "FITS")] + [(lora.name, ", ".join(lora.base_models))
                                          for lora in loras])


@group.command("synth")
@click.argument("target", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--size", type=click.Choice(ALLOWED_SIZES), default="tiny",
              help="tiny: the demo/test model; sd15: SD 1.5-sized, for benchmarks; "
                   "tiny-sdxl: a tiny Stable Diffusion XL model")
@click.option("--seed", type=WHOLE_NUMBER, default=0, help="seed of the random weights")
@pass_config
def synth(config: Config, target: Path, size: str, seed: int) -> None:
    """write a Stable Diffusion pipeline with random weights

    DIR is the folder to write it to; it must not exist, or be empty.
    """
    from appliance.engine.synth import synthesize

    try:
        path = synthesize(target, size, seed=seed)
    except FileExistsError:
        raise CommandError(f"{target} already exists and is not empty") from None
    click.echo(f"wrote a {size} pipeline with random weights to {path}")


def _same_place(one: Path, other: Path) -> bool:
    return os.path.abspath(one) == os.path.abspath(other)


@group.command("pull")
@click.argument("repo_id")
@click.argument("name", required=False)
@click.option("--revision", help="a branch, tag or commit")
@pass_config
def pull(config: Config, repo_id: str, name: str | None, revision: str | None) -> None:
    """download a diffusers model from the Hugging Face Hub into model.dir

    REPO_ID is the model's repository, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5;
    NAME, the name requests ask for it by (default: the repository's last part,
    lowercased). An interrupted download resumes when pulled again.
    """
    name = name if name is not None else repo_id.rsplit("/", 1)[-1].lower()
    if not NAME.fullmatch(name):
        raise CommandError(f"{name!r} cannot be a model's name: use letters, digits, '.', '_'"
                           " and '-', starting with a letter or digit, at most 100 characters"
                           " (pass NAME after REPO_ID)")
    installed = {model.name: model for model in Catalog(config).models()}
    target = config.models_dir / name
    if name in installed and installed[name].path.exists():
        raise CommandError(f"a model named {name!r} is already installed: remove it first"
                           f" (appliance models remove {name})")
    # model.path's demo model, not made yet, may be replaced by a real one in its place.
    if name in installed and not _same_place(installed[name].path, target):
        raise CommandError(f"{name!r} is the name of model.path ({installed[name].path}):"
                           " choose another NAME")
    if target.exists():
        raise CommandError(f"{target} exists but holds no model: delete it, or choose another"
                           " NAME")
    from appliance.engine.hub import ModelPullError
    from appliance.engine.hub import pull as pull_model

    staging = config.models_dir / f"{PULLING_PREFIX}{name}"
    source = staging / PULL_SOURCE
    wanted = f"{repo_id}@{revision or ''}"
    try:
        if staging.exists() and (not source.is_file() or source.read_text() != wanted):
            shutil.rmtree(staging)  # another repository's files, not a download to resume
        staging.mkdir(parents=True, exist_ok=True)
        source.write_text(wanted)
        pull_model(repo_id, staging, revision=revision)
        source.unlink()
        os.rename(staging, target)
    except ModelPullError as exc:
        raise CommandError(f"{exc} (what was downloaded stays in {staging}; the same command"
                           " resumes it)") from None
    except OSError as exc:
        raise CommandError(f"cannot install the model in {target}: {exc}") from None
    click.echo(f"downloaded {repo_id} to {target}; a running service offers it as the model"
               f" {name!r} within {RESCAN_SECONDS:g} seconds")


def _confirmed(question: str) -> bool:
    try:
        return click.confirm(question)
    except click.Abort:  # no answer: standard input ended (a script without --yes)
        click.echo()  # ends the question's line
        raise CommandError("nothing removed: no answer to the question (pass --yes to remove"
                           " without asking)") from None


@group.command("remove")
@click.argument("name")
@click.option("--yes", is_flag=True, help="remove it without asking")
@pass_config
def remove(config: Config, name: str, yes: bool) -> None:
    """delete an installed model's folder from model.dir

    NAME is the model's name, as `appliance models list` shows it. Requests
    naming it are refused from then on.
    """
    catalog = Catalog(config)
    model = next((model for model in catalog.models() if model.name == name), None)
    if model is None:
        raise CommandError(f"no model named {name!r} is installed; installed: "
                           f"{catalog.installed_text()}")
    if name == catalog.default_name:
        raise CommandError(f"{name!r} is the default model: set model.default to another one"
                           " in the config file first")
    model_dir = config.models_dir
    if not _same_place(model.path.parent, model_dir):
        raise CommandError(f"{name!r} is model.path ({model.path}), outside model.dir"
                           f" ({model_dir}): change model.path in the config file instead")
    if not yes and not _confirmed(f"delete {model.path} (the model {name!r})?"):
        raise CommandError("nothing removed")
    # Renamed away first: the rest of the deletion is under a name no scan reads.
    aside = model_dir / f"{REMOVING_PREFIX}{name}-{os.getpid()}"
    try:
        os.rename(model.path, aside)
    except OSError as exc:
        raise CommandError(f"cannot remove {model.path}: {exc}") from None
    try:
        shutil.rmtree(aside)
    except OSError as exc:
        raise CommandError(f"the model {name!r} is no longer offered, but deleting its files"
                           f" failed ({exc}): delete {aside} by hand") from None
    click.echo(f"removed the model {name!r} ({model.path}); a running service stops offering it"
               f" within {RESCAN_SECONDS:g} seconds")
