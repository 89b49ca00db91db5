"""A job's live progress as server-sent events.

The stream polls the database and the queue rather than hooking the worker:
it works the same for jobs recovered after a restart, and a slow or vanished
reader can never hold the worker up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable

import anyio
import anyio.to_thread
import msgspec
from litestar.response import ServerSentEventMessage

from appliance.jobs.models import JobView
from appliance.web.api.schemas import ProgressEvent
from appliance.web.api.views import ImageUrl, image_response, job_response

POLL_SECONDS = 0.25
# A comment line now and then keeps proxies from closing a quiet stream.
KEEPALIVE_SECONDS = 15.0

DESCRIPTION = """A `text/event-stream` of the job's progress; it closes when the job ends.

- `event: progress`: sent first, then whenever the status, the counts or the
  queue position change (after the `image` events that changed them); `data`
  has `status`, `queuePosition` (queued images the engine takes before this
  job's next one, null when none waits), `totalImages`, `completedImages`,
  `failedImages`, `cancelledImages` and `pendingImages`.
- `event: image`: an image that ended (completed, failed or cancelled); `data`
  is the image as in the job (`index`, `prompt`, `status`, `seed`, `url` ...).
- `event: end`: the job, as GET /api/playground/images/{jobId} answers it; the
  last event.

Lines starting with `:` are keep-alive comments. When the service shuts down
the stream closes without `end`: the job goes on after the restart; read it
with GET /api/playground/images/{jobId} or open the stream again."""


def _event(name: str, payload: msgspec.Struct) -> ServerSentEventMessage:
    return ServerSentEventMessage(event=name, data=msgspec.json.encode(payload).decode())


async def job_events(first: JobView, read_job: Callable[[], JobView], image_url: ImageUrl,
                     stopping: threading.Event) -> AsyncIterator[ServerSentEventMessage]:
    """The events of a job read with `read_job` until it ends, or the server begins to stop."""

    def progress_of(job: JobView) -> ProgressEvent:
        return ProgressEvent(
            status=job.status,
            queue_position=job.queue_position,
            total_images=job.total_images,
            completed_images=job.completed_images,
            failed_images=job.failed_images,
            cancelled_images=job.cancelled_images,
            pending_images=job.queued_images + job.running_images,
        )

    job = first
    last_progress = progress_of(job)
    yield _event("progress", last_progress)
    last_sent = time.monotonic()
    reported: set[int] = set()
    while True:
        # The images first, then the counts they changed.
        for image in job.images:
            if image.status.finished and image.index not in reported:
                reported.add(image.index)
                last_sent = time.monotonic()
                yield _event("image", image_response(job.job_id, image, image_url))
        current = progress_of(job)
        if current != last_progress:
            last_progress = current
            last_sent = time.monotonic()
            yield _event("progress", current)
        if job.status.finished:
            yield _event("end", job_response(job, image_url))
            return
        if stopping.is_set():
            return
        if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
            last_sent = time.monotonic()
            yield ServerSentEventMessage(data=None, comment="keep-alive")
        await anyio.sleep(POLL_SECONDS)
        job = await anyio.to_thread.run_sync(read_job)
