"""Keys' last-used times, written on a thread of their own.

A request never waits for this write. With another process holding the
database's write lock, the write waits up to the busy timeout, and a request
that only reads (a job's status, an image) must not wait with it, nor hold a
request thread for it.
"""

from __future__ import annotations

import logging
import threading

from appliance.accounts import keys
from appliance.core.clock import utc_now
from appliance.core.database import ConnectionPool, DatabaseError, immediate

log = logging.getLogger(__name__)

# After a failed write (the database locked past its busy timeout, or full), the
# uses wait this long before the next try: kept, not lost, and no busy loop.
RETRY_SECONDS = 5.0


class KeyUseWriter:
    """Writes the uses it is told of, soon, on one thread started on demand.

    The thread ends once nothing is left to write, so an idle service keeps no thread.
    """

    def __init__(self, database: ConnectionPool, retry_seconds: float = RETRY_SECONDS):
        self.database = database
        self.retry_seconds = retry_seconds
        self._pending: dict[int, str] = {}  # key id -> when it was used
        self._changed = threading.Condition()
        self._writing = False

    def note(self, key_id: int) -> None:
        """Records that the key is used now; returns at once."""
        with self._changed:
            self._pending[key_id] = utc_now()
            if not self._writing:
                self._writing = True
                threading.Thread(target=self._write_all, name="key-last-used",
                                 daemon=True).start()

    def wait(self, timeout: float) -> bool:
        """True once every use noted so far is written; False on timeout (the database
        still refuses the write: the uses stay noted and are tried again)."""
        with self._changed:
            # A writer pausing after a refused write tries again now, not after its pause.
            self._changed.notify_all()
            return self._changed.wait_for(lambda: not self._writing, timeout)

    def _write_all(self) -> None:
        try:
            self._write_until_done()
        except BaseException:
            with self._changed:
                # So that the next use starts a thread again.
                self._writing = False
                self._changed.notify_all()
            raise

    def _write_until_done(self) -> None:
        failing = False
        while True:
            with self._changed:
                if not self._pending:
                    # In the same hold of the lock as the check: a use noted after it
                    # finds no thread writing and starts one.
                    self._writing = False
                    self._changed.notify_all()
                    return
                uses, self._pending = self._pending, {}
            try:
                db = self.database.db()
                with immediate(db):
                    for key_id, when in uses.items():
                        keys.write_last_used(db, key_id, when)
                failing = False
            except DatabaseError as exc:
                if not failing:
                    log.warning("could not record when %d key(s) were last used, trying again"
                                " every %g s: %s", len(uses), self.retry_seconds, exc)
                failing = True
                with self._changed:
                    # A use noted meanwhile is newer than the one that failed.
                    self._pending = {**uses, **self._pending}
                    self._changed.wait(self.retry_seconds)
