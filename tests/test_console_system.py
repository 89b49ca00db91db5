"""The admins' system page and its JSON: workers, queue, model, disk, database, version, rates."""

from __future__ import annotations

import json
import re
import shutil
import time
from datetime import timedelta

import httpx
import pytest

from appliance.accounts import accounts, audit, keys
from appliance.core.clock import utc_clock
from appliance.core.config import load_config
from appliance.core.database import ConnectionPool
from appliance.core.version import package_version
from appliance.engine.metrics import ImageRate

from .console_helpers import (
    HTML,
    PASSWORD,
    SECOND_MODEL,
    SECOND_PRICE,
    post_form,
    sign_in,
    two_models,
)
from .helpers import InstantGenerator, bearer
from .live_server import GatedGenerator

URL = "/api/playground/images"
SYSTEM = "/console/admin/system"


def signed_in_admin(client, email: str = "root@example.com", credits: int = 0):
    accounts.create_account(client.database.db(), email, PASSWORD, audit.Actor.cli(),
                            is_admin=True, credits=credits)
    assert sign_in(client.http, email).status_code == 303


@pytest.mark.sqlite_only
def test_an_admin_sees_workers_queue_model_disk_database_and_version(instant_client):
    client = instant_client
    signed_in_admin(client)
    page = client.http.get(SYSTEM, headers=HTML)
    assert page.status_code == 200
    text = page.text
    config = client.services.config
    workers = text[text.index('data-table="workers"'):text.index("</tbody>",
                                                                text.index('data-table="workers"'))]
    assert "engine-worker" in workers and ">cpu<" in workers and ">idle<" in workers
    assert f'<td class="num" data-label="Batch size">{config.engine.batch_size}</td>' in workers
    assert f"{config.model.path} (loaded)" in text
    assert f'data-field="model-dtype">{config.model.dtype}<' in text
    assert "CPU only: no CUDA device in use" in text
    assert f'data-field="queue-depth">0 of {config.engine.queue_capacity} places<' in text
    assert "Nothing is waiting." in text
    assert " free of " in text and str(config.storage.data_dir) in text
    assert f'data-field="version">{package_version()}<' in text
    size = config.storage.database.stat().st_size
    assert size > 0 and 'data-field="database">' in text
    # The per-minute chart, drawn on the server: 60 columns, no inline style or script.
    chart = text[text.index('<svg class="chart sparkline"'):text.index("</svg>")]
    assert chart.count('<g class="column">') == 60
    assert "style=" not in text and "<script>" not in text
    assert '<script src="/console/static/system.js" defer></script>' in text
    assert client.http.get("/console/static/system.js").status_code == 200


def test_a_plain_user_gets_the_styled_refusal(instant_client):
    client = instant_client
    client.account("dev@example.com")
    sign_in(client.http, "dev@example.com")
    page = client.http.get(SYSTEM, headers=HTML)
    assert page.status_code == 403
    assert "<html" in page.text and "Only administrators can open this page" in page.text
    figures = client.http.get(f"{SYSTEM}.json")
    assert figures.status_code == 403
    assert figures.json() == {"error": "Only administrators can open this page"}
    assert "/console/admin/system" not in client.http.get("/console", headers=HTML).text


@pytest.mark.sqlite_only
def test_the_json_has_every_figure_of_the_page(instant_client):
    client = instant_client
    signed_in_admin(client)
    figures = client.http.get(f"{SYSTEM}.json").json()
    assert set(figures) == {"version", "ready", "heartbeatAgeSeconds", "model", "workers",
                            "models", "gpu", "images", "queue", "disk", "database", "text"}
    assert figures["ready"] is True and figures["version"] == package_version()
    assert set(figures["model"]) == {"path", "dtype", "device", "state"}
    (worker,) = figures["workers"]
    assert (worker["device"], worker["state"], worker["busy"], worker["batch"]) == (
        "cpu", "idle", False, None)
    (model,) = figures["models"]
    assert (model["name"], model["default"], model["loadedOn"]) == ("tiny", True, [worker["name"]])
    assert worker["models"] == [{"name": "tiny", "bytes": 0}]  # a stand-in has no weights
    assert figures["gpu"] == {"cuda": False, "devices": []}
    assert figures["images"]["perMinute"] == [0] * 60
    capacity = client.services.config.engine.queue_capacity
    assert figures["queue"] == {"depth": 0, "capacity": capacity, "byAccount": []}
    assert figures["disk"]["freeBytes"] > 0 and figures["disk"]["totalBytes"] >= (
        figures["disk"]["freeBytes"])
    assert figures["database"]["sizeBytes"] >= client.services.config.storage.database.stat(
        ).st_size
    # Each word on the page that system.js refreshes.
    assert set(figures["text"]) == {"version", "ready", "model", "model-dtype", "model-device",
                                    "gpu", "rate-minute", "rate-hour", "queue-depth", "disk",
                                    "database", "heartbeat"}


