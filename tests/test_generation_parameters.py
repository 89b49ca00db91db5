"""Per-request generation parameters: bounds, echo, seeds and reproducibility."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from appliance.core.config import ConfigError, config_from_dict
from appliance.jobs.models import MAX_SEED

from .helpers import InstantGenerator, bearer, count_rows

URL = "/api/playground/images"


def post(client, key, **fields):
    return client.http.post(URL, json={"prompts": ["a lighthouse"], **fields}, headers=bearer(key))


def png(client, key, image) -> bytes:
    response = client.http.get(image["url"], headers=bearer(key))
    assert response.status_code == 200
    return response.content


BAD_PARAMETERS = [
    ({"width": 56}, "'width' is 56; it must be a multiple of 8 from 64 to 1024"),
    ({"width": 1032}, "'width' is 1032; it must be a multiple of 8 from 64 to 1024"),
    ({"width": 100}, "'width' is 100; it must be a multiple of 8 from 64 to 1024"),
    ({"height": 0}, "'height' is 0; it must be a multiple of 8 from 64 to 1024"),
    ({"height": 2048}, "'height' is 2048; it must be a multiple of 8 from 64 to 1024"),
    ({"height": 65}, "'height' is 65; it must be a multiple of 8 from 64 to 1024"),
    ({"steps": 0}, "'steps' is 0; it must be from 1 to 100"),
    ({"steps": 101}, "'steps' is 101; it must be from 1 to 100"),
    ({"guidanceScale": -0.5}, "'guidanceScale' is -0.5; it must be from 0.0 to 20.0"),
    ({"guidanceScale": 20.5}, "'guidanceScale' is 20.5; it must be from 0.0 to 20.0"),
    ({"seed": -1}, "'seed' is -1; it must be from 0 to 4294967295"),
    ({"seed": 2**32}, "'seed' is 4294967296; it must be from 0 to 4294967295"),
    ({"negativePrompt": "x" * 1001},
     "'negativePrompt' is 1001 characters long; the limit is 1000"),
    ({"width": 64.5}, "'width' must be a whole number"),
    ({"steps": "two"}, "'steps' must be a number, not a string"),
    ({"guidanceScale": "high"}, "'guidanceScale' must be a number, not a string"),
    ({"seed": True}, "'seed' must be a number, not true or false"),
    ({"negativePrompt": 3}, "'negativePrompt' must be a string, not a number"),
    ({"sampler": "euler"}, "the request body has an unknown field 'sampler'"),
]


def test_out_of_range_parameters_get_a_400_naming_field_and_range_and_cost_nothing(instant_client):
    client = instant_client
    account = client.account(credits=5)
    key = client.key(account)
    for fields, error in BAD_PARAMETERS:
        response = post(client, key, **fields)
        assert (response.status_code, response.json()) == (400, {"error": error}), fields
    assert client.balance(account) == 5
    assert count_rows(client.database.db(), "jobs") == 0


def test_bounds_come_from_the_config(make_client, make_config):
    config = make_config(generation={"max_size": 128, "max_steps": 3, "max_guidance_scale": 9.0})
    client = make_client(load_generator=InstantGenerator, app_config=config)
    key = client.key(client.account())
    assert post(client, key, width=136).json()["error"] == \
        "'width' is 136; it must be a multiple of 8 from 64 to 128"
    assert post(client, key, steps=4).json()["error"] == "'steps' is 4; it must be from 1 to 3"
    assert post(client, key, guidanceScale=9.5).json()["error"] == \
        "'guidanceScale' is 9.5; it must be from 0.0 to 9.0"
    assert post(client, key, width=128, height=64, steps=3, guidanceScale=9).status_code == 200


def test_defaults_outside_the_bounds_stop_startup_naming_the_keys(tmp_path):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"generation": {"steps": 150}}, base_dir=tmp_path)
    assert str(caught.value) == ("generation.steps must be between generation.min_steps and"
                                 " generation.max_steps (1 and 100), got 150")


def test_prompts_alone_behave_as_before_and_the_job_echoes_the_defaults(client):
    key = client.key(client.account())
    response = post(client, key)
    assert response.status_code == 200
    assert set(response.json()) == {"jobId", "totalImages", "creditsUsed", "credits"}
    job = client.wait_for_job(key, response.json()["jobId"])
    assert job["status"] == "completed"
    # The defaults come from the test config (helpers.TEST_GENERATION: 64x64, 2 steps).
    assert job["parameters"] == {"negativePrompt": None, "width": 64, "height": 64, "steps": 2,
                                 "guidanceScale": 7.5, "seed": None, "model": "tiny",
                                 "loras": [], "creditsPerImage": 1}
    assert job["queuePosition"] is None and job["cancelledImages"] == 0
    assert 0 <= job["images"][0]["seed"] <= MAX_SEED


def test_parameters_are_used_echoed_and_seeds_count_up_from_the_base(client):
    key = client.key(client.account())
    response = post(client, key, prompts=["a", "b", "c"], width=80, height=64, steps=1,
                    guidanceScale=3, seed=MAX_SEED - 1, negativePrompt="blurry")
    job = client.wait_for_job(key, response.json()["jobId"])
    assert job["status"] == "completed"
    assert job["parameters"] == {"negativePrompt": "blurry", "width": 80, "height": 64,
                                 "steps": 1, "guidanceScale": 3.0, "seed": MAX_SEED - 1,
                                 "model": "tiny", "loras": [], "creditsPerImage": 1}
    # seed + i, wrapping past 2**32 - 1 to 0.
    assert [image["seed"] for image in job["images"]] == [MAX_SEED - 1, MAX_SEED, 0]
    for image in job["images"]:
        assert Image.open(io.BytesIO(png(client, key, image))).size == (80, 64)


def test_same_seed_and_parameters_give_the_same_image(client):
    key = client.key(client.account(credits=10))

    def make(**fields) -> bytes:
        job_id = post(client, key, **fields).json()["jobId"]
        job = client.wait_for_job(key, job_id)
        assert job["status"] == "completed", job
        return png(client, key, job["images"][0])

    first = make(seed=1234, steps=2)
    assert make(seed=1234, steps=2) == first
    assert make(seed=1235, steps=2) != first
    assert make(seed=1234, steps=2, negativePrompt="fog") != first


def test_openapi_describes_the_new_parameters_and_routes(instant_client):
    client = instant_client
    doc = client.http.get("/schema/openapi.json").json()
    request = doc["components"]["schemas"]["CreateImagesRequest"]
    assert request["required"] == ["prompts"]
    for field in ("negativePrompt", "width", "height", "steps", "guidanceScale", "seed"):
        assert request["properties"][field]["description"], field
    job = doc["components"]["schemas"]["JobResponse"]["properties"]
    assert {"queuePosition", "parameters", "cancelledImages"} <= set(job)
    assert "cancelled" in str(job["status"])
    paths = doc["paths"]
    assert set(paths["/api/playground/images/{job_id}"]) == {"get", "delete"}
    events = paths["/api/playground/images/{job_id}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert "queuePosition" in events["description"]
    generations = paths["/v1/images/generations"]["post"]
    assert set(generations["responses"]) >= {"200", "400", "401", "402", "503", "504"}
    assert generations["security"] == [{"apiKey": []}]
    openai_request = doc["components"]["schemas"]["OpenAIImageRequest"]["properties"]
    assert {"prompt", "n", "size", "response_format", "model"} <= set(openai_request)
    assert "/v1/models" in paths
