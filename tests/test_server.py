"""End to end against a real `appliance serve` process, as a newcomer would use it."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from appliance.bench.serving import answers_ok

from .serve_process import cli, free_port

pytestmark = pytest.mark.system

DOC_PROMPTS = ["A beautiful sunset over the ocean", "A futuristic cityscape"]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    config = tmp_path / "config.toml"
    # No model folder: serve must make the tiny demo model by itself.
    config.write_text(
        f'[server]\nport = {port}\n'
        '[model]\npath = "models/demo"\ndevice = "cpu"\n'
        '[generation]\nwidth = 64\nheight = 64\nsteps = 2\n'
    )
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(config)],
                                   stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    if not answers_ok(f"{base}/healthz", lambda: process.poll() is None, 120):
        process.kill()
        raise AssertionError(f"server did not start:\n{log_path.read_text()}")
    yield base, config, process, log_path
    if process.poll() is None:
        process.kill()
        process.wait()


def test_documented_curl_flow_on_a_real_server(server, tmp_path):
    base, config, process, log_path = server
    cli(config, "accounts", "create", "dev@example.com", "--credits", "6", "--password-stdin",
        stdin="correct horse battery\n")
    key = cli(config, "keys", "create", "dev@example.com", "--name", "Production").splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    created = httpx.post(f"{base}/api/playground/images", json={"prompts": DOC_PROMPTS},
                         headers=headers, timeout=30)
    assert created.status_code == 200
    body = created.json()
    assert {k: v for k, v in body.items() if k != "jobId"} == {
        "totalImages": 2, "creditsUsed": 2, "credits": 4}

    deadline = time.monotonic() + 120
    while True:
        job = httpx.get(f"{base}/api/playground/images/{body['jobId']}", headers=headers,
                        timeout=30).json()
        if job["status"] in ("completed", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert job["status"] == "completed", job
    for image in job["images"]:
        assert image["url"].startswith(base)
        png = httpx.get(image["url"], headers=headers, timeout=30)
        Image.open(io.BytesIO(png.content)).verify()
    assert (tmp_path / "models" / "demo" / "model_index.json").exists()

    process.send_signal(signal.SIGTERM)
    # uvicorn shuts down cleanly, then re-raises the signal so the exit says why.
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    log = log_path.read_text()
    assert "Application shutdown complete" in log
    assert "tiny demo model" in log
    assert key not in log and key[12:] not in log
