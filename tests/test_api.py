"""The bulk image API against its contract, on the real tiny pipeline where the images matter."""

from __future__ import annotations

import io
import threading
import uuid

import pytest
from PIL import Image

from appliance.accounts import accounts, keys
from appliance.accounts.audit import Actor

from .helpers import InstantGenerator, bearer, count_rows

URL = "/api/playground/images"
DOC_PROMPTS = ["A beautiful sunset over the ocean", "A futuristic cityscape"]


def test_documented_request_charges_and_completes_with_two_pngs(client):
    account = client.account(credits=6)
    key = client.key(account)

    response = client.http.post(URL, json={"prompts": DOC_PROMPTS}, headers=bearer(key))

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"jobId", "totalImages", "creditsUsed", "credits"}
    assert str(uuid.UUID(body["jobId"])) == body["jobId"]
    assert (body["totalImages"], body["creditsUsed"], body["credits"]) == (2, 2, 4)

    job = client.wait_for_job(key, body["jobId"])
    assert job["status"] == "completed"
    assert (job["totalImages"], job["completedImages"], job["failedImages"]) == (2, 2, 0)
    assert (job["creditsUsed"], job["creditsRefunded"], job["pendingImages"]) == (2, 0, 0)
    assert job["createdAt"].endswith("Z") and job["finishedAt"] >= job["startedAt"]
    assert [image["prompt"] for image in job["images"]] == DOC_PROMPTS
    for image in job["images"]:
        png = client.http.get(image["url"], headers=bearer(key))
        assert png.status_code == 200
        assert png.headers["content-type"] == "image/png"
        decoded = Image.open(io.BytesIO(png.content))
        decoded.load()
        assert decoded.size == (64, 64)
        # Random weights give noise, never a flat image.
        assert any(low < high for low, high in decoded.getextrema())
    assert client.balance(account) == 4
    assert accounts.ledger_total(client.database.db(), account.id) == 4


def test_seeds_are_recorded_and_differ_between_images(client):
    key = client.key(client.account())
    created = client.http.post(URL, json={"prompts": ["a", "a"]}, headers=bearer(key))
    job_id = created.json()["jobId"]
    job = client.wait_for_job(key, job_id)
    seeds = [image["seed"] for image in job["images"]]
    assert len(set(seeds)) == 2
    pngs = [client.http.get(image["url"], headers=bearer(key)).content for image in job["images"]]
    assert pngs[0] != pngs[1]


@pytest.mark.parametrize(
    ("headers", "status", "error"),
    [
        ({}, 401, "Missing or invalid Authorization header"),
        ({"Authorization": ""}, 401, "Missing or invalid Authorization header"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401, "Missing or invalid Authorization header"),
        ({"Authorization": "Bearer"}, 401, "Missing or invalid Authorization header"),
        ({"Authorization": "Bearer sk-abc"}, 401, "Invalid API key format"),
        ({"Authorization": "Bearer wi_live_" + "A" * 64}, 401, "Invalid API key format"),
        ({"Authorization": "Bearer wi_live_" + "a" * 63}, 401, "Invalid API key format"),
        ({"Authorization": "Bearer wi_live_" + "a" * 65}, 401, "Invalid API key format"),
        ({"Authorization": "Bearer wi_test_" + "a" * 64}, 401, "Invalid API key format"),
        ({"Authorization": "Bearer wi_live_" + "a" * 64}, 401, "Invalid API key"),
    ],
)
def test_authentication_errors_have_the_contract_texts(shared_instant_client, headers, status,
                                                      error):
    client = shared_instant_client
    account = client.fresh_account()
    client.key(account)
    for method, path in (("POST", URL), ("GET", f"{URL}/{uuid.uuid4()}")):
        response = client.http.request(method, path, json={"prompts": ["x"]}, headers=headers)
        assert (response.status_code, response.json()) == (status, {"error": error})
    assert client.balance(account) == 6


def test_deleted_key_is_refused_at_once(instant_client):
    client = instant_client
    account = client.account()
    key = client.key(account)
    assert client.http.post(URL, json={"prompts": ["x"]}, headers=bearer(key)).status_code == 200
    keys.delete_key(client.database.db(), account.id, key[:12], Actor(ip_address="127.0.0.1"))
    response = client.http.post(URL, json={"prompts": ["x"]}, headers=bearer(key))
    assert (response.status_code, response.json()) == (401, {"error": "Invalid API key"})
    assert client.balance(account) == 5


