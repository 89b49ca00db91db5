"""Who may see a console page, the headers every console response carries, and what every
response over HTTPS carries."""

from __future__ import annotations

import time
from typing import Any

import anyio.to_thread
from litestar.connection import ASGIConnection
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Guard, Message, Receive, Scope, Send

from appliance.accounts import audit
from appliance.accounts.accounts import Account
from appliance.accounts.service import AccountService
from appliance.core.config import ConsoleConfig
from appliance.core.errors import ApplianceError, Forbidden, NotFound

MAX_USER_AGENT = 300

# No inline script or style anywhere in the console, so the policy can be strict.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}

# A year. No includeSubDomains: the appliance does not speak for the other
# hosts of the domain it is reached under.
STRICT_TRANSPORT_SECURITY = "max-age=31536000"


async def over_https(message: Message, scope: Scope) -> None:
    """The app's before-send hook: over HTTPS, browsers are told to stay on HTTPS, and every
    cookie is Secure, so that it never travels in the clear.

    The scheme is the connection's, or the one a proxy named in X-Forwarded-Proto
    when uvicorn trusts that proxy (its forwarded_allow_ips: this machine only,
    unless FORWARDED_ALLOW_IPS says otherwise). Litestar's CSRF cookie is Secure
    only by configuration; this makes it follow the request.
    """
    if message["type"] != "http.response.start" or scope.get("scheme") != "https":
        return
    headers = [(name, _secure_cookie(value) if name.lower() == b"set-cookie" else value)
               for name, value in message.get("headers", [])
               if name.lower() != b"strict-transport-security"]
    headers.append((b"strict-transport-security", STRICT_TRANSPORT_SECURITY.encode()))
    message["headers"] = headers


def _secure_cookie(set_cookie: bytes) -> bytes:
    attributes = {part.strip().lower() for part in set_cookie.split(b";")[1:]}
    return set_cookie if b"secure" in attributes else set_cookie + b"; Secure"


class SignInRequired(ApplianceError):
    status = 401

    def __init__(self, message: str = "Sign in to use the console"):
        super().__init__(message)


class SecurityHeadersMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                add_security_headers(MutableScopeHeaders.from_message(message))
            await send(message)

        await next_app(scope, receive, send_with_headers)


def add_security_headers(headers: Any) -> None:
    for name, value in SECURITY_HEADERS.items():
        headers[name] = value
    # Console pages show private data: no shared or back-button caches,
    # unless the handler chose otherwise (images).
    if "cache-control" not in headers:
        headers["Cache-Control"] = "no-store"


def actor(connection: ASGIConnection, by: str | None = None) -> audit.Actor:
    agent = connection.headers.get("user-agent")
    return audit.Actor(
        ip_address=connection.client.host if connection.client else None,
        user_agent=agent[:MAX_USER_AGENT] if agent else None,
        by=by,
    )


def start_session(connection: ASGIConnection, account: Account) -> None:
    connection.set_session({"account_id": account.id, "signed_in_at": time.time()})


def signed_in_guard(accounts: AccountService, console: ConsoleConfig) -> Guard:
    """A guard: a live session of an enabled account, within the absolute timeout.

    The account is read on every request, so disabling it signs it out at once.
    """

    async def signed_in(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        session = connection.session if "session" in connection.scope else {}
        account_id = session.get("account_id") if isinstance(session, dict) else None
        if not isinstance(account_id, int):
            raise SignInRequired()
        started = session.get("signed_in_at")
        if not isinstance(started, (int, float)) or \
                time.time() - started > console.absolute_timeout_hours * 3600:
            connection.clear_session()
            raise SignInRequired("Your sign-in has expired; sign in again")
        try:
            account: Account | None = await anyio.to_thread.run_sync(accounts.get, account_id)
        except NotFound:
            account = None
        if account is None or account.disabled:
            connection.clear_session()
            raise SignInRequired()
        connection.scope["user"] = account

    return signed_in


async def admins_only(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    if not connection.user.is_admin:
        raise Forbidden("Only administrators can open this page")