def test_each_workers_models_and_every_installed_model_with_its_price(make_client, make_config,
                                                                      tiny_model, tmp_path):
    config = two_models(make_config, tiny_model, tmp_path, engine={"gpu_memory_budget": "2GiB"})
    broken = tmp_path / "models" / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    client = make_client(load_generator=InstantGenerator, app_config=config)
    signed_in_admin(client, credits=SECOND_PRICE)
    figures = client.http.get(f"{SYSTEM}.json").json()
    (worker,) = figures["workers"]
    # At its start a worker loads the default model alone.
    assert worker["models"] == [{"name": "tiny", "bytes": 0}]
    assert (worker["modelBudgetBytes"], worker["budgetText"]) == (2**31, "2.0 GiB")
    assert worker["modelsText"] == "tiny (0 B)"

    # Images of the second model: the worker loads it too, and keeps both.
    assert post_form(client.http, "/console/playground", prompts="a cat",
                     model=SECOND_MODEL).status_code == 303
    deadline = time.monotonic() + 30
    while len((figures := client.http.get(f"{SYSTEM}.json").json())["workers"][0]["models"]) < 2:
        assert time.monotonic() < deadline, figures["workers"]
        time.sleep(0.02)
    (worker,) = figures["workers"]
    assert worker["modelsText"] == f"tiny (0 B), {SECOND_MODEL} (0 B)"
    by_name = {model["name"]: model for model in figures["models"]}
    assert list(by_name) == ["broken", SECOND_MODEL, "tiny"]
    assert by_name["tiny"] == {"name": "tiny", "default": True,
                               "pipeline": "StableDiffusionPipeline", "creditsPerImage": 1,
                               "loadedOn": ["engine-worker"], "problem": None,
                               "loadedText": "engine-worker"}
    assert (by_name[SECOND_MODEL]["default"], by_name[SECOND_MODEL]["creditsPerImage"],
            by_name[SECOND_MODEL]["loadedOn"]) == (False, SECOND_PRICE, ["engine-worker"])
    assert by_name["broken"]["problem"].startswith("its model_index.json cannot be read")
    assert by_name["broken"]["loadedText"] == "not loaded"

    page = client.http.get(SYSTEM, headers=HTML).text
    workers = page[page.index('data-table="workers"'):page.index("</tbody>",
                                                                page.index('data-table="workers"'))]
    assert f'<td data-label="Models held">tiny (0 B), {SECOND_MODEL} (0 B)</td>' in workers
    assert '<td class="num" data-label="Model budget">2.0 GiB</td>' in workers
    table = page[page.index('data-table="models"'):page.index("</tbody>",
                                                             page.index('data-table="models"'))]
    rows = table.split("<tr>")[1:]
    assert [re.search(r'<td class="mono title">([^< ]+)', row)[1] for row in rows] == [
        "broken", SECOND_MODEL, "tiny"]
    assert '<span class="badge">default</span>' in rows[2]
    assert "default" not in rows[0] + rows[1]
    assert f'data-label="Credits/image">{SECOND_PRICE}</td>' in rows[1]
    assert 'data-label="Loaded on">engine-worker</td>' in rows[1]
    assert ('<td class="state-down" data-label="Problem">its model_index.json cannot be read'
            in rows[0])
    assert 'data-label="Loaded on">not loaded</td>' in rows[0]
    # A model that cannot be served is not offered in the playground.
    playground = client.http.get("/console/playground").text
    assert 'value="broken"' not in playground and f'value="{SECOND_MODEL}"' in playground


