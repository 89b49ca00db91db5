"""Hostile input and abuse: limits, almost-valid keys, a rate per key, foreign host names."""

from __future__ import annotations

import threading
import uuid

import pytest

from appliance.core.config import ServerConfig
from appliance.core.errors import TooManyRequests
from appliance.web.api.limits import BadHost, HostPolicy, KeyRateLimiter, parse_host

from .helpers import InstantGenerator, bearer, count_rows

URL = "/api/playground/images"


def assert_nothing_charged(client, account, credits):
    assert client.balance(account) == credits
    assert count_rows(client.database.db(), "jobs") == 0


# Limits on what one request may carry.

def test_a_body_over_the_size_limit_gets_413_and_costs_nothing(make_client, make_config):
    client = make_client(load_generator=InstantGenerator,
                         app_config=make_config(limits={"max_request_bytes": 2048}))
    account = client.account(credits=6)
    key = client.key(account)
    body = b'{"prompts": ["' + b"x" * 3000 + b'"]}'

    declared = client.http.post(URL, content=body, headers={
        **bearer(key), "Content-Type": "application/json"})
    # Without Content-Length the limit holds while the body streams in.
    streamed = client.http.post(URL, content=iter([body[:1500], body[1500:]]), headers={
        **bearer(key), "Content-Type": "application/json"})

    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json() == {
            "error": "the request body is larger than 2048 bytes (limits.max_request_bytes)"}
    assert_nothing_charged(client, account, 6)
    assert client.http.post(URL, json={"prompts": ["x" * 1000]},
                            headers=bearer(key)).status_code == 200


def test_too_many_or_too_long_prompts_get_400_and_cost_nothing(make_client, make_config):
    client = make_client(load_generator=InstantGenerator, app_config=make_config(
        limits={"max_prompts_per_request": 3, "max_prompt_length": 20}))
    account = client.account(credits=10)
    key = client.key(account)
    many = client.http.post(URL, json={"prompts": ["a"] * 4}, headers=bearer(key))
    long = client.http.post(URL, json={"prompts": ["a", "b" * 21]}, headers=bearer(key))
    assert (many.status_code, long.status_code) == (400, 400)
    assert "at most 3 are allowed" in many.json()["error"]
    assert long.json()["error"] == "prompts[1] is 21 characters long; the limit is 20"
    assert_nothing_charged(client, account, 10)


class GatedGenerator:
    """A generator holding each batch until the test opens the gate."""

    def __init__(self, real):
        self.real = real
        self.gate = threading.Event()

    def generate(self, prompts, seeds, settings):
        self.gate.wait(30)
        return self.real.generate(prompts, seeds, settings)


def test_pending_images_per_account_are_limited_with_429_and_never_charged(
        make_client, make_config):
    config = make_config(limits={"max_pending_images_per_account": 3})
    gated = GatedGenerator(InstantGenerator())
    client = make_client(load_generator=lambda: gated, app_config=config)
    busy, other = client.account("busy@example.com", 10), client.account("other@example.com", 10)
    busy_key, other_key = client.key(busy), client.key(other)

    first = client.http.post(URL, json={"prompts": ["a", "b"]}, headers=bearer(busy_key))
    over = client.http.post(URL, json={"prompts": ["c", "d"]}, headers=bearer(busy_key))
    fits = client.http.post(URL, json={"prompts": ["e"]}, headers=bearer(busy_key))
    elsewhere = client.http.post(URL, json={"prompts": ["f", "g", "h"]}, headers=bearer(other_key))

    assert first.status_code == 200
    assert over.status_code == 429
    assert int(over.headers["retry-after"]) > 0
    assert over.json()["error"] == (
        "This account has 2 images waiting or generating and may have at most 3 at once;"
        " 2 more do not fit. Try again when some have finished")
    assert fits.status_code == 200, "the limit counts images, not requests"
    assert elsewhere.status_code == 200, "another account has its own limit"
    assert client.balance(busy) == 7 and client.balance(other) == 7

    gated.gate.set()
    client.wait_for_job(busy_key, first.json()["jobId"])
    client.wait_for_job(busy_key, fits.json()["jobId"])
    assert client.http.post(URL, json={"prompts": ["c", "d"]},
                            headers=bearer(busy_key)).status_code == 200


# Keys that are almost right.

