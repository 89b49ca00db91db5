"""`appliance generate` against a real server: PNGs saved, one clear line for each problem."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from PIL import Image

from appliance.accounts import accounts
from appliance.cli.main import cli

from .live_server import LiveServer, free_port


@pytest.fixture
def live(make_config):
    with LiveServer(make_config()) as server:
        yield server


# The command points the root logger at CliRunner's stderr, which closes after it.
pytestmark = pytest.mark.usefixtures("root_handlers_restored")


def invoke(key: str | None, *args: str) -> tuple[int, str, str]:
    """The command in this process, for what needs no server."""
    env = {"AI_MEDIA_MAKER_API_KEY": key, "AI_MEDIA_MAKER_URL": None}
    result = CliRunner(env=env).invoke(cli, ["generate", *args])
    return result.exit_code, result.stdout, result.stderr


def run(key: str | None, *args: str) -> tuple[int, str, str]:
    """The command as a user runs it, in its own process, the key in its environment."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("AI_MEDIA_MAKER_API_KEY", "AI_MEDIA_MAKER_URL")}
    if key is not None:
        env["AI_MEDIA_MAKER_API_KEY"] = key
    result = subprocess.run([sys.executable, "-m", "appliance", "generate", *args], env=env,
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.system
def test_generate_saves_one_png_per_prompt_with_a_progress_bar(live, tmp_path):
    account, key = live.account_with_key(credits=5)
    out_dir = tmp_path / "out"

    code, out, err = run(key, "a red fox", "a blue whale", "--out", str(out_dir),
                         "--url", live.url, "--width", "72", "--seed", "11")

    assert code == 0, err
    saved = [line for line in out.splitlines() if line]
    assert len(saved) == 2 and all(path.startswith(str(out_dir)) for path in saved)
    for path in saved:
        with Image.open(path) as image:
            assert (image.format, image.size) == ("PNG", (72, 64))
    assert "2/2" in err  # the progress bar reached the end
    assert key not in out + err
    job = live.db.execute("SELECT seed, settings FROM jobs").fetchone()
    assert job[0] == 11 and '"width": 72' in job[1]
    assert live.balance(account) == 3 == accounts.ledger_total(live.db, account.id)


@pytest.mark.system
def test_refusals_are_one_line_and_charge_nothing(live, tmp_path):
    rich, rich_key = live.account_with_key("rich@example.com", credits=5)
    poor, poor_key = live.account_with_key("poor@example.com", credits=1)
    cases = [
        ("wi_live_" + "0" * 64, [], "the server refused the API key in AI_MEDIA_MAKER_API_KEY:"
                                    " Invalid API key (401)"),
        ("sk-123", [], "the server refused the API key in AI_MEDIA_MAKER_API_KEY:"
                       " Invalid API key format (401)"),
        (poor_key, [], "Insufficient credits: the account cannot pay for 2 images (402)"),
        (rich_key, ["--steps", "500"], "the server refused 2 images: 'steps' is 500; it must be"
                                       " from 1 to 100 (400)"),
        (rich_key, ["--model", "nope"], "the server refused 2 images: 'model' is 'nope', which"
                                        " is not installed here; installed: tiny (see GET"
                                        " /api/models) (400)"),
        (rich_key, ["--lora", "brand:0.5"], "the server refused 2 images: 'loras[0].name' is"
                                            " 'brand', which is not installed here; installed:"
                                            " none (400)"),
    ]
    for key, args, message in cases:
        code, out, err = run(key, "a", "b", "--out", str(tmp_path / "out"), "--url", live.url,
                             *args)
        assert (code, out, err) == (1, "", f"appliance: {message}\n")
    assert (live.balance(rich), live.balance(poor)) == (5, 1)
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_key_and_unreachable_server_are_one_line(tmp_path):
    code, out, err = invoke(None, "a", "--url", "http://127.0.0.1:9")
    assert code == 1 and out == ""
    assert err.startswith("appliance: AI_MEDIA_MAKER_API_KEY is not set")
    assert err.count("\n") == 1

    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = invoke("wi_live_" + "0" * 64, "a", "--url", url, "--out", str(tmp_path))
    assert code == 1 and out == ""
    assert err.startswith(f"appliance: cannot reach the server at {url}: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("a", "--width", "wide"), "argument --width: 'wide' is not a whole number"),
        (("a", "--guidance-scale", "high"),
         "argument --guidance-scale: 'high' is not a valid float"),
        ((), "the following arguments are required: PROMPT"),
        (("a", "--lora", "brand:strong"),
         "argument --lora: 'brand:strong': the scale after ':' must be a number"),
    ],
)
def test_bad_arguments_are_one_line(args, message):
    code, out, err = invoke(None, *args)
    assert (code, out) == (2, "")
    assert err == f"appliance generate: {message} (see appliance generate --help)\n"
