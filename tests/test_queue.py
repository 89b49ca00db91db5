from __future__ import annotations

import pytest

from appliance.engine.queue import ImageQueue
from appliance.errors import ServiceUnavailable
from appliance.jobs import GenerationSettings, QueuedImage

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


def test_position_counts_the_images_ahead_of_a_job():
    queue = ImageQueue(capacity=10)
    first = [QueuedImage(n, "first", 1, n, "p", n, SMALL) for n in range(3)]
    second = [QueuedImage(10, "second", 2, 0, "p", 0, SMALL)]
    queue.put_recovered(first + second)
    assert (queue.position("first"), queue.position("second"), queue.position("none")) == (0, 3, None)
