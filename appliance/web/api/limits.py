"""Limits against abuse: a request rate per API key, and the host names the server answers to."""

from __future__ import annotations

import ipaddress
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable

from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from appliance.core.config import ServerConfig
from appliance.core.errors import BadRequest, TooManyRequests


class KeyRateLimiter:
    """A token bucket per API key: bursts of up to `per_minute` requests, refilled evenly.

    Counted after the key is known, so a flood of made-up keys cannot grow it;
    it is bounded by the number of real keys.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.capacity = per_minute
        self.per_second = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[int, tuple[float, float]] = {}  # key id -> (tokens, when)
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> KeyRateLimiter:
        # Litestar copies the routes' middleware; every copy must count in one bucket per key.
        return self

    def check(self, key_id: int) -> None:
        if not self.capacity:
            return
        with self._lock:
            now = self.clock()
            tokens, then = self._buckets.get(key_id, (float(self.capacity), now))
            tokens = min(float(self.capacity), tokens + (now - then) * self.per_second)
            if tokens < 1.0:
                self._buckets[key_id] = (tokens, now)
                wait = max(1, math.ceil((1.0 - tokens) / self.per_second))
                raise TooManyRequests(
                    f"Too many requests with this API key: at most {self.capacity} a minute."
                    f" Retry after {wait} seconds",
                    retry_after=wait,
                )
            self._buckets[key_id] = (tokens - 1.0, now)


class HostPolicy:
    """Which Host headers are answered.

    A DNS rebinding page reaches this server under the attacker's own domain
    name, so names are checked. IP addresses are always allowed: a page
    addressed by IP is its own origin and gains nothing. So are localhost and
    this machine's names, which an attacker cannot point elsewhere.
    """

    def __init__(self, names: Iterable[str]):
        names = {name.strip().lower().rstrip(".") for name in names if name.strip()}
        self.any = "*" in names
        self.suffixes = tuple(name[1:] for name in names if name.startswith("*."))
        self.exact = {name for name in names if not name.startswith("*")}

    @classmethod
    def for_server(cls, server: ServerConfig) -> HostPolicy:
        built_in = ["localhost", server.host, socket.gethostname()]
        return cls([*built_in, *server.allowed_hosts.split(",")])

    def allows(self, host_header: str | None) -> bool:
        if host_header is None or self.any:
            # No Host header: not a browser, which always sends one.
            return True
        host = host_name(host_header)
        if _is_ip_address(host):
            return True
        return host in self.exact or host.endswith(self.suffixes)


def host_name(host_header: str) -> str:
    """The name of a Host header, without its port: example.com:8000 -> example.com."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:].partition("]")[0]
    name, _, port = host.rpartition(":")
    if name and port.isdigit():
        host = name
    return host.rstrip(".")


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class AllowedHostsMiddleware(ASGIMiddleware):
    """Refuses requests whose Host header names a host this server does not answer to.

    Litestar's own allowed-hosts middleware compares the port as part of the
    name and answers in its own JSON shape; this one keeps the API's `error`.
    """

    scopes = (ScopeType.HTTP, ScopeType.WEBSOCKET)

    def __init__(self, policy: HostPolicy) -> None:
        self.policy = policy

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        host = Headers.from_scope(scope).get("host")
        if host is not None and not self.policy.allows(host):
            raise BadRequest(f"this server does not answer to the host name {host_name(host)!r};"
                             " an administrator can add it to server.allowed_hosts")
        await next_app(scope, receive, send)