VALID_HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize(("authorization", "error"), [
    ("Bearer wi_live_" + VALID_HEX.upper(), "Invalid API key format"),
    ("Bearer wi_live_" + VALID_HEX[:63], "Invalid API key format"),
    ("Bearer wi_live_" + VALID_HEX + "0", "Invalid API key format"),
    ("Bearer wi_live_" + VALID_HEX[:63] + "g", "Invalid API key format"),
    ("Bearer  wi_live_" + VALID_HEX, "Invalid API key format"),
    ("Bearer wi_live_ " + VALID_HEX, "Invalid API key format"),
    ("Bearer wi_live_" + VALID_HEX[:32] + " " + VALID_HEX[32:], "Invalid API key format"),
    ("Bearer wi_test_" + VALID_HEX, "Invalid API key format"),
    ("Bearer sk-" + VALID_HEX, "Invalid API key format"),
    ("Bearer WI_LIVE_" + VALID_HEX, "Invalid API key format"),
    ("Bearer wi_live_" + "\u0660" * 64, "Invalid API key format"),
    ("Bearer wi_live_" + VALID_HEX, "Invalid API key"),
    ("Token wi_live_" + VALID_HEX, "Missing or invalid Authorization header"),
    ("Bearerwi_live_" + VALID_HEX, "Missing or invalid Authorization header"),
    ("wi_live_" + VALID_HEX, "Missing or invalid Authorization header"),
])
def test_almost_valid_keys_are_refused_with_the_right_error(shared_instant_client,
                                                           authorization, error):
    client = shared_instant_client
    account = client.fresh_account(credits=6)
    real = client.key(account)
    assert real != "wi_live_" + VALID_HEX
    for method, path in (("POST", URL), ("GET", f"{URL}/{uuid.uuid4()}")):
        response = client.http.request(method, path, json={"prompts": ["a"]},
                                       headers={"Authorization": authorization.encode()})
        assert (response.status_code, response.json()) == (401, {"error": error}), method
    assert client.balance(account) == 6 and client.jobs_of(account) == 0


def test_a_real_key_with_one_character_changed_is_unknown(instant_client):
    client = instant_client
    account = client.account(credits=6)
    key = client.key(account)
    last = "0" if key[-1] != "0" else "1"
    response = client.http.post(URL, json={"prompts": ["a"]}, headers=bearer(key[:-1] + last))
    assert (response.status_code, response.json()) == (401, {"error": "Invalid API key"})
    assert_nothing_charged(client, account, 6)


def test_a_deleted_key_and_another_accounts_key_are_each_refused_rightly(instant_client):
    client = instant_client
    from appliance.accounts import audit, keys

    owner, colleague = client.account("owner@example.com", 6), client.account("c@example.com", 6)
    owner_key, colleague_key = client.key(owner), client.key(colleague)
    created = client.http.post(URL, json={"prompts": ["a"]}, headers=bearer(owner_key))
    job_id = created.json()["jobId"]
    job = client.wait_for_job(owner_key, job_id)

    # Another account's key is a valid key, of someone who does not own the job.
    for path in (f"{URL}/{job_id}", job["images"][0]["url"]):
        response = client.http.get(path, headers=bearer(colleague_key))
        assert response.status_code == 404 and "error" in response.json()

    keys.delete_key(client.database.db(), owner.id, owner_key[:12], audit.Actor.cli())
    for method, path in (("GET", f"{URL}/{job_id}"), ("POST", URL)):
        response = client.http.request(method, path, json={"prompts": ["a"]},
                                       headers=bearer(owner_key))
        assert (response.status_code, response.json()) == (401, {"error": "Invalid API key"})
    assert client.balance(owner) == 5 and client.balance(colleague) == 6


# A request rate per key.

# In cluster mode the budget is a row in PostgreSQL (accounts/rate_limits.py).
@pytest.mark.both_databases
def test_the_rate_limit_answers_429_with_retry_after_per_key(make_client, make_config):
    client = make_client(load_generator=InstantGenerator,
                         app_config=make_config(limits={"requests_per_minute_per_key": 3}))
    account = client.account(credits=6)
    key, other_key = client.key(account, "One"), client.key(account, "Two")
    path = f"{URL}/{uuid.uuid4()}"

    answers = [client.http.get(path, headers=bearer(key)) for _ in range(4)]

    assert [a.status_code for a in answers] == [404, 404, 404, 429]
    refused = answers[-1]
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    assert refused.json()["error"] == (
        f"Too many requests with this API key: at most 3 a minute."
        f" Retry after {refused.headers['retry-after']} seconds")
    assert client.http.post(URL, json={"prompts": ["a"]}, headers=bearer(key)).status_code == 429
    assert client.balance(account) == 6, "a refused request is never charged"
    assert client.http.get(path, headers=bearer(other_key)).status_code == 404, "per key"


def test_the_rate_limit_refills_evenly_and_can_be_turned_off():
    now = [1000.0]
    limiter = KeyRateLimiter(60, clock=lambda: now[0])
    for _ in range(60):
        limiter.check(1)
    with pytest.raises(TooManyRequests) as refused:
        limiter.check(1)
    assert refused.value.retry_after == 1
    now[0] += 1.0  # one request's worth of refill at 60 a minute
    limiter.check(1)
    with pytest.raises(TooManyRequests):
        limiter.check(1)
    limiter.check(2)  # another key has its own bucket

    unlimited = KeyRateLimiter(0, clock=lambda: now[0])
    for _ in range(10_000):
        unlimited.check(1)


