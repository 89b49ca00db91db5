"""Connection floods: the cap, the deadlines for slow clients, and the log's restraint.

The quick tests check the parts (the cap's sizing, the guard, the log limiter);
the system test floods a real `appliance serve`, started with a limit of open
files four times smaller than the flood, and watches it keep answering.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn

from appliance.accounts import accounts, audit, keys
from appliance.bench.serving import free_port
from appliance.core.config import ConfigError, ServerConfig
from appliance.core.database import ConnectionPool
from appliance.runtime.connections import (
    RESERVED_FILES,
    ConnectionGuard,
    ConnectionLimits,
    protocol_class,
    raise_open_file_limit,
)
from appliance.runtime.logs import LogfmtFormatter, RepeatLimiter
from appliance.web.access_log import ACCESS_LOGGER, ACCESS_MESSAGE

from .serve_process import ServeProcess, write_config

# --- the parts -------------------------------------------------------------------


@pytest.mark.parametrize("open_files", [400, 1024, 4096, 10_496, 20_000, 65_536, 524_288])
def test_the_cap_leaves_room_for_every_descriptor_it_may_cost(open_files):
    limits = ConnectionLimits.fitting(ServerConfig(max_connections=1_000_000), open_files)
    # A socket and a file sent per connection, three backlogs' worth of sockets being
    # accepted or closed, and the process's own files.
    worst = 2 * limits.max_connections + 3 * limits.backlog + RESERVED_FILES
    assert worst <= open_files
    # ...and no more room than that is left unused.
    assert worst > open_files - 10
    assert limits.lowered_from == 1_000_000


def test_the_configured_cap_stands_when_it_fits_and_too_few_files_is_a_config_error():
    limits = ConnectionLimits.fitting(ServerConfig(max_connections=100), 1024)
    assert (limits.max_connections, limits.backlog, limits.lowered_from) == (100, 100, None)
    with pytest.raises(ConfigError, match="may open only 300 files"):
        ConnectionLimits.fitting(ServerConfig(), 300)


def test_the_soft_limit_of_open_files_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        assert raise_open_file_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass(eq=False)
class FakeConnection:
    """What the guard calls on a connection: its address, has_unread_data() and drop()."""

    peer: str
    dropped: list[str] = field(default_factory=list)
    unread: bool = False

    def has_unread_data(self) -> bool:
        return self.unread

    def drop(self) -> None:
        self.dropped.append(self.peer)


def test_at_the_cap_the_longest_waiting_connection_makes_room_and_busy_ones_never_do():
    guard = ConnectionGuard(ConnectionLimits.fitting(ServerConfig(max_connections=16), 1024))
    first, *others = [FakeConnection(f"10.0.0.{n}") for n in range(16)]
    for connection in [first, *others]:
        assert guard.admit(connection.peer)
        guard.waiting(connection)
    # A waiting connection that turned busy is skipped, and so is one whose request has
    # arrived unread; the next longest-waiting goes.
    guard.stop_waiting(first)
    others[0].unread = True
    assert guard.admit("10.0.1.1")
    assert first.dropped == others[0].dropped == [] and others[1].dropped == ["10.0.0.2"]
    # It counts until its socket is gone.
    assert guard.open == 17
    guard.gone(others[1])
    for connection in others[2:]:
        guard.stop_waiting(connection)
    assert not guard.admit("10.0.1.2")  # every connection is busy or has its request in
    assert guard.open == 16
    others[0].unread = False  # read, and still no request (a slowloris): it may go
    assert guard.admit("10.0.1.3") and others[0].dropped == ["10.0.0.1"]


BIG_ANSWER = 16 * 1024 * 1024


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


async def big_answer(scope, receive, send) -> None:
    """An ASGI app answering every request with BIG_ANSWER bytes, in 64 KiB pieces."""
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(BIG_ANSWER).encode())]})
    piece = b"x" * 65536
    for _ in range(BIG_ANSWER // len(piece)):
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


@contextlib.contextmanager
def guarded_server(app, limits: ConnectionLimits) -> Iterator[tuple[ConnectionGuard, int]]:
    """uvicorn serving `app` on a thread under a guard with `limits`: (guard, port)."""
    guard = ConnectionGuard(limits)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, http=protocol_class(guard),
                                           lifespan="off", log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        yield guard, port
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_client_that_stops_reading_its_answer_is_cut_off_and_one_that_reads_is_not(caplog):
    limits = ConnectionLimits(max_connections=16, backlog=16, header_timeout=5.0,
                              body_timeout=5.0, send_timeout=0.3, keep_alive=5)
    with guarded_server(big_answer, limits) as (guard, port):
        request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        # One that reads it all gets it all, however the answer's pieces wait on it.
        with socket.create_connection(("127.0.0.1", port)) as reader:
            reader.sendall(request)
            received = 0
            while received < BIG_ANSWER:
                piece = reader.recv(1 << 20)
                assert piece, f"cut off after {received} bytes"
                received += len(piece)
        assert wait_for(lambda: guard.open == 0, 5)  # the reader's connection is gone
        # One with a small window that never reads: the server's buffers fill, and
        # send_timeout after that it is closed, its place given back.
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", port))
        with stalled:
            stalled.sendall(request)
            started = time.monotonic()
            assert wait_for(lambda: guard.open == 1, 2)  # the server has taken it in
            wait_for(lambda: guard.open == 0, 5)
            took = time.monotonic() - started
        assert guard.open == 0 and limits.send_timeout <= took < 2.0, took
        assert any("read nothing of its answer for 0.3 s" in record.getMessage()
                   for record in caplog.records)


async def short_answer(scope, receive, send) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def on_server_loop(protocol, action) -> None:
    """Runs `action` on the server's loop thread and waits until it has run."""
    done = threading.Event()
    protocol.loop.call_soon_threadsafe(lambda: (action(), done.set()))
    assert done.wait(5)


