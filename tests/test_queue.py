from __future__ import annotations

import threading
import time

import pytest

from appliance.core.errors import ServiceUnavailable
from appliance.engine.queue import ImageQueue
from appliance.jobs.models import GenerationSettings, QueuedImage

SMALL = GenerationSettings(64, 64, 2, 7.5)
LARGE = GenerationSettings(128, 128, 2, 7.5)


def image(n: int, settings=SMALL) -> QueuedImage:
    return QueuedImage(n, "job", 1, n, f"prompt {n}", n, settings)


def test_reservations_count_against_capacity_until_released():
    queue = ImageQueue(capacity=3)
    queue.reserve(2)
    with pytest.raises(ServiceUnavailable) as caught:
        queue.reserve(2)
    assert caught.value.headers["Retry-After"] == "5"
    queue.release(2)
    queue.reserve(3)
    queue.put_reserved([image(1), image(2), image(3)])
    assert len(queue) == 3
    with pytest.raises(ServiceUnavailable):
        queue.reserve(1)


def test_recovered_work_is_taken_even_past_capacity():
    queue = ImageQueue(capacity=1)
    queue.put_recovered([image(1), image(2)])
    assert len(queue) == 2


def test_batches_share_settings_and_keep_order():
    queue = ImageQueue(capacity=10)
    queue.put_recovered([image(1), image(2, LARGE), image(3), image(4), image(5, LARGE)])
    assert [i.image_id for i in queue.take_batch(2, timeout=0)] == [1, 3]
    assert [i.image_id for i in queue.take_batch(5, timeout=0)] == [2, 5]
    assert [i.image_id for i in queue.take_batch(5, timeout=0)] == [4]
    assert queue.take_batch(5, timeout=0.01) == []


def test_close_wakes_a_waiting_worker():
    queue = ImageQueue(capacity=1)
    queue.close()
    assert queue.take_batch(1, timeout=5) == []


def test_position_counts_the_images_ahead_of_a_job_in_turn_order():
    queue = ImageQueue(capacity=20)
    first = [QueuedImage(n, "first", 1, n, "p", n, SMALL) for n in range(3)]
    second = [QueuedImage(10, "second", 2, 0, "p", 0, SMALL)]
    third = [QueuedImage(20 + n, "third", 1, n, "p", n, SMALL) for n in range(2)]
    queue.put_recovered(first + second + third)
    positions = {job: queue.position(job) for job in ("first", "second", "third", "none")}
    # Account 2's single image goes second, after account 1's first image; the
    # third job (account 1 again) waits for its own account's first job.
    assert positions == {"first": 0, "second": 1, "third": 4, "none": None}
    order = [image.job_id for image in queue.take_batch(10, timeout=0)]
    assert [order.index(job) for job in ("first", "second", "third")] == [0, 1, 4]


def test_a_discarded_job_leaves_the_line_and_frees_its_places():
    queue = ImageQueue(capacity=5)
    kept = [QueuedImage(1, "kept", 1, 0, "p", 0, SMALL),
            QueuedImage(4, "kept", 1, 1, "p", 1, LARGE)]
    dropped = [QueuedImage(2, "dropped", 2, 0, "p", 0, SMALL),
               QueuedImage(3, "dropped", 2, 1, "p", 1, LARGE)]
    other = [QueuedImage(5, "other", 3, 0, "p", 0, SMALL)]
    queue.put_recovered([kept[0], dropped[0], other[0], dropped[1], kept[1]])
    assert queue.position("other") == 2

    assert queue.discard(2, "dropped") == 2 and queue.discard(2, "dropped") == 0
    assert len(queue) == 3 and queue.position("other") == 1 and queue.position("dropped") is None
    queue.reserve(2)  # the two places are free again
    assert [i.image_id for i in queue.take_batch(5, timeout=0)] == [1, 5]
    assert [i.image_id for i in queue.take_batch(5, timeout=0)] == [4]
    assert len(queue) == 0


def account_images(account: int, count: int, settings=SMALL, start: int = 0) -> list[QueuedImage]:
    return [QueuedImage(account * 1000 + start + n, f"job-{account}", account, start + n,
                        f"prompt {n}", n, settings) for n in range(count)]


def taken(queue: ImageQueue, size: int) -> list[tuple[int, int]]:
    """(account, index in its job) of each image of the next batch."""
    return [(i.account_id, i.index) for i in queue.take_batch(size, timeout=0)]


def test_accounts_take_turns_so_a_big_job_does_not_starve_a_small_one():
    queue = ImageQueue(capacity=2000)
    queue.put_recovered(account_images(1, 1000))
    queue.put_recovered(account_images(2, 1))
    queue.put_recovered(account_images(3, 3))
    assert taken(queue, 4) == [(1, 0), (2, 0), (3, 0), (1, 1)]
    # Account 2 is done; 3 and 1 alternate from where the turns stopped.
    assert taken(queue, 4) == [(3, 1), (1, 2), (3, 2), (1, 3)]
    assert taken(queue, 4) == [(1, 4), (1, 5), (1, 6), (1, 7)]
    # A newcomer joins the back of the line and is served within one round.
    queue.put_recovered(account_images(4, 2))
    assert taken(queue, 3) == [(1, 8), (4, 0), (1, 9)]
    assert len(queue) == 1000 - 10 + 1


def test_an_account_whose_settings_differ_picks_the_next_batch():
    queue = ImageQueue(capacity=100)
    queue.put_recovered(account_images(1, 10))
    queue.put_recovered(account_images(2, 1, LARGE))
    queue.put_recovered(account_images(3, 10))
    # Account 2 cannot join a SMALL batch, but keeps its place at the front...
    assert taken(queue, 4) == [(1, 0), (3, 0), (1, 1), (3, 1)]
    # ...so the next batch is its LARGE one, though accounts 1 and 3 wait.
    assert taken(queue, 4) == [(2, 0)]
    assert taken(queue, 2) == [(1, 2), (3, 2)]


def test_a_batch_waits_the_window_for_more_images_of_its_settings():
    queue = ImageQueue(capacity=10)
    window = 2.0
    started = time.monotonic()
    queue.put_recovered(account_images(1, 1))
    threading.Timer(0.1, queue.put_recovered, [account_images(2, 3)]).start()
    batch = queue.take_batch(4, timeout=1, window=window)
    # Full after about 0.1 s: no need to wait out the window.
    assert len(batch) == 4 and time.monotonic() - started < window


def test_the_window_counts_from_when_the_oldest_image_was_queued():
    queue = ImageQueue(capacity=10)
    window, timeout = 0.5, 5.0
    queue.put_recovered(account_images(1, 2))
    time.sleep(window + 0.1)
    started = time.monotonic()
    assert len(queue.take_batch(4, timeout=timeout, window=window)) == 2
    # Queued longer ago than the window: no second wait for more.
    assert time.monotonic() - started < window
    # Timed from before the image was queued, the wait cannot come out shorter than the window.
    started = time.monotonic()
    queue.put_recovered(account_images(1, 1, start=2))
    assert len(queue.take_batch(4, timeout=timeout, window=window)) == 1
    assert window <= time.monotonic() - started < timeout
