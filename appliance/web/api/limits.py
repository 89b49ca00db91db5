"""Limits against abuse: a request rate per API key, and the host names the server answers to."""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec
from litestar.connection import ASGIConnection
from litestar.datastructures.url import make_absolute_url
from litestar.enums import MediaType, ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp, Receive, Scope, Send

from appliance.accounts.rate_limits import too_many_requests
from appliance.core.config import ServerConfig
from appliance.core.errors import BadRequest


class KeyRateLimiter:
    """A token bucket per API key: bursts of up to `per_minute` requests, refilled evenly.

    Counted after the key is known, so a flood of made-up keys cannot grow it;
    it is bounded by the number of real keys. One process's count: a cluster's nodes
    share theirs in the database (accounts.service.SharedKeyRateLimiter).
    """

    asks_database = False

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
                raise too_many_requests(self.capacity, (1.0 - tokens) / self.per_second)
            self._buckets[key_id] = (tokens - 1.0, now)


class HostPolicy:
    """Which hosts are answered.

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

    def allows(self, host: Host) -> bool:
        if self.any or host.is_address:
            return True
        return host.name in self.exact or host.name.endswith(self.suffixes)


class BadHost(ValueError):
    """A Host header that is not `name[:port]`, `IPv4[:port]` or `[IPv6][:port]`."""


@dataclass(frozen=True)
class Host:
    """A Host header that parsed: the host a client addressed."""

    name: str  # lower case, without a final dot; an IPv6 address without its brackets
    port: int | None
    is_address: bool

    @property
    def authority(self) -> str:
        """The host as a URL writes it: example.com:8000, [::1]:8000."""
        host = f"[{self.name}]" if ":" in self.name else self.name
        return host if self.port is None else f"{host}:{self.port}"


# RFC 1123 host names: letters, digits and inner hyphens, at most 63 to a label.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_MAX_NAME = 253
_PORT = re.compile(r"[0-9]{1,5}")
_MAX_PORT = 65535
_SHOWN = 100  # characters of a refused header quoted back


# Clients send the same few Host headers all day: each is parsed once. Bounded, so
# made-up hosts cannot grow it; a refused header raises and is not kept.
@functools.lru_cache(maxsize=1024)
def parse_host(header: str) -> Host:
    """The host in a Host header, or BadHost saying what is wrong with it.

    Strict, because the header ends up in URLs the server hands out (image
    links) and in everything that reads the request's URL.
    """
    shown = repr(header[:_SHOWN])
    if "@" in header:
        raise BadHost(f"the Host header {shown} names a user ('@'); it may name only a host"
                      " and a port")
    if header.startswith("["):
        address, bracket, port = header[1:].partition("]")
        name = _ipv6(address) if bracket else None
        if name is None:
            raise BadHost(f"the Host header {shown} has brackets around something other than"
                          " an IPv6 address")
        is_address = True
    else:
        name, colon, port = header.partition(":")
        port = colon + port
        if not _NAME.fullmatch(name) or len(name) > _MAX_NAME or not _ipv4_if_numeric(name):
            raise BadHost(f"the Host header {shown} is not a host name, an IPv4 address or an"
                          " IPv6 address in brackets, with an optional :port")
        name = name.lower().rstrip(".")
        is_address = _is_ipv4(name)
    if not port:
        return Host(name, None, is_address)
    digits = port[1:] if port.startswith(":") else None
    if digits is None or not _PORT.fullmatch(digits) or not 1 <= int(digits) <= _MAX_PORT:
        raise BadHost(f"the Host header {shown} has a bad port: it must be a number from 1 to"
                      f" {_MAX_PORT}")
    return Host(name, int(digits), is_address)


def _ipv6(text: str) -> str | None:
    # Only hex digits, colons and dots: no zone ("%eth0"), no IPvFuture.
    if not re.fullmatch(r"[0-9A-Fa-f:.]+", text):
        return None
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        return None


def _is_ipv4(name: str) -> bool:
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def _ipv4_if_numeric(name: str) -> bool:
    # Browsers read a name whose last label is a number as an IPv4 address
    # ("127.1" is 127.0.0.1), so such a name must be a plain dotted quad.
    last = name.rstrip(".").rpartition(".")[2]
    return not last.isdigit() or _is_ipv4(name.rstrip("."))


def request_host(scope: Scope) -> Host | None:
    """The request's parsed Host header: None without one (HTTP/1.0), BadHost if it is bad."""
    headers = [value for name, value in scope["headers"] if name == b"host"]
    if len(headers) > 1:
        raise BadHost("the request has more than one Host header")
    return parse_host(headers[0].decode("latin-1")) if headers else None


# The request's Host, once the middleware has checked it; URLs in answers are made from it.
HOST_STATE = "appliance.host"


def absolute_url(connection: ASGIConnection, path: str) -> str:
    """`path` on this server, addressed as the client addressed it: its checked Host header,
    else (HTTP/1.0) the address it connected to."""
    scope = connection.scope
    host: Host | None = scope["state"][HOST_STATE]
    if host is None:
        return make_absolute_url(path, connection.base_url)
    return f"{scope['scheme']}://{host.authority}{scope.get('root_path', '')}{path}"


class AllowedHostsMiddleware(ASGIMiddleware):
    """Checks the Host header before anything reads the request's URL, which is made from it.

    A malformed header gets 400 here. A well-formed one naming a host this
    server does not answer to gets 400 through the route's error handlers (a
    page in the console). Litestar's own allowed-hosts middleware compares the
    port as part of the name and answers in its own JSON shape; this one keeps
    the API's `error`.
    """

    scopes = (ScopeType.HTTP,)  # the app has no websocket routes

    def __init__(self, policy: HostPolicy) -> None:
        self.policy = policy

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        try:
            host = request_host(scope)
        except BadHost as refusal:
            # Answered here, not raised: the error handlers read the request's
            # URL, which a malformed Host header breaks.
            await _refuse(str(refusal), scope, receive, send)
            return
        # No Host header: HTTP/1.0, not a browser, which always sends one.
        if host is not None and not self.policy.allows(host):
            raise BadRequest(f"this server does not answer to the host name {host.name!r};"
                             " an administrator can add it to server.allowed_hosts")
        scope.setdefault("state", {})[HOST_STATE] = host
        await next_app(scope, receive, send)


async def _refuse(message: str, scope: Scope, receive: Receive, send: Send) -> None:
    head = scope.get("method") == "HEAD"
    response = ASGIResponse(body=b"" if head else msgspec.json.encode({"error": message}),
                            status_code=400, media_type=MediaType.JSON, is_head_response=head)
    await response(scope, receive, send)
