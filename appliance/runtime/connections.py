"""Bounded connections: a cap on open connections, and deadlines for slow or silent clients.

uvicorn's HTTP/1.1 protocol times a connection out only while it idles between
two requests. A connection that never sends a request, or sends its headers a
byte at a time (slowloris), or its body, stays open for good: a flood of them
once took every file descriptor the process had, and /healthz stopped answering.
`BoundedH11Protocol` is uvicorn's protocol with three additions:

- a cap (`ConnectionGuard`): at `max_connections` open, a new connection closes
  the one that has waited longest for a request (idle between requests, or
  still sending its headers), passing over any whose request has arrived but
  not yet been read (a new client is accepted a few loop turns before its
  first bytes are, and a flood's next batch of accepts may come between).
  A flood of idle connections thus displaces only itself, while a client that
  sends its request at once is served; only when every open connection is busy
  with a request is a new one turned away. The
  cap is sized below the process's limit of open files, so it is reached first.
- deadlines: a request's headers must be in within `header_timeout` of the
  connection's opening (or of the first byte of a later request on it), its
  body within `body_timeout` after them; a client that stops reading its
  answer is cut off after `send_timeout` (a connection busy with a request is
  never displaced, so one that never read would hold its place for good).
- TLS under the cap: the handshake runs on a connection already counted and
  timed (asyncio's own TLS servers hand a connection over only after it),
  so silent TLS connections are bounded like any other.
"""

from __future__ import annotations

import array
import asyncio
import enum
import fcntl
import logging
import resource
import ssl
import termios
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from appliance.core.config import ConfigError, ServerConfig, declared

log = logging.getLogger(__name__)

# File descriptors kept for what is not a connection: the database, the model's
# files while it loads, PNGs being written, the log.
RESERVED_FILES = 256
# uvicorn's default listen backlog, and the most asyncio accepts in one go.
MOST_BACKLOG = 2048


def _fewest_connections() -> int:
    """The smallest cap worth serving with: the least server.max_connections may be."""
    bounds = declared("server.max_connections").bounds
    assert bounds is not None
    return int(bounds.low)


