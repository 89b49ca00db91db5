"""`appliance models`: put a diffusers model where the engine can load it."""

from __future__ import annotations

import os
from pathlib import Path

import click

from appliance.cli.common import WHOLE_NUMBER, CommandError, CommandGroup, pass_config
from appliance.core.config import Config


@click.group("models", cls=CommandGroup)
def group() -> None:
    """install models"""


@group.command("synth")
@click.argument("target", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--size", type=click.Choice(["tiny", "sd15"]), default="tiny",
              help="tiny: the demo/test model; sd15: SD 1.5-sized, for benchmarks")
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


@group.command("pull")
@click.argument("repo_id")
@click.argument("target", metavar="DIR", required=False, type=click.Path(path_type=Path))
@click.option("--revision", help="a branch, tag or commit")
@pass_config
def pull(config: Config, repo_id: str, target: Path | None, revision: str | None) -> None:
    """download a diffusers model from the Hugging Face Hub

    REPO_ID is the model's repository, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5;
    DIR, the target folder (default: model.path).
    """
    from appliance.engine.hub import ModelPullError
    from appliance.engine.hub import pull as pull_model

    try:
        path = pull_model(repo_id, target or config.model.path, revision=revision)
    except ModelPullError as exc:
        raise CommandError(str(exc)) from None
    click.echo(f"downloaded {repo_id} to {path}")
    if Path(os.path.abspath(path)) != Path(os.path.abspath(config.model.path)):
        click.echo(f"set model.path = \"{path}\" in the config file to use it", err=True)
