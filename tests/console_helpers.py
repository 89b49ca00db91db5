"""Signing in to the console from a TestClient, as a browser's forms would."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from litestar.testing import TestClient

from appliance.core.config import Config
from appliance.web.console import CSRF_COOKIE
from appliance.web.console.sessions import COOKIE_NAME

PASSWORD = "correct horse battery"
HTML = {"Accept": "text/html"}
TIMES = "\u00d7"  # as the pages write a size (64x64) and an adapter's scale
# A second installed model (a copy of the tiny one) and its price, and an adapter for it only.
SECOND_MODEL, SECOND_PRICE = "second", 3
ADAPTER = "watercolor"


def two_models(make_config: Callable[..., Config], tiny_model: Path, folder: Path,
               **sections: Any) -> Config:
    """The tiny model as the default (model.path), a copy named SECOND_MODEL in model.dir at
    SECOND_PRICE credits an image, and the LoRA adapter ADAPTER, which fits the copy only."""
    shutil.copytree(tiny_model, folder / "models" / SECOND_MODEL)
    adapter = folder / "loras" / ADAPTER
    adapter.mkdir(parents=True)
    (adapter / "lora.json").write_text(json.dumps({"base_models": [SECOND_MODEL]}))
    # Never loaded where a stand-in generator replaces the pipeline.
    (adapter / f"{ADAPTER}.safetensors").write_bytes(b"\0" * 16)
    return make_config(model={"dir": str(folder / "models"), "lora_dir": str(folder / "loras")},
                       models={SECOND_MODEL: {"credits_per_image": SECOND_PRICE}}, **sections)


def csrf(http: TestClient) -> str:
    """The token a console form carries: the CSRF cookie's value, got from any page."""
    if CSRF_COOKIE not in http.cookies:
        http.get("/login")
    return http.cookies[CSRF_COOKIE]


def post_form(http: TestClient, path: str, **fields: Any):
    return http.post(path, data={**fields, "_csrf_token": csrf(http)}, follow_redirects=False)


def sign_in(http: TestClient, email: str, password: str = PASSWORD):
    return post_form(http, "/login", email=email, password=password)


def session_id(http: TestClient) -> str | None:
    return http.cookies.get(COOKIE_NAME)


def set_session_cookie(http: TestClient, value: str) -> None:
    """Puts a session id in the client's cookie jar, as a browser (or an attacker) might."""
    http.cookies.delete(COOKIE_NAME)
    http.cookies.set(COOKIE_NAME, value, domain="testserver.local")
