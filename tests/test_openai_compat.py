"""The OpenAI-compatible API, called with the official openai package over real HTTP."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from appliance.accounts import accounts

from .helpers import count_rows
from .live_server import GatedGenerator, LiveServer, real_generator


def openai_client(server: LiveServer, key: str) -> openai.OpenAI:
    # No retries: each test sees the server's first answer.
    return openai.OpenAI(api_key=key, base_url=f"{server.url}/v1", max_retries=0, timeout=60)


@pytest.fixture
def live(make_config):
    with LiveServer(make_config()) as server:
        yield server


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_images_generate_with_the_openai_package_charges_the_same_credits(live):
    account, key = live.account_with_key(credits=5)
    client = openai_client(live, key)

    result = client.images.generate(prompt="a red fox", n=2, size="72x64",
                                    response_format="b64_json")

    assert result.created > 0 and len(result.data) == 2
    images = [decoded(item.b64_json) for item in result.data]
    assert all(image.size == (72, 64) and image.format == "PNG" for image in images)
    assert images[0].tobytes() != images[1].tobytes()
    assert live.balance(account) == 3 == accounts.ledger_total(live.db, account.id)
    job = live.db.execute("SELECT total_images, credits_used, status FROM jobs").fetchone()
    assert job == (2, 2, "completed")

    # The same seed (an extension, sent through extra_body) gives the same image.
    seeded = [client.images.generate(prompt="a red fox", size="64x64", extra_body={"seed": 7})
              for _ in range(2)]
    assert seeded[0].data[0].b64_json == seeded[1].data[0].b64_json

    linked = client.images.generate(prompt="a red fox", response_format="url")
    url = linked.data[0].url
    assert url.startswith(live.url + "/api/playground/images/")
    assert httpx.get(url).status_code == 401  # the link needs the key, like the rest of the API
    fetched = httpx.get(url, headers={"Authorization": f"Bearer {key}"})
    assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)
    assert live.balance(account) == 0


def test_models_lists_the_loaded_model(live, tiny_model):
    _, key = live.account_with_key()
    client = openai_client(live, key)
    models = client.models.list()
    assert [model.id for model in models.data] == [tiny_model.name]
    assert models.data[0].object == "model"
    # The extensions reach the openai package's objects as extra fields.
    assert models.data[0].model_extra == {"default": True, "credits_per_image": 1,
                                          "size": "64x64", "steps": 2, "guidance_scale": 7.5}
    result = client.images.generate(prompt="x", model=tiny_model.name, size="64x64")
    assert len(result.data) == 1


def test_errors_use_openais_shape_and_charge_nothing(live, tiny_model):
    account, key = live.account_with_key(credits=2)
    client = openai_client(live, key)

    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", size="100x64")
    assert caught.value.body == {
        "message": "'size' is 100; it must be a multiple of 8 from 64 to 1024",
        "type": "invalid_request_error", "param": "size", "code": None}

    for kwargs, param in (({"size": "big"}, "size"), ({"n": 0}, "n"), ({"n": 101}, "n"),
                          ({"model": "dall-e-3"}, "model"), ({"prompt": " "}, "prompt"),
                          ({"extra_body": {"steps": 500}}, "steps"),
                          ({"extra_body": {"seed": -1}}, "seed"),
                          ({"extra_body": {"n": "two"}}, "n"),
                          ({"response_format": "png"}, "response_format")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(**{"prompt": "x", **kwargs})
        assert caught.value.body["param"] == param, (kwargs, caught.value.body)
        assert caught.value.body["type"] == "invalid_request_error"

    with pytest.raises(openai.APIStatusError) as caught:
        client.images.generate(prompt="x", n=3, size="64x64")
    assert caught.value.status_code == 402
    assert caught.value.body["message"] == "Insufficient credits"
    assert caught.value.body["code"] == "insufficient_quota"

    for bad_key, message in (("sk-not-ours", "Invalid API key format"),
                             ("wi_live_" + "0" * 64, "Invalid API key")):
        with pytest.raises(openai.AuthenticationError) as caught:
            openai_client(live, bad_key).models.list()
        assert caught.value.body["message"] == message
        assert caught.value.body["code"] == "invalid_api_key"

    unknown = httpx.get(f"{live.url}/v1/nowhere", headers={"Authorization": f"Bearer {key}"})
    assert unknown.status_code == 404
    assert set(unknown.json()["error"]) == {"message", "type", "param", "code"}
    # The native API keeps its own shape.
    native = httpx.get(f"{live.url}/api/playground/images/x")
    assert native.json() == {"error": "Missing or invalid Authorization header"}

    assert live.balance(account) == 2 == accounts.ledger_total(live.db, account.id)
    assert count_rows(live.db, "jobs") == 0


def test_a_request_that_outwaits_the_timeout_cancels_and_refunds(make_config):
    config = make_config(engine={"batch_size": 1}, openai={"wait_timeout": 1.0})
    gated = GatedGenerator(real_generator(config))
    with LiveServer(config, load_generator=lambda: gated) as live:
        account, key = live.account_with_key(credits=5)
        with pytest.raises(openai.APIStatusError) as caught:
            openai_client(live, key).images.generate(prompt="x", n=3, size="64x64")
        assert caught.value.status_code == 504
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert caught.value.body["type"] == "timeout"
        assert "2 not yet started were cancelled and refunded" in caught.value.body["message"]
        gated.gate.set()
        # The image that had started is made and stays paid for.
        assert live.balance(account) == 4 == accounts.ledger_total(live.db, account.id)