def test_queue_depth_by_account_and_the_busy_workers_batch(make_client, make_config):
    config = make_config(engine={"batch_size": 1})
    gated = GatedGenerator(InstantGenerator())
    client = make_client(load_generator=lambda: gated, app_config=config)
    try:
        first = client.key(client.account("first@example.com", credits=10))
        second = client.key(client.account("second@example.com", credits=10))
        assert client.http.post(URL, json={"prompts": ["a", "b", "c"]},
                                headers=bearer(first)).status_code == 200
        assert gated.started.wait(30)  # the first image is in the pipeline, the rest wait
        assert client.http.post(URL, json={"prompts": ["d", "e", "f", "g"]},
                                headers=bearer(second)).status_code == 200
        signed_in_admin(client)
        figures = client.http.get(f"{SYSTEM}.json").json()
        assert figures["queue"]["depth"] == 6
        assert figures["queue"]["byAccount"] == [{"email": "second@example.com", "images": 4},
                                                 {"email": "first@example.com", "images": 2}]
        (worker,) = figures["workers"]
        assert (worker["state"], worker["busy"], worker["batchesInFlight"]) == ("busy", True, 1)
        assert worker["batch"] == {"size": 1, "width": 64, "height": 64, "steps": 2,
                                   "guidanceScale": 7.5}
        page = client.http.get(SYSTEM, headers=HTML).text
        assert "<tr><td>second@example.com</td><td class=\"num\">4</td></tr>" in page
        assert "<tr><td>first@example.com</td><td class=\"num\">2</td></tr>" in page
        assert "1 images, 64x64, 2 steps, guidance 7.5" in page
        assert ">busy<" in page
    finally:
        gated.gate.set()


def test_images_a_second_over_the_last_minute_after_images_were_made(instant_client):
    client = instant_client
    key = client.key(client.account(credits=10))
    job = client.http.post(URL, json={"prompts": ["a", "b", "c", "d", "e", "f"]},
                           headers=bearer(key)).json()
    assert client.wait_for_job(key, job["jobId"])["completedImages"] == 6
    signed_in_admin(client)
    deadline = time.monotonic() + 10
    # The count is taken once the batch's end is recorded, just after the job reads completed.
    while (images := client.http.get(f"{SYSTEM}.json").json()["images"])["lastMinute"] < 6:
        assert time.monotonic() < deadline, images
        time.sleep(0.02)
    assert (images["lastMinute"], images["lastHour"], images["perSecondLastMinute"]) == (6, 6, 0.1)
    assert images["perMinute"][-1] == 6 and sum(images["perMinute"]) == 6
    page = client.http.get(SYSTEM, headers=HTML).text
    assert "0.10 images/s (6 in 1 min)" in page
    assert "<title>6 images 0 to 1 min ago</title>" in page


def test_the_rate_ring_forgets_after_an_hour_and_counts_by_minute():
    now = [10_000.0]
    rate = ImageRate(clock=lambda: now[0])
    rate.add(2)
    now[0] += 59.5
    rate.add(3)  # the same minute, counting back from now
    assert rate.per_minute()[-1] == 5
    now[0] += 60
    rate.add(1)
    assert rate.per_minute()[-2:] == (5, 1)
    now[0] += 3600 - 60  # the first two adds are now over an hour old
    assert sum(rate.per_minute()) == 1
    now[0] += 60
    rate.add(4)  # reuses the slot of a second an hour ago: the old count is not added to
    assert rate.per_minute() == (0,) * 59 + (4,)