# Host names, against DNS rebinding.

@pytest.mark.parametrize(("header", "name", "port", "authority"), [
    ("example.com", "example.com", None, "example.com"),
    ("Example.COM:8000", "example.com", 8000, "example.com:8000"),
    ("example.com.", "example.com", None, "example.com"),
    ("xn--bcher-kva.example:65535", "xn--bcher-kva.example", 65535, "xn--bcher-kva.example:65535"),
    ("127.0.0.1:80", "127.0.0.1", 80, "127.0.0.1:80"),
    ("[::1]:8000", "::1", 8000, "[::1]:8000"),
    ("[0:0:0:0:0:0:0:1]", "::1", None, "[::1]"),
    ("[::FFFF:10.0.0.1]:1", "::ffff:a00:1", 1, "[::ffff:a00:1]:1"),
])
def test_host_headers_are_read_as_name_and_port(header, name, port, authority):
    host = parse_host(header)
    assert (host.name, host.port, host.authority) == (name, port, authority)


@pytest.mark.parametrize(("header", "problem"), [
    ("localhost:abc", "bad port"), ("127.0.0.1:99999", "bad port"), ("[::1]:x", "bad port"),
    ("localhost:0", "bad port"), ("localhost:", "bad port"), ("localhost:+80", "bad port"),
    ("localhost:\u0668\u0660", "bad port"), ("localhost:80:80", "bad port"),
    ("[::1]8000", "bad port"),
    ("[::1]@evil.example", "names a user"), ("user@localhost", "names a user"),
    ("[localhost]", "brackets"), ("[127.0.0.1]:80", "brackets"), ("[fe80::1%25eth0]", "brackets"),
    ("[v1.future]", "brackets"), ("[::1", "brackets"),
    ("", "not a host name"), ("::1", "not a host name"), (".example", "not a host name"),
    ("a..example", "not a host name"), ("-a.example", "not a host name"),
    ("a_b.example", "not a host name"), ("exa mple.com", "not a host name"),
    ("caf\u00e9.example", "not a host name"), ("a/b", "not a host name"),
    ("127.1", "not a host name"), ("1.2.3", "not a host name"),
    ("999.1.1.1", "not a host name"), ("127.000.0.1", "not a host name"),
    ("x" * 64 + ".example", "not a host name"), (("a" * 60 + ".") * 5, "not a host name"),
])
def test_malformed_host_headers_are_refused_with_their_problem(header, problem):
    with pytest.raises(BadHost, match=problem):
        parse_host(header)


def test_the_host_policy_allows_addresses_its_own_names_and_configured_ones():
    policy = HostPolicy.for_server(ServerConfig(host="0.0.0.0",
                                                allowed_hosts="images.example.com, *.lan.example"))
    for allowed in ("localhost:8000", "127.0.0.1", "192.168.1.20:8000", "[fe80::1]:8000",
                    "images.example.com", "IMAGES.example.com:443", "images.example.com.",
                    "gpu.lan.example"):
        assert policy.allows(parse_host(allowed)), allowed
    for refused in ("attacker.example", "images.example.com.attacker.example",
                    "lan.example.attacker", "localhost.attacker.example", "example.com"):
        assert not policy.allows(parse_host(refused)), refused
    anything = HostPolicy.for_server(ServerConfig(allowed_hosts="*"))
    assert anything.allows(parse_host("anything.example"))


def test_a_foreign_host_name_is_refused_on_every_route(instant_client):
    client = instant_client
    account = client.account(credits=6)
    key = client.key(account)
    for method, path in (("GET", "/healthz"), ("GET", "/schema/openapi.json"),
                         ("POST", URL), ("GET", f"{URL}/{uuid.uuid4()}")):
        response = client.http.request(method, path, json={"prompts": ["a"]},
                                       headers={**bearer(key), "Host": "rebound.attacker.example"})
        assert response.status_code == 400, path
        assert response.json() == {"error": "this server does not answer to the host name"
                                            " 'rebound.attacker.example'; an administrator can"
                                            " add it to server.allowed_hosts"}
    assert_nothing_charged(client, account, 6)
    for host in ("localhost:8000", "10.1.2.3:8000", "[::1]:8000"):
        assert client.http.get("/healthz", headers={"Host": host}).status_code == 200, host


def test_a_bad_allowed_hosts_setting_stops_startup(tmp_path):
    from appliance.core.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"server\.allowed_hosts must be host names"):
        config_from_dict({"server": {"allowed_hosts": "good.example, bad name"}}, base_dir=tmp_path)