def test_a_connection_whose_request_waits_unread_is_not_the_one_displaced():
    # A client is accepted a few loop turns before its first bytes are read, and in a
    # flood the next batch of accepts may come between: at the cap, the connection to
    # close must be one with nothing to read. Reading is paused on the first
    # connection here to hold it in that state.
    limits = ConnectionLimits(max_connections=2, backlog=2, header_timeout=5.0,
                              body_timeout=5.0, send_timeout=5.0, keep_alive=5)
    with guarded_server(short_answer, limits) as (guard, port), \
            socket.create_connection(("127.0.0.1", port)) as arriving:
        assert wait_for(lambda: guard.open == 1, 5)
        [protocol] = list(guard._waiting)
        on_server_loop(protocol, protocol.transport.pause_reading)
        arriving.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert wait_for(protocol.has_unread_data, 5)
        with socket.create_connection(("127.0.0.1", port)) as idle:
            assert wait_for(lambda: guard.open == 2, 5)
            with socket.create_connection(("127.0.0.1", port)):
                # The idle one goes, though it came later.
                idle.settimeout(5)
                assert idle.recv(1024) == b""
                on_server_loop(protocol, protocol.transport.resume_reading)
                arriving.settimeout(5)
                answer = b""
                while not answer.endswith(b"\r\n\r\nok"):
                    piece = arriving.recv(1024)
                    assert piece, f"closed after {answer!r}"
                    answer += piece
                assert answer.startswith(b"HTTP/1.1 200")


def _record(name: str, level: int, msg: object, *args: object,
            error: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(error), error, None) if error else None
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


def test_the_log_lets_one_line_per_fault_through_per_window_and_counts_the_rest():
    now = [0.0]
    limiter = RepeatLimiter(window=10.0, clock=lambda: now[0])
    out_of_files = OSError(24, "Too many open files")

    def accept_error() -> logging.LogRecord:
        return _record("asyncio", logging.ERROR, "socket.accept() out of system resource\n"
                       "socket: <socket fd=7>", error=out_of_files)

    def timeout(peer: str) -> logging.LogRecord:
        return _record("appliance.runtime.connections", logging.WARNING,
                       "closed a connection from %s: no complete request headers", peer)

    assert limiter.filter(accept_error())
    assert limiter.filter(timeout("10.0.0.1"))
    held = [limiter.filter(accept_error()) for _ in range(2700)]
    held += [limiter.filter(timeout(f"10.0.0.{n % 250}")) for n in range(500)]
    assert not any(held)
    # Running out of files is one fault wherever it is logged from.
    assert not limiter.filter(_record("appliance.engine.writer", logging.ERROR, "cannot write",
                                      error=OSError(24, "Too many open files")))
    # Access lines and other warnings are never held back.
    access = _record(ACCESS_LOGGER, logging.INFO, ACCESS_MESSAGE,
                     "10.0.0.1:5555", "GET", "/healthz", 200)
    assert all(limiter.filter(access) for _ in range(100))
    assert all(limiter.filter(_record("appliance.jobs", logging.WARNING, "job failed"))
               for _ in range(3))

    now[0] = 10.5
    line = accept_error()
    assert limiter.filter(line)
    assert line.repeats_suppressed == 2701
    assert "repeats_suppressed=2701" in LogfmtFormatter().format(line)
    later = timeout("10.0.0.9")
    assert limiter.filter(later) and later.repeats_suppressed == 500


# --- a real server under a flood --------------------------------------------------

