"""The request rate per API key in cluster mode: one budget per key, shared by every node."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from appliance.accounts.rate_limits import take_token
from appliance.accounts.service import SharedKeyRateLimiter
from appliance.core.database import ConnectionPool
from appliance.core.database_url import DatabaseUrl
from appliance.core.errors import DatabaseBusy, TooManyRequests

from .helpers import InstantGenerator, bearer
from .postgres_server import PostgresServer

URL = "/api/playground/images"


@pytest.fixture
def database_kind() -> str:
    # Cluster mode is PostgreSQL: the app fixtures below run on a database of the test's own.
    return "postgresql"


@pytest.fixture
def two_nodes(postgres: PostgresServer) -> Iterator[tuple[ConnectionPool, ConnectionPool]]:
    """Two nodes' connection pools on one database."""
    url = DatabaseUrl(postgres.new_database())
    first, second = ConnectionPool(url), ConnectionPool(url)
    yield first, second
    first.close()
    second.close()


def passes(limiter: SharedKeyRateLimiter, key_id: int) -> bool:
    try:
        limiter.check(key_id)
    except TooManyRequests as refused:
        assert refused.retry_after >= 1
        return False
    return True


def test_two_nodes_share_one_budget_per_key(two_nodes):
    waits = [take_token(two_nodes[i % 2].db(), 7, 5, 5 / 60) for i in range(10)]

    assert waits[:5] == [0.0] * 5
    # The sixth arrives well within one token's refill time (12 s at 5 a minute).
    assert all(0 < wait <= 12 for wait in waits[5:])


def test_concurrent_checks_on_two_nodes_let_exactly_the_capacity_through(two_nodes):
    nodes = [SharedKeyRateLimiter(pool, 10) for pool in two_nodes]
    start = threading.Barrier(20)
    results: list[bool] = []

    def check(limiter: SharedKeyRateLimiter) -> None:
        limiter.database.db()  # connected before the race starts
        start.wait()
        results.append(passes(limiter, 1))

    threads = [threading.Thread(target=check, args=(nodes[i % 2],)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(results) == [False] * 10 + [True] * 10


def test_a_bucket_refills_at_its_rate(two_nodes):
    first, second = (pool.db() for pool in two_nodes)
    # A token every 250 ms: time enough for two statements in a row on a busy machine.
    per_second = 4.0
    assert take_token(first, 3, 1, per_second) == 0.0
    wait = take_token(second, 3, 1, per_second)
    assert 0 < wait <= 1 / per_second

    time.sleep(wait + 0.02)

    assert take_token(second, 3, 1, per_second) == 0.0
    assert take_token(first, 3, 1, per_second) > 0


def test_each_key_has_its_own_bucket(two_nodes):
    limiter = SharedKeyRateLimiter(two_nodes[0], 2)
    assert [passes(limiter, 1) for _ in range(3)] == [True, True, False]

    assert [passes(limiter, 2) for _ in range(3)] == [True, True, False]
    assert not passes(SharedKeyRateLimiter(two_nodes[1], 2), 1)


def test_the_limit_can_be_turned_off(two_nodes):
    unlimited = SharedKeyRateLimiter(two_nodes[0], 0)
    assert all(passes(unlimited, 1) for _ in range(50))


def test_requests_through_one_node_spend_the_budget_another_node_checks(make_client,
                                                                         make_config):
    # The 429 itself, in cluster mode too: test_hostile's rate limit test (both databases).
    client = make_client(load_generator=InstantGenerator,
                         app_config=make_config(limits={"requests_per_minute_per_key": 3}))
    key = client.key(client.account(credits=6))
    path = f"{URL}/{uuid.uuid4()}"
    assert [client.http.get(path, headers=bearer(key)).status_code
            for _ in range(3)] == [404, 404, 404]
    other_node = ConnectionPool(client.services.config.storage.database)
    try:
        assert not passes(SharedKeyRateLimiter(other_node, 3), _key_id(client))
    finally:
        other_node.close()


def test_a_locked_bucket_is_answered_503_not_500(make_client, make_config):
    client = make_client(load_generator=InstantGenerator, app_config=make_config(
        storage={"busy_timeout_seconds": 0.1}))
    key = client.key(client.account())
    path = f"{URL}/{uuid.uuid4()}"
    assert client.http.get(path, headers=bearer(key)).status_code == 404

    # Another node's transaction holds the key's bucket past the wait for its lock.
    with psycopg.connect(client.services.config.storage.database.url) as holder:
        holder.execute("SELECT * FROM rate_buckets FOR UPDATE")
        answer = client.http.get(path, headers=bearer(key))

    assert (answer.status_code, answer.json()) == (503, {"error": DatabaseBusy().message})
    assert answer.headers["retry-after"] == str(DatabaseBusy.RETRY_AFTER_SECONDS)
    assert client.http.get(path, headers=bearer(key)).status_code == 404


def _key_id(client) -> int:
    return client.database.db().execute("SELECT id FROM api_keys").fetchone()[0]
