"""Signing in to the console from a TestClient, as a browser's forms would."""

from __future__ import annotations

from typing import Any

from litestar.testing import TestClient

from appliance.web.console import CSRF_COOKIE
from appliance.web.console.sessions import COOKIE_NAME

PASSWORD = "correct horse battery"
HTML = {"Accept": "text/html"}


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
