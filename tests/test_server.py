"""End to end against a real `appliance serve` process, as a newcomer would use it."""

from __future__ import annotations

import io
import signal
import time

import httpx
import pytest
from PIL import Image

from .serve_process import ServeProcess, cli, write_config

pytestmark = pytest.mark.system

DOC_PROMPTS = ["A beautiful sunset over the ocean", "A futuristic cityscape"]


def test_documented_curl_flow_on_a_real_server(fresh_server, tmp_path):
    base, config, process, log_path = fresh_server
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
    # A line a request, by default (logging.access_log).
    assert 'logger=appliance.access msg="127.0.0.1:' in log and "path=/api/playground/images" in log
    assert key not in log and key[12:] not in log


def test_with_the_access_log_off_requests_are_counted_but_not_logged(tmp_path, tiny_model,
                                                                    launcher):
    config = write_config(tmp_path, tiny_model, logging={"access_log": False})
    server = ServeProcess(config, tmp_path / "serve.log", launcher).start()
    try:
        for _ in range(3):
            assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    finally:
        server.stop()
    assert ('appliance_http_requests_total{app_name="appliance",method="GET",'
            'path="/healthz",status_code="200"} 3.0') in metrics
    log = (tmp_path / "serve.log").read_text()
    assert "ready: serving" in log  # the service's own lines still come
    assert "logger=appliance.access" not in log