def test_insufficient_credits_charges_nothing(instant_client):
    client = instant_client
    account = client.account(credits=2)
    key = client.key(account)
    response = client.http.post(URL, json={"prompts": ["a", "b", "c"]}, headers=bearer(key))
    assert (response.status_code, response.json()) == (402, {"error": "Insufficient credits"})
    assert client.balance(account) == 2
    db = client.database.db()
    # Only the initial grant.
    assert count_rows(db, "jobs") == 0 and count_rows(db, "credit_ledger") == 1


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"not json", "the request body is not valid JSON"),
        (b"", "the request body is empty or not a JSON object"),
        (b"[]", "the request body must be a JSON object, not a list"),
        (b"{}", "the request body has no 'prompts' field"),
        (b'{"prompt": "a"}', "the request body has an unknown field 'prompt'"),
        (b'{"prompts": "a sunset"}', "'prompts' must be a list, not a string"),
        (b'{"prompts": null}', "'prompts' must be a list, not null"),
        (b'{"prompts": ["ok", 3]}', "'prompts[1]' must be a string, not a number"),
        (b'{"prompts": []}', "'prompts' is empty: give at least one prompt"),
        (b'{"prompts": ["ok", "  "]}', "prompts[1] is empty"),
        (b'{"prompts": ["' + b"x" * 1001 + b'"]}',
         "prompts[0] is 1001 characters long; the limit is 1000"),
        (b'{"prompts": [' + b",".join([b'"x"'] * 101) + b"]}",
         "'prompts' has 101 prompts; at most 100 are allowed per request"),
    ],
)
def test_bad_bodies_get_a_clear_400_and_cost_nothing(shared_instant_client, content, error):
    client = shared_instant_client
    account = client.fresh_account(credits=1000)
    key = client.key(account)
    response = client.http.post(URL, content=content,
                                headers={**bearer(key), "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"].startswith(error)
    assert client.balance(account) == 1000
    assert client.jobs_of(account) == 0


def test_another_accounts_job_is_answered_like_an_unknown_one(instant_client):
    client = instant_client
    owner_key = client.key(client.account("owner@example.com"))
    other_key = client.key(client.account("other@example.com"))
    created = client.http.post(URL, json={"prompts": ["x"]}, headers=bearer(owner_key))
    job_id = created.json()["jobId"]
    client.wait_for_job(owner_key, job_id)

    theirs = client.http.get(f"{URL}/{job_id}", headers=bearer(other_key))
    unknown = client.http.get(f"{URL}/{uuid.uuid4()}", headers=bearer(other_key))
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json() == unknown.json() == {"error": "Job not found"}
    image = client.http.get(f"{URL}/{job_id}/images/0", headers=bearer(other_key))
    assert (image.status_code, image.json()) == (404, {"error": "Job not found"})


class BlockingGenerator:
    """Holds every batch until released: lets a test fill the queue."""

    def __init__(self, real):
        self.real = real
        self.release = threading.Event()

    def generate(self, prompts, seeds, settings):
        self.release.wait(30)
        return self.real.generate(prompts, seeds, settings)


def test_full_queue_answers_503_with_retry_after_and_charges_nothing(make_client, make_config):
    config = make_config(engine={"queue_capacity": 3, "batch_size": 1})
    blocking = BlockingGenerator(InstantGenerator())
    client = make_client(load_generator=lambda: blocking, app_config=config)
    account = client.account(credits=10)
    key = client.key(account)

    first = client.http.post(URL, json={"prompts": ["a", "b", "c"]}, headers=bearer(key))
    assert first.status_code == 200
    # The worker may have taken one image off the queue; four more never fit.
    refused = client.http.post(URL, json={"prompts": ["d", "e", "f", "g"]}, headers=bearer(key))
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) > 0
    assert "queue is full" in refused.json()["error"]
    assert client.balance(account) == 7

    blocking.release.set()
    assert client.wait_for_job(key, first.json()["jobId"])["completedImages"] == 3


class FailingGenerator:
    def generate(self, prompts, seeds, settings):
        raise RuntimeError("CUDA out of memory")


def test_failed_images_are_refunded_through_the_ledger(make_client):
    client = make_client(load_generator=FailingGenerator)
    account = client.account(credits=6)
    key = client.key(account)
    body = client.http.post(URL, json={"prompts": DOC_PROMPTS}, headers=bearer(key)).json()
    assert body["credits"] == 4

    job = client.wait_for_job(key, body["jobId"])
    assert job["status"] == "failed"
    assert (job["failedImages"], job["creditsRefunded"]) == (2, 2)
    assert all(image["status"] == "failed" and "url" not in image for image in job["images"])
    assert "RuntimeError" in job["images"][0]["error"]
    assert client.balance(account) == 6
    db = client.database.db()
    assert accounts.ledger_total(db, account.id) == 6
    reasons = [r["reason"] for r in db.query(
        "SELECT reason FROM credit_ledger WHERE account_id = ? ORDER BY id", [account.id])]
    assert reasons == ["initial grant", "image job", "refund: image failed"]


def test_unfinished_image_is_not_served(instant_client):
    client = instant_client
    account = client.account()
    key = client.key(account)
    job_id = client.http.post(URL, json={"prompts": ["x"]}, headers=bearer(key)).json()["jobId"]
    client.wait_for_job(key, job_id)
    missing = client.http.get(f"{URL}/{job_id}/images/7", headers=bearer(key))
    assert missing.status_code == 404 and "not ready" in missing.json()["error"]


def test_last_used_is_recorded_on_use(instant_client):
    client = instant_client
    account = client.account()
    key = client.key(account)
    assert keys.list_keys(client.database.db(), account.id)[0].last_used_at is None
    client.http.get(f"{URL}/{uuid.uuid4()}", headers=bearer(key))
    # Written on a thread of its own, so that the request does not wait for it.
    assert client.services.keys.uses.wait(5)
    assert keys.list_keys(client.database.db(), account.id)[0].last_used_at is not None


def test_openapi_document_describes_the_routes_and_errors(instant_client):
    client = instant_client
    doc = client.http.get("/schema/openapi.json").json()
    post = doc["paths"]["/api/playground/images"]["post"]
    assert set(post["responses"]) >= {"200", "400", "401", "402", "503"}
    assert post["security"] == [{"apiKey": []}]
    request_schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert "prompts" in str(doc["components"]["schemas"]) and request_schema
    get_job = doc["paths"]["/api/playground/images/{job_id}"]["get"]
    assert set(get_job["responses"]) >= {"200", "401", "404"}
    assert "/api/playground/images/{job_id}/images/{index}" in doc["paths"]
    assert doc["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"


def test_unknown_route_errors_are_json_with_error(instant_client):
    client = instant_client
    response = client.http.get("/nowhere")
    assert response.status_code == 404 and "error" in response.json()
