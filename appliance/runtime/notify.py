"""The systemd notification protocol (sd_notify): readiness, watchdog, status.

Each message is one datagram of `KEY=value` lines sent to the socket systemd
names in $NOTIFY_SOCKET; without that variable every call does nothing, so the
same code runs under systemd, by hand and in tests.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None, watchdog_seconds: float | None = None):
        # "@name" is an abstract socket, which the kernel spells with a NUL byte.
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog_seconds = watchdog_seconds
        self._warned = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET") or None, _watchdog_seconds(environ))

    @property
    def active(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """False when the message could not go now and may be sent again; a socket
        that is gone or refuses is warned about once and counts as sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never wait: this runs on the event loop, and a reader that falls
                # behind (its queue holds few datagrams) would stall every request.
                sock.sendto("\n".join(assignments).encode("utf-8"), socket.MSG_DONTWAIT,
                            self.address)
        except BlockingIOError:
            log.debug("the notification socket is full; dropped %s", assignments)
            return False
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd through %s: %s", self.address, exc)
        return True


def _watchdog_seconds(environ: Mapping[str, str]) -> float | None:
    """The watchdog period systemd expects, when it is meant for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000
