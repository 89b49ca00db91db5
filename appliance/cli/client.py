"""`appliance generate`: the HTTP API from a terminal, as a script would call it.

It submits one bulk job, follows it through the job's server-sent events with a
progress bar, and saves the finished PNGs. Every problem becomes one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse
from tqdm import tqdm

from appliance.core.config import Config
from appliance.jobs.models import ImageStatus

API_KEY_ENV = "AI_MEDIA_MAKER_API_KEY"
URL_ENV = "AI_MEDIA_MAKER_URL"
IMAGES = "/api/playground/images"
# Connecting and each request are quick; the event stream may be quiet for as
# long as one batch takes, so it has no read timeout (the server sends
# keep-alives).
TIMEOUT = httpx.Timeout(30.0)
STREAM_TIMEOUT = httpx.Timeout(30.0, read=None)


class ClientError(Exception):
    """A problem worded for the person at the terminal."""


@dataclass
class Outcome:
    job_id: str
    saved: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "image N: why"
    cancelled: int = 0
    pending: int = 0  # images the job had not finished when the stream was lost


def default_url(config: Config) -> str:
    """$AI_MEDIA_MAKER_URL, else this machine's server as config.toml sets it up."""
    if os.environ.get(URL_ENV):
        return os.environ[URL_ENV]
    host = config.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # listening everywhere includes this machine
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.server.port}"


def api_key() -> str:
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise ClientError(f"{API_KEY_ENV} is not set: create a key with `appliance keys create"
                          f" EMAIL --name NAME` and export it")
    return key


def _refusal(response: httpx.Response, what: str) -> ClientError:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    reason = error if isinstance(error, str) else response.reason_phrase
    status = response.status_code
    if status == 401:
        return ClientError(f"the server refused the API key in {API_KEY_ENV}: {reason} (401)")
    if status == 402:
        return ClientError(f"{reason}: the account cannot pay for {what} (402)")
    return ClientError(f"the server refused {what}: {reason} ({status})")


class Client:
    def __init__(self, url: str, key: str, transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=TIMEOUT, transport=transport)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(f"cannot reach the server at {self.url}: {exc or type(exc).__name__}"
                              ) from None
        if response.status_code >= 400:
            raise _refusal(response, what)
        return response

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        count = len(body["prompts"])
        return self._call("POST", IMAGES, f"{count} image{'s' * (count != 1)}", json=body).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"{IMAGES}/{job_id}", "the job's status").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"{IMAGES}/{job_id}", "the cancel").json()

    def follow(self, job_id: str, on_progress: Callable[[dict], None],
               on_image: Callable[[dict], None]) -> dict[str, Any]:
        """Reads the job's events until its `end`; returns the final job."""
        try:
            with connect_sse(self.http, "GET", f"{IMAGES}/{job_id}/events",
                             timeout=STREAM_TIMEOUT) as source:
                if source.response.status_code >= 400:
                    source.response.read()
                    raise _refusal(source.response, "the job's progress")
                for event in source.iter_sse():
                    data = json.loads(event.data) if event.data else {}
                    if event.event == "progress":
                        on_progress(data)
                    elif event.event == "image":
                        on_image(data)
                    elif event.event == "end":
                        return data
        except httpx.TransportError as exc:
            raise ClientError(f"lost the connection to {self.url}: {exc or type(exc).__name__}"
                              ) from None
        except SSEError as exc:
            raise ClientError(f"the server's progress stream is not valid: {exc}") from None
        # The stream ended without its last event (a server restart): ask once more.
        return self.job(job_id)

    def download(self, url: str, path: Path) -> Path:
        response = self._call("GET", url, "the image download")
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_bytes(response.content)
        tmp.replace(path)
        return path


def generate(client: Client, body: dict[str, Any], out_dir: Path,
             show_progress: bool = True) -> Outcome:
    # Before anything is charged: a folder that cannot be made would waste the images.
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClientError(f"cannot use {out_dir} for the images: {exc.strerror}") from None
    submitted = client.submit(body)
    job_id = submitted["jobId"]
    outcome = Outcome(job_id=job_id)
    ended: set[int] = set()
    bar = tqdm(total=submitted["totalImages"], unit="image", disable=not show_progress,
               desc="queued", dynamic_ncols=True)

    def on_progress(event: dict) -> None:
        position = event.get("queuePosition")
        bar.set_description(f"queued, {position} ahead" if position else event["status"])

    def on_image(image: dict) -> None:
        if image["index"] in ended:
            return
        ended.add(image["index"])
        if image["status"] == ImageStatus.COMPLETED:
            path = out_dir / f"{job_id}-{image['index']}.png"
            outcome.saved.append(client.download(image["url"], path))
        elif image["status"] == ImageStatus.FAILED:
            outcome.failed.append(f"image {image['index']}: {image.get('error', 'failed')}")
        else:
            outcome.cancelled += 1
        bar.update(1)

    try:
        with bar:
            final = client.follow(job_id, on_progress, on_image)
            # Whatever the stream did not report (it can end early) is in the job.
            for image in final["images"]:
                if ImageStatus(image["status"]).finished:
                    on_image(image)
            outcome.pending = final["pendingImages"]
    except KeyboardInterrupt:
        # Stopping the client stops the work it asked for: what has not
        # started is cancelled and refunded.
        client.cancel(job_id)
        raise
    outcome.saved.sort()
    return outcome