# The server's limit of open files, the flood's size (four times that), and the
# deadlines it runs with. The cap that fits 1024 files is (1024 - 256) / 5 = 153.
OPEN_FILES = 1024
EXPECTED_CAP = 153
FLOOD = 4 * OPEN_FILES
HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 2.0
KEEP_ALIVE = 1
# How long the probes run while the flood is held, and the longest a probe may
# take: a probe's SYN that meets a full listen queue is dropped by the kernel and
# sent again after 1 s, then 2 s more, so a few seconds is the bound, not a hang.
FLOOD_SECONDS = 4.0
MOST_PROBE_SECONDS = 4.5
# Log lines about the flood the test allows: a handful, not one a connection.
MOST_LOG_LINES = 6
# Requests sent that are not HTTP: one log line for all of them.
MALFORMED = 300


def open_files_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_idle_connections(port: int, count: int, source: str) -> list[socket.socket]:
    """`count` connections from `source` that never send a byte; connecting goes on in
    the background (non-blocking)."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        sock.connect_ex(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed the connection (end of file or reset); `sock` is
    non-blocking."""
    try:
        return sock.recv(1024) == b""
    except BlockingIOError:
        return False  # open, and nothing sent
    except ConnectionError:
        return True
    except OSError:
        return False  # never connected


def close_at_once(sockets: list[socket.socket]) -> None:
    """Closes with a reset: a connection the server's kernel holds half-made is then
    dropped there, where a polite close would complete it and have it accepted."""
    for sock in sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def wait_until_quiet(pid: int, baseline: int) -> None:
    """Until the server has held no more than its own files for a second on end."""
    deadline = time.monotonic() + 15
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 1.0:
        assert time.monotonic() < deadline, "the server kept connections after the flood ended"
        if open_files_of(pid) > baseline + 2:
            quiet_since = time.monotonic()
        time.sleep(0.05)


def seconds_until_closed(sock: socket.socket, limit: float, drip: bytes = b"",
                         every: float = 1.0) -> tuple[float, bytes]:
    """Sends `drip` a byte every `every` seconds until the server closes the connection;
    (seconds it took, what the server sent)."""
    started = time.monotonic()
    received = b""
    next_byte = started
    sock.settimeout(0.02)
    while time.monotonic() - started < limit:
        if drip and time.monotonic() >= next_byte:
            try:
                sock.sendall(drip[:1])
            except OSError:
                break
            drip, next_byte = drip[1:], next_byte + every
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        except ConnectionError:
            break
        if not data:
            break
        received += data
    return time.monotonic() - started, received


class Probe:
    """/healthz and an authenticated call, timed, in a loop on a thread of its own."""

    def __init__(self, base: str, key: str):
        self.base, self.key = base, key
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        while not self.stop.is_set():
            for path, sent in (("/healthz", {}), ("/v1/models", headers)):
                started = time.monotonic()
                try:
                    # A connection of its own each time: a new client arriving mid-flood.
                    status = httpx.get(f"{self.base}{path}", headers=sent, timeout=10).status_code
                except httpx.HTTPError as exc:
                    self.failures.append(f"{path}: {exc!r}")
                    continue
                self.latencies.append(time.monotonic() - started)
                if status != 200:
                    self.failures.append(f"{path}: {status}")
            time.sleep(0.2)


def connection_lines(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if "logger=appliance.runtime.connections" in line
            or ("logger=uvicorn.error" in line and "level=info" not in line)
            or "logger=asyncio" in line or "Too many open files" in line]


