"""`appliance generate`: images from a running server, through its API, saved as PNGs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from appliance.cli.common import WHOLE_NUMBER, CommandError, WholeNumber, pass_config
from appliance.core.config import Config
from appliance.jobs.models import MAX_SEED


class LoraOption(click.ParamType):
    """--lora NAME[:SCALE] -> {"name": NAME, "scale": SCALE}; the server checks both."""

    name = "lora"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        name, colon, scale = value.rpartition(":")
        if not colon:
            return {"name": value}
        try:
            return {"name": name, "scale": float(scale)}
        except ValueError:
            self.fail(f"{value!r}: the scale after ':' must be a number", param, ctx)


@click.command("generate")
@click.argument("prompts", metavar="PROMPT", nargs=-1, required=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("."), metavar="DIR",
              help="folder for the PNGs (default: the current one)")
@click.option("--url", help="the server (default: $AI_MEDIA_MAKER_URL, else the one"
                            " config.toml describes, http://127.0.0.1:8000)")
@click.option("--model", metavar="NAME", help="an installed model (default: the server's default)")
@click.option("--lora", "loras", multiple=True, type=LoraOption(), metavar="NAME[:SCALE]",
              help="apply a LoRA adapter, at SCALE (default 1); repeatable")
@click.option("--negative-prompt", metavar="TEXT", help="what the images should not show")
@click.option("--width", type=WHOLE_NUMBER, help="pixels, a multiple of 8")
@click.option("--height", type=WHOLE_NUMBER, help="pixels, a multiple of 8")
@click.option("--steps", type=WHOLE_NUMBER, help="denoising steps")
@click.option("--guidance-scale", type=float, metavar="SCALE", help="guidance scale")
@click.option("--seed", type=WholeNumber(0, MAX_SEED),
              help="base seed: image i uses seed + i, so a run can be repeated")
@click.option("--quiet", is_flag=True, help="no progress bar")
@pass_config
def generate(config: Config, prompts: tuple[str, ...], out: Path, url: str | None,
             model: str | None, loras: tuple[dict[str, Any], ...], negative_prompt: str | None,
             width: int | None, height: int | None,
             steps: int | None, guidance_scale: float | None, seed: int | None,
             quiet: bool) -> None:
    """generate images through a running server's API and save the PNGs (the key comes from
    $AI_MEDIA_MAKER_API_KEY)

    Each PROMPT makes one image. The saved files are printed, one a line.
    """
    from appliance.cli.client import Client, ClientError, api_key, default_url
    from appliance.cli.client import generate as generate_images

    # httpx logs every request at INFO; here that would bury the progress bar.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    body: dict[str, Any] = {"prompts": list(prompts)}
    if loras:
        body["loras"] = list(loras)
    for name, value in (("model", model), ("negativePrompt", negative_prompt), ("width", width),
                        ("height", height), ("steps", steps),
                        ("guidanceScale", guidance_scale), ("seed", seed)):
        if value is not None:
            body[name] = value
    try:
        client = Client(url or default_url(config), api_key())
        try:
            outcome = generate_images(client, body, out, show_progress=not quiet)
        finally:
            client.close()
    except ClientError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("appliance: interrupted; the images not yet started were cancelled and"
                   " refunded", err=True)
        click.get_current_context().exit(130)
    for path in outcome.saved:
        click.echo(path)
    if len(outcome.saved) < len(prompts):
        problems = list(outcome.failed)
        problems += [f"{outcome.cancelled} cancelled"] if outcome.cancelled else []
        problems += [f"{outcome.pending} still pending"] if outcome.pending else []
        raise CommandError(f"{len(outcome.saved)} of {len(prompts)} images saved"
                           f" (job {outcome.job_id}); {'; '.join(problems)}")