def raise_open_file_limit() -> int:
    """Raises this process's soft limit of open files to its hard limit (systemd's
    default soft limit, 1024, is meant to be raised by programs that need more);
    returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def _fitting_cap(open_files: int) -> int:
    """The most connections `open_files` descriptors carry. Each connection may hold two
    (its socket and a file it sends), and up to three listen backlogs of sockets may be
    on their way at once: asyncio accepts a backlog's worth in one go, and may accept
    another before the last one has reached the cap; connections displaced to make room
    close on the next loop turn."""
    room = open_files - RESERVED_FILES
    if room // 5 <= MOST_BACKLOG:
        return room // 5  # the backlog is the cap itself
    return (room - 3 * MOST_BACKLOG) // 2


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    backlog: int
    header_timeout: float
    body_timeout: float
    send_timeout: float
    keep_alive: int
    # The configured cap, when the limit of open files lowered it.
    lowered_from: int | None = None

    @classmethod
    def fitting(cls, server: ServerConfig, open_files: int) -> ConnectionLimits:
        fits, fewest = _fitting_cap(open_files), _fewest_connections()
        if fits < fewest:
            raise ConfigError(f"the process may open only {open_files} files, too few to serve"
                              f" {fewest} connections: raise its limit (ulimit -n, or"
                              " LimitNOFILE= in the systemd unit)")
        cap = min(server.max_connections, fits)
        return cls(max_connections=cap, backlog=min(MOST_BACKLOG, cap),
                   header_timeout=server.header_timeout_seconds,
                   body_timeout=server.body_timeout_seconds,
                   send_timeout=server.send_timeout_seconds,
                   keep_alive=server.keep_alive_seconds,
                   lowered_from=server.max_connections if cap < server.max_connections else None)


class Phase(enum.Enum):
    HEAD = "waiting for a request's headers"
    BODY = "receiving a request's body"
    SERVING = "serving a request"


class ConnectionGuard:
    """The open connections of one server, those waiting for a request in the order
    they began to wait, and the TLS context, if any."""

    def __init__(self, limits: ConnectionLimits, tls: ssl.SSLContext | None = None):
        self.limits = limits
        self.tls = tls
        self.open = 0
        self._waiting: OrderedDict[BoundedH11Protocol, None] = OrderedDict()

    def admit(self, peer: str) -> bool:
        """Counts a new connection in, displacing the longest-waiting one at the cap;
        False (turned away) when every open connection is busy with a request."""
        if self.open >= self.limits.max_connections:
            oldest = self._idlest()
            if oldest is None:
                log.warning("turned a connection from %s away: all %d connections"
                            " (server.max_connections) are busy with requests", peer, self.open,
                            extra={"event": "connection.refused"})
                return False
            log.warning("at the limit of %d open connections (server.max_connections): closed"
                        " the one from %s that waited longest for a request", self.open,
                        oldest.peer, extra={"event": "connection.displaced"})
            oldest.drop()
        # A displaced connection counts until its socket is closed, on the next loop turn.
        self.open += 1
        return True

    def _idlest(self) -> BoundedH11Protocol | None:
        """Takes out of the waiting ones the one that has waited longest with nothing
        unread; None when there is none."""
        for connection in self._waiting:
            if not connection.has_unread_data():
                del self._waiting[connection]
                return connection
        return None

    def waiting(self, connection: BoundedH11Protocol) -> None:
        self._waiting[connection] = None

    def stop_waiting(self, connection: BoundedH11Protocol) -> None:
        self._waiting.pop(connection, None)

    def gone(self, connection: BoundedH11Protocol) -> None:
        self._waiting.pop(connection, None)
        self.open -= 1


class BoundedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol under a ConnectionGuard; see the module's text.
    `protocol_class` makes a subclass bound to one guard, for uvicorn.Config(http=...)."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peer = "?"
        self.phase = Phase.HEAD
        # The TCP connection's own transport; under TLS, self.transport sits on top of it.
        self._socket: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        # Set while the client reads nothing of what is being sent to it.
        self._stalled: asyncio.TimerHandle | None = None
        self._counted = False
        self._handshake: asyncio.Task[None] | None = None
        # Under TLS: what arrived between the handshake's end and connection_made.
        self._early = bytearray()

    # The connection's life.

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if peername else "?"
        if not self.guard.admit(self.peer):
            transport.abort()
            return
        self._counted = True
        self._socket = transport
        self.guard.waiting(self)
        self._arm(self.guard.limits.header_timeout)
        if self.guard.tls is None:
            super().connection_made(transport)
        else:
            # Kept: the loop holds only a weak reference to a task.
            self._handshake = self.loop.create_task(self._start_tls(transport, self.guard.tls))

    async def _start_tls(self, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
        try:
            secured = await self.loop.start_tls(
                transport, self, context, server_side=True,
                ssl_handshake_timeout=self.guard.limits.header_timeout)
        except OSError:
            # A failed handshake (ssl.SSLError), a client that left, plain HTTP sent to
            # the HTTPS port: start_tls has closed the connection.
            self._release()
            return
        if secured is None or not self._counted:
            # Closed during the handshake (the deadline, a displacement, the client).
            self._release()
            return
        super().connection_made(secured)
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            self.data_received(early)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if self.transport is None:
            return  # lost before HTTP began: in or right after the TLS handshake
        super().connection_lost(exc)

    def _release(self) -> None:
        self._disarm()
        self._unstall()
        if self._counted:
            self._counted = False
            self.guard.gone(self)

    def has_unread_data(self) -> bool:
        """Whether the client's bytes wait in the socket, not yet read by the loop."""
        if self._socket is None:
            return False
        descriptor = self._socket.get_extra_info("socket").fileno()
        if descriptor < 0:
            return False  # closed
        unread = array.array("i", [0])
        try:
            fcntl.ioctl(descriptor, termios.FIONREAD, unread)
        except OSError:
            return False
        return unread[0] > 0

    def drop(self) -> None:
        """Closes the connection at once: it was displaced or ran out of time."""
        self._disarm()
        self._unstall()
        self.guard.stop_waiting(self)  # not one to displace again
        if self._socket is not None:
            # The socket's own transport: under TLS that skips a goodbye to a client
            # that is not listening.
            self._socket.abort()

    # Data, and where the request stands.

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            # TLS: the handshake has just ended, and _start_tls calls connection_made next.
            self._early += data
            return
        if self.phase is Phase.HEAD and self._deadline is None:
            # The first byte of a request after an idle spell: its headers are due now.
            self._arm(self.guard.limits.header_timeout)
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._follow()

    def _follow(self) -> None:
        """Moves the phase along with what h11 has seen of the client's request."""
        state = self.conn.their_state
        phase = (Phase.HEAD if state is h11.IDLE
                 else Phase.BODY if state is h11.SEND_BODY else Phase.SERVING)
        if phase is self.phase:
            return
        self.phase = phase
        self._disarm()
        if phase is Phase.HEAD:
            # Between requests uvicorn's keep-alive timer runs; the next request's
            # headers are due from its first byte (data_received), or now if part
            # of it came with the last one.
            self.guard.waiting(self)
            if self.conn.trailing_data[0]:
                self._arm(self.guard.limits.header_timeout)
        else:
            self.guard.stop_waiting(self)
            if phase is Phase.BODY:
                self._arm(self.guard.limits.body_timeout)

    # Deadlines.

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, self.phase, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, phase: Phase, seconds: float) -> None:
        self._deadline = None
        if phase is Phase.HEAD:
            log.warning("closed a connection from %s: no complete request headers within %g s"
                        " (server.header_timeout_seconds)", self.peer, seconds,
                        extra={"event": "connection.timeout"})
        else:
            log.warning("closed a connection from %s: no complete request body within %g s"
                        " (server.body_timeout_seconds)", self.peer, seconds,
                        extra={"event": "connection.timeout"})
        self.drop()

    # Flow control: the transport's buffer is full because the client reads
    # nothing (it can reach a TLS connection before connection_made has set it up).

    def pause_writing(self) -> None:
        if self.transport is not None:
            super().pause_writing()
        if self._stalled is None:
            self._stalled = self.loop.call_later(self.guard.limits.send_timeout,
                                                 self._send_expired)

    def resume_writing(self) -> None:
        self._unstall()
        if self.transport is not None:
            super().resume_writing()

    def _unstall(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _send_expired(self) -> None:
        self._stalled = None
        log.warning("closed a connection from %s: it read nothing of its answer for %g s"
                    " (server.send_timeout_seconds)", self.peer, self.guard.limits.send_timeout,
                    extra={"event": "connection.timeout"})
        self.drop()


def protocol_class(guard: ConnectionGuard) -> type[BoundedH11Protocol]:
    """BoundedH11Protocol bound to `guard`: uvicorn makes each connection's protocol
    from a class and its own arguments only."""
    return type("GuardedH11Protocol", (BoundedH11Protocol,), {"guard": guard})