@pytest.mark.system
def test_a_flood_of_idle_and_slow_connections_leaves_the_service_answering(
        tmp_path, tiny_model, launcher):
    config = write_config(tmp_path, tiny_model, server={
        "header_timeout_seconds": HEADER_TIMEOUT, "body_timeout_seconds": BODY_TIMEOUT,
        "keep_alive_seconds": KEEP_ALIVE})
    log_path = tmp_path / "serve.log"
    # Soft limit below the hard one: the server raises it itself.
    server = ServeProcess(config, log_path, launcher, open_files=(256, OPEN_FILES)).start()
    # The flood needs that many descriptors in this process too.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    flood: list[socket.socket] = []
    try:
        assert hard >= FLOOD + 256, "this machine allows too few open files for the flood"
        database = ConnectionPool(tmp_path / "data" / "appliance.db")
        account = accounts.create_account(database.db(), "flood@example.com",
                                          "correct horse battery", audit.Actor.cli())
        key = keys.create_key(database.db(), account.id, "Probe", audit.Actor.cli())[1]
        database.close()
        port = int(server.url.rsplit(":", 1)[1])
        assert server.pid is not None
        baseline = open_files_of(server.pid)
        log = log_path.read_text()
        assert (f"connections: at most {EXPECTED_CAP} open (server.max_connections 4096,"
                f" lowered to fit the process's limit of {OPEN_FILES} open files)") in log
        lines_before = len(log.splitlines())

        # The flood: four times more idle connections than the server may open files,
        # from an address of their own, held open.
        started = time.monotonic()
        flood = open_idle_connections(port, FLOOD, "127.0.0.2")
        probe = Probe(server.url, key)
        probe.thread.start()
        most_files = 0
        while time.monotonic() - started < FLOOD_SECONDS:
            most_files = max(most_files, open_files_of(server.pid))
            time.sleep(0.05)
        probe.stop.set()
        probe.thread.join(30)
        closed = sum(closed_by_server(sock) for sock in flood)
        flood_log = log_path.read_text().splitlines()[lines_before:]

        assert probe.failures == [], probe.failures
        assert len(probe.latencies) >= 4
        assert max(probe.latencies) < MOST_PROBE_SECONDS, probe.latencies
        # The cap is reached before the limit of open files, with room to spare.
        assert most_files - baseline <= OPEN_FILES - RESERVED_FILES
        assert closed > EXPECTED_CAP, "the server should have closed the connections it let go"
        print(f"\nflood: {FLOOD} idle connections opened from one address and held for"
              f" {FLOOD_SECONDS:g} s; the server had at most {most_files - baseline} sockets"
              f" open at once (cap {EXPECTED_CAP} connections, plus sockets being accepted or"
              f" closed; {most_files} of its {OPEN_FILES} files) and closed {closed} of the"
              " flood's connections by the end (displaced or timed out)")
        print(f"/healthz and GET /v1/models during the flood: {len(probe.latencies)} answers,"
              f" all 200; median {statistics.median(probe.latencies) * 1000:.0f} ms,"
              f" slowest {max(probe.latencies) * 1000:.0f} ms")
        close_at_once(flood)
        flood = []

        # Then, below the cap: connections that stay silent, one that sends its
        # headers a byte a second, one that does so with its body, one left idle
        # after a request. Each is cut off at its deadline, and nothing else is sent.
        wait_until_quiet(server.pid, baseline)
        silent = open_idle_connections(port, 50, "127.0.0.3")
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\n\r\n"
        body_head = (b"POST /api/playground/images HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Bearer " + key.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        results: dict[str, tuple[float, bytes]] = {}
        started_slow = time.monotonic()

        def slow(name: str, first: bytes, drip: bytes, every: float) -> None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(first)
                results[name] = seconds_until_closed(sock, 10, drip, every)

        clients = [threading.Thread(target=slow, args=args) for args in (
            ("slowloris", b"", head, 1.0),
            ("slow body", body_head, b"{" * 100, 0.5),
            ("keep-alive", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"", 1.0))]
        for client in clients:
            client.start()
        # Meanwhile, requests h11 cannot parse: each gets a 400 and a log line would
        # be written for each, but for the limiter.
        for _ in range(MALFORMED):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                assert sock.recv(1024).startswith(b"HTTP/1.1 400")
        time.sleep(max(0.0, HEADER_TIMEOUT + 1 - (time.monotonic() - started_slow)))
        silent_closed = sum(closed_by_server(sock) for sock in silent)
        for client in clients:
            client.join(15)
        for sock in silent:
            sock.close()

        assert silent_closed == 50
        took, sent = results["slowloris"]
        assert HEADER_TIMEOUT - 0.1 <= took < HEADER_TIMEOUT + 1 and sent == b"", results
        # The key is checked before the body is read: a 401 comes, then the cut.
        took, sent = results["slow body"]
        assert BODY_TIMEOUT - 0.1 <= took < BODY_TIMEOUT + 1, results
        took, sent = results["keep-alive"]
        assert KEEP_ALIVE - 0.1 <= took < KEEP_ALIVE + 1 and sent.startswith(b"HTTP/1.1 200"), \
            results

        log_lines = connection_lines("\n".join(flood_log))
        all_lines = connection_lines(log_path.read_text())
        assert not any("Too many open files" in line for line in all_lines), all_lines
        assert len(log_lines) <= MOST_LOG_LINES, log_lines
        malformed = [line for line in all_lines if "Invalid HTTP request received" in line]
        assert len(malformed) == 1, malformed
        print(f"log: {len(log_lines)} lines about the flood ({len(flood_log)} lines in all"
              f" while it lasted, the probes' access lines included); {len(all_lines)} about"
              " connections in the whole run")
        print(f"{MALFORMED} malformed requests: 400 each, {len(malformed)} log line")
        print(f"cut off: silent connections after {HEADER_TIMEOUT:g} s (50 of 50), slowloris"
              f" after {results['slowloris'][0]:.1f} s, slow body after"
              f" {results['slow body'][0]:.1f} s, idle keep-alive after"
              f" {results['keep-alive'][0]:.1f} s")
    finally:
        close_at_once(flood)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        server.stop()