@pytest.mark.system
def test_the_system_page_dashboard_and_playground_in_a_browser_at_phone_and_desktop_widths(
        forked_server):
    # Imported here: that module skips itself where chromium is missing, which must not
    # skip this module's quick tests.
    from .browser_helpers import (
        ARTIFACTS,
        CHROMIUM,
        CHROMIUM_ARGS,
        shoot,
        sign_in,
        sync_playwright,
    )
    from .test_console_dashboard import at_noon, made_job

    base, config_path, _, _ = forked_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    database = ConnectionPool(load_config(config_path).storage.database)
    db = database.db()
    me = accounts.create_account(db, "ops@example.com", PASSWORD, audit.Actor.cli(),
                                 is_admin=True, credits=200)
    busy = accounts.create_account(db, "busy@example.com", PASSWORD, audit.Actor.cli(),
                                   credits=200)
    production, key = keys.create_key(db, me.id, "Production", audit.Actor.cli())
    nightly, _ = keys.create_key(db, me.id, "Nightly batch", audit.Actor.cli())
    busy_key = keys.create_key(db, busy.id, "Busy", audit.Actor.cli())[1]
    today = utc_clock().date()
    for days_ago, count in ((1, 6), (3, 2), (4, 9), (8, 4), (13, 12), (20, 3), (27, 7)):
        made_job(db, me.id, nightly.id if days_ago % 2 else production.id, count,
                 at_noon(today - timedelta(days=days_ago)), completed=count - 1, failed=1)
    database.close()
    # Real images today, so that the engine's rates are not zero, and work left in line.
    made = httpx.post(f"{base}{URL}", headers=bearer(key), timeout=30,
                      json={"prompts": [f"a lighthouse {n}" for n in range(8)]})
    assert made.status_code == 200, made.text
    deadline = time.monotonic() + 90
    while httpx.get(f"{base}{URL}/{made.json()['jobId']}", headers=bearer(key),
                    timeout=30).json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # A second model and an adapter, installed now that the demo model is made, while the
    # service runs (it looks again every few seconds). The copy's index names an SDXL
    # pipeline, so that its default size differs; it is never loaded here.
    folder = config_path.parent
    xl = shutil.copytree(folder / "models" / "demo", folder / "models" / "demo-xl")
    index = json.loads((xl / "model_index.json").read_text())
    (xl / "model_index.json").write_text(json.dumps({**index,
                                                     "_class_name": "StableDiffusionXLPipeline"}))
    adapter = folder / "loras" / "watercolor"
    adapter.mkdir(parents=True)
    (adapter / "lora.json").write_text(json.dumps({"base_models": ["demo"]}))
    (adapter / "watercolor.safetensors").write_bytes(b"\0" * 16)
    httpx.post(f"{base}{URL}", headers=bearer(busy_key), timeout=30,
               json={"prompts": [f"a city {n}" for n in range(40)]})

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(base_url=base, viewport={"width": 1280, "height": 800})
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
        page.on("console", lambda message: message.type == "error" and problems.append(
            message.text))
        sign_in(page, base, "ops@example.com")

        for width, height in ((1280, 800), (390, 844)):
            page.set_viewport_size({"width": width, "height": height})
            page.goto("/console")
            assert page.locator("svg.chart.images-per-day g.column").count() == 30
            assert page.locator("[data-testid=credits-per-key] svg.meter").count() == 2
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            shoot(page, f"dashboard-{width}")

            page.goto("/console/admin/system")
            assert page.locator("svg.chart.sparkline g.column").count() == 60
            assert "cpu" in page.inner_text("[data-table=workers]")
            # system.js has fetched the figures again and put them in the page.
            page.wait_for_selector("[data-live]:has-text('updated')", timeout=15_000)
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            models = page.inner_text("[data-table=models]")
            assert "demo-xl" in models and "default" in models and "engine-worker" in models
            shoot(page, f"system-{width}")

            page.goto("/console/playground")
            picker = page.locator("select[name=model]")
            assert picker.input_value() == "demo"
            assert page.locator("select[name=model] option").all_inner_texts() == [
                "demo — 64\u00d764, 1 credit/image", "demo-xl — 1024\u00d71024, 1 credit/image"]
            facts = page.locator("[data-model-facts]")
            assert "Images are 64\u00d764, 2 steps. Each costs 1 credit;" in facts.inner_text()
            page.select_option("select[name=lora]", "watercolor")
            picker.select_option("demo-xl")
            # playground.js tells the chosen model's figures, and takes off the adapter that
            # does not fit it.
            assert "Images are 1024\u00d71024, 2 steps." in facts.inner_text()
            assert page.locator("select[name=lora]").input_value() == ""
            assert page.locator("select[name=lora] option[value=watercolor]").is_disabled()
            picker.select_option("demo")
            assert "Images are 64\u00d764" in facts.inner_text()
            page.select_option("select[name=lora]", "watercolor")
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            shoot(page, f"playground-models-{width}")
        page.set_viewport_size({"width": 1280, "height": 800})
        page.goto("/console")
        page.click("[data-testid=images-per-day] summary")
        page.click("[data-testid=credits-per-key] summary")
        shoot(page, "dashboard-1280-numbers")
        browser.close()
    assert problems == []
