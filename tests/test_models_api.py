"""Several models over HTTP: listed, chosen per request, priced, refused when unknown or
broken, LoRA adapters applied, and two real models sharing a worker under a budget that
fits one. The models are the project's synthesized tiny SD 1.5 and tiny SDXL pipelines."""

from __future__ import annotations

import io
import itertools
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from litestar.testing import TestClient
from PIL import Image

from appliance.accounts import accounts, audit, keys
from appliance.core.config import config_from_dict
from appliance.core.database import ConnectionPool
from appliance.engine.loaded_models import weights_on_disk
from appliance.engine.synth import synthesize, synthesize_lora
from appliance.services import Services
from appliance.web.app import create_app

from .helpers import TEST_GENERATION, Client, bearer
from .serve_process import ServeProcess, write_config

URL = "/api/playground/images"


@pytest.fixture(scope="module")
def installed(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """models/xl (tiny SDXL) beside model.path's tiny SD 1.5; loras/brand fits tiny,
    loras/xl-style fits xl."""
    root = tmp_path_factory.mktemp("installed")
    synthesize(root / "models" / "xl", "tiny-sdxl")
    synthesize_lora(root / "loras" / "brand", tiny_model, ["tiny"], seed=1)
    synthesize_lora(root / "loras" / "xl-style", root / "models" / "xl", ["xl"], seed=2)
    return {"models": root / "models", "loras": root / "loras"}


def models_config(make_config, installed, **sections):
    return make_config(model={"dir": str(installed["models"]),
                              "lora_dir": str(installed["loras"])},
                       models={"xl": {"width": 64, "height": 64, "credits_per_image": 3}},
                       **sections)


@pytest.fixture(scope="module")
def shared_client(tmp_path_factory, tiny_model, installed) -> Iterator[Client]:
    """One app for the tests that only read or add jobs: starting one costs more than
    most of these tests. Each test makes accounts of its own (`account`)."""
    folder = tmp_path_factory.mktemp("shared")
    config = config_from_dict({
        "storage": {"data_dir": str(folder / "data"),
                    "database": str(folder / "data" / "appliance.db")},
        "model": {"path": str(tiny_model), "device": "cpu", "dir": str(installed["models"]),
                  "lora_dir": str(installed["loras"])},
        "models": {"xl": {"width": 64, "height": 64, "credits_per_image": 3}},
        "generation": dict(TEST_GENERATION),
        "server": {"allowed_hosts": "testserver.local"},
    }, base_dir=folder)
    services = Services.build(config)
    with TestClient(create_app(services)) as http:
        while not services.engine.ready:
            assert services.engine.load_error is None, services.engine.load_error
            time.sleep(0.02)
        database = ConnectionPool(config.storage.database)
        yield Client(http, database, services)
        database.close()


@pytest.fixture
def client(shared_client):
    return shared_client


EMAILS = (f"user{n}@example.com" for n in itertools.count())


def account(client, credits=6):
    """A new account in the shared app, and its key."""
    made = client.account(next(EMAILS), credits=credits)
    return made, client.key(made)


def post(client, key, **fields):
    return client.http.post(URL, json={"prompts": ["a lighthouse"], **fields},
                            headers=bearer(key))


def png(client, key, image) -> Image.Image:
    response = client.http.get(image["url"], headers=bearer(key))
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


def test_the_installed_models_are_listed_with_their_defaults_price_and_adapters(client):
    _, key = account(client)
    listed = client.http.get("/api/models", headers=bearer(key))
    assert listed.status_code == 200
    models = listed.json()["models"]
    # Whether xl is loaded yet depends on the tests before; see the next test.
    assert models[1].pop("loadedOn") in ([], ["engine-worker"])
    assert models == [
        {"name": "tiny", "default": True, "pipeline": "StableDiffusionPipeline",
         "creditsPerImage": 1,
         "parameters": {"width": 64, "height": 64, "steps": 2, "guidanceScale": 7.5},
         "loadedOn": ["engine-worker"], "loras": ["brand"]},
        {"name": "xl", "default": False, "pipeline": "StableDiffusionXLPipeline",
         "creditsPerImage": 3,
         "parameters": {"width": 64, "height": 64, "steps": 2, "guidanceScale": 7.5},
         "loras": ["xl-style"]}]
    openai = client.http.get("/v1/models", headers=bearer(key)).json()
    assert [model["id"] for model in openai["data"]] == ["tiny", "xl"]
    assert {key: openai["data"][1][key] for key in ("default", "credits_per_image", "size")} == {
        "default": False, "credits_per_image": 3, "size": "64x64"}
    assert client.http.get("/api/models").status_code == 401


def test_each_model_makes_its_own_images_at_its_price(client):
    owner, key = account(client, credits=20)
    response = post(client, key, model="xl", prompts=["a", "b"], seed=5)
    assert response.status_code == 200 and response.json()["creditsUsed"] == 6
    assert response.json()["credits"] == 14 == client.balance(owner)
    job = client.wait_for_job(key, response.json()["jobId"])
    assert job["status"] == "completed"
    assert job["parameters"]["model"] == "xl" and job["parameters"]["creditsPerImage"] == 3
    assert png(client, key, job["images"][0]).size == (64, 64)
    # The default model when none is named, at its own price.
    job = client.wait_for_job(key, post(client, key).json()["jobId"])
    assert job["parameters"]["model"] == "tiny" and client.balance(owner) == 13
    # Short of the price of every image: 402, nothing charged (5 xl images cost 15).
    refused = post(client, key, model="xl", prompts=["a", "b", "c", "d", "e"])
    assert refused.status_code == 402 and client.balance(owner) == 13
    # The worker now holds both (the tiny ones fit the default budget together).
    models = {m["name"]: m for m in client.http.get("/api/models",
                                                    headers=bearer(key)).json()["models"]}
    assert models["xl"]["loadedOn"] == ["engine-worker"]


@pytest.mark.parametrize("fields, message", [
    ({"model": "nope"}, "'model' is 'nope', which is not installed here; installed: tiny, xl"),
    ({"model": ""}, "'model' is '', which is not installed here"),
    ({"loras": [{"name": "xl-style"}]}, "'loras[0].name' is 'xl-style', which fits xl, not the"
                                        " model 'tiny'"),
    ({"loras": [{"name": "ghost"}]}, "'loras[0].name' is 'ghost', which is not installed here;"
                                     " installed: brand, xl-style"),
    ({"loras": [{"name": "brand"}, {"name": "brand", "scale": 0.5}]},
     "'loras[1].name' is 'brand', which is already applied"),
    ({"loras": [{"name": "brand", "scale": 9}]}, "'loras[0].scale' is 9.0; it must be from -4.0"),
    ({"loras": [{"name": "brand"}] * 6}, "'loras' has 6 adapters; at most 5"),
    ({"loras": [{"name": "brand", "weight": 1}]}, "unknown field"),
    ({"loras": [{"scale": 1}]}, "name"),
])
def test_an_unknown_model_or_an_adapter_that_does_not_fit_is_refused_uncharged(client, fields,
                                                                             message):
    owner, key = account(client)
    response = post(client, key, **fields)
    assert response.status_code == 400
    assert message in response.json()["error"], response.json()
    assert client.balance(owner) == 6


def test_the_openai_endpoint_chooses_and_refuses_models_in_its_own_shape(client):
    owner, key = account(client)
    refused = client.http.post("/v1/images/generations", headers=bearer(key),
                               json={"prompt": "a fox", "model": "dall-e-3"})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "model"
    assert "installed: tiny, xl" in refused.json()["error"]["message"]
    made = client.http.post("/v1/images/generations", headers=bearer(key),
                            json={"prompt": "a fox", "model": "xl", "n": 1})
    assert made.status_code == 200 and len(made.json()["data"]) == 1
    assert client.balance(owner) == 3


def test_an_adapter_changes_the_images_and_batches_apart_from_the_plain_model(client):
    _, key = account(client, credits=10)
    plain = post(client, key, seed=9, prompts=["a", "b"]).json()["jobId"]
    styled = post(client, key, seed=9, prompts=["a", "b"],
                  loras=[{"name": "brand", "scale": 1.0}]).json()["jobId"]
    plain_job, styled_job = (client.wait_for_job(key, job) for job in (plain, styled))
    assert styled_job["parameters"]["loras"] == [{"name": "brand", "scale": 1.0}]
    for plain_image, styled_image in zip(plain_job["images"], styled_job["images"], strict=True):
        assert (png(client, key, plain_image).tobytes()
                != png(client, key, styled_image).tobytes())


def test_a_broken_model_fails_its_images_with_a_refund_and_the_others_keep_serving(
        make_client, make_config, tmp_path, tiny_model):
    models = tmp_path / "models"
    shutil.copytree(tiny_model, models / "broken")
    # Its index is fine, so it is listed; its UNet's weights are not weights.
    for weights in (models / "broken" / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    client = make_client(app_config=make_config(model={"dir": str(models)},
                                                models={"broken": {"credits_per_image": 2}}))
    account = client.account(credits=10)
    key = client.key(account)
    response = post(client, key, model="broken", prompts=["a", "b"])
    assert response.status_code == 200 and client.balance(account) == 6
    job = client.wait_for_job(key, response.json()["jobId"])
    assert job["status"] == "failed" and job["creditsRefunded"] == 4
    assert client.balance(account) == 10
    assert all(image["error"].startswith("the model 'broken' could not be loaded:")
               for image in job["images"])
    # Then it is refused up front, and listed with its problem, until its folder changes.
    refused = post(client, key, model="broken")
    assert refused.status_code == 400 and "which cannot be served" in refused.json()["error"]
    listed = {m["name"]: m for m in client.http.get("/api/models",
                                                    headers=bearer(key)).json()["models"]}
    assert "Could not load the model" in listed["broken"]["problem"]
    assert client.balance(account) == 10
    # The default model keeps serving.
    job = client.wait_for_job(key, post(client, key).json()["jobId"])
    assert job["status"] == "completed" and client.balance(account) == 9


@pytest.mark.system  # a real server process and a few seconds of real pipelines, swapping
def test_two_real_models_under_a_budget_for_one_take_turns_and_finish_every_image(
        tmp_path, installed, tiny_model, launcher):
    sizes = [weights_on_disk(tiny_model, "float32"),
             weights_on_disk(installed["models"] / "xl", "float32")]
    # Room for the larger of the two, not for both.
    budget = max(sizes) + min(sizes) // 2
    config = write_config(tmp_path, tiny_model, **{
        "model": {"dir": str(installed["models"]), "lora_dir": str(installed["loras"])},
        "models.xl": {"width": 64, "height": 64, "credits_per_image": 3},
        "engine": {"gpu_memory_budget": f"{budget}B", "model_swap_seconds": 0.2,
                   "batch_size": 2}})
    server = ServeProcess(config, tmp_path / "serve.log", launcher).start()
    try:
        database = ConnectionPool(tmp_path / "data" / "appliance.db")
        keys_of = []
        for n in range(3):
            owner = accounts.create_account(database.db(), f"user{n}@example.com",
                                            "correct horse battery", audit.Actor.cli(),
                                            credits=30)
            keys_of.append(keys.create_key(database.db(), owner.id, "Test", audit.Actor.cli())[1])
        database.close()
        jobs = []
        with httpx.Client(base_url=server.url, timeout=30) as http:
            # Three accounts ask for both models, interleaved, on real sockets.
            for key in keys_of:
                for model in ("tiny", "xl", "tiny"):
                    response = http.post(URL, headers=bearer(key), json={
                        "model": model, "prompts": [f"{model} {i}" for i in range(3)]})
                    assert response.status_code == 200, response.text
                    jobs.append((key, response.json()["jobId"], model))
            finished: dict[str, list[str]] = {"tiny": [], "xl": []}
            deadline = time.monotonic() + 120
            for key, job_id, model in jobs:
                while (job := http.get(f"{URL}/{job_id}", headers=bearer(key)).json())[
                        "status"] not in ("completed", "failed"):
                    assert time.monotonic() < deadline, "the jobs did not finish"
                    time.sleep(0.1)
                assert job["status"] == "completed" and job["completedImages"] == 3
                assert job["parameters"]["model"] == model
                finished[model].append(job["finishedAt"])
            ready = http.get("/readyz").json()
        loads = [line for line in (tmp_path / "serve.log").read_text().splitlines()
                 if "event=model.loaded" in line]
    finally:
        server.stop()
    # tiny at start, then xl (unloading tiny), and at least one swap back; one held at the end.
    assert len(loads) >= 3 and all("unloaded" in line for line in loads[1:]), loads
    assert len(ready["models_loaded"]["engine-worker"]) == 1
    # The xl images did not wait for every tiny one, nor the other way round.
    assert min(finished["xl"]) < max(finished["tiny"])
    assert min(finished["tiny"]) < max(finished["xl"])
