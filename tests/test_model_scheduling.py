"""Several models on one worker: which batch goes next, and which models stay loaded.

The queue prefers images for the models a worker holds, within a bound on how
long other models' images wait; LoadedModels keeps models within a memory
budget, unloading the least recently used. The end-to-end test drives a real
engine (stand-in generators that take memory and time) with two models from
three accounts under a budget that fits one model.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from appliance.accounts import accounts, audit
from appliance.core.config import memory_budget_bytes
from appliance.core.database import ConnectionPool
from appliance.engine.engine import Engine
from appliance.engine.loaded_models import LoadedModels, weights_on_disk
from appliance.engine.queue import ImageQueue
from appliance.jobs.models import GenerationSettings, QueuedImage
from appliance.jobs.store import get_job, submit

DRAFT = GenerationSettings(64, 64, 2, 7.5, model="draft")
FINAL = GenerationSettings(64, 64, 2, 7.5, model="final")
MIB = 2**20
SWAP_SECONDS = 0.3
BATCH_SECONDS = 0.05


def images(account: int, count: int, settings: GenerationSettings,
           start: int = 0) -> list[QueuedImage]:
    return [QueuedImage(start + n, f"job-{account}-{settings.model}", account, n, "p", n, settings)
            for n in range(count)]


def test_a_worker_takes_images_for_the_models_it_holds_first():
    queue = ImageQueue(capacity=100)
    # Account 1's turn comes first, with images for the model the worker lacks.
    queue.put_recovered(images(1, 2, FINAL) + images(2, 2, DRAFT, start=10))
    batch = queue.take_batch(4, timeout=0, loaded=frozenset({"draft"}), swap_after=60)
    assert [(i.account_id, i.settings.model) for i in batch] == [(2, "draft"), (2, "draft")]
    # Nothing left for it: it takes the other model's images, which it must load.
    batch = queue.take_batch(4, timeout=0, loaded=frozenset({"draft"}), swap_after=60)
    assert [i.settings.model for i in batch] == ["final", "final"]


def test_images_for_another_model_wait_no_longer_than_the_swap_bound():
    queue = ImageQueue(capacity=100)
    queue.put_recovered(images(1, 1, FINAL))
    time.sleep(0.25)
    queue.put_recovered(images(2, 3, DRAFT, start=10))
    # The draft images are preferred while the final one has waited less than the bound...
    batch = queue.take_batch(1, timeout=0, loaded=frozenset({"draft"}), swap_after=10)
    assert batch[0].settings.model == "draft"
    # ...and once it has waited that long, it leads, whatever the worker holds.
    batch = queue.take_batch(1, timeout=0, loaded=frozenset({"draft"}), swap_after=0.2)
    assert batch[0].settings.model == "final"


def test_no_preference_serves_accounts_strictly_in_turn():
    queue = ImageQueue(capacity=100)
    queue.put_recovered(images(1, 1, FINAL) + images(2, 1, DRAFT, start=10))
    batch = queue.take_batch(1, timeout=0, loaded=frozenset({"draft"}), swap_after=0)
    assert batch[0].settings.model == "final"


@dataclass
class Weighty:
    """A stand-in generator holding `size` bytes; counts what it made."""

    name: str
    size: int
    made: list[int] = field(default_factory=list)
    seconds: float = 0.0
    # time.monotonic() as each batch began
    batches: list[float] = field(default_factory=list)

    def memory_bytes(self) -> int:
        return self.size

    def generate(self, prompts, seeds, settings):
        from PIL import Image

        assert settings.model in ("", self.name), (settings.model, self.name)
        self.batches.append(time.monotonic())
        time.sleep(self.seconds)
        self.made.extend(seeds)
        return [Image.new("RGB", (settings.width, settings.height)) for _ in prompts]


def test_models_stay_loaded_while_they_fit_and_the_least_recently_used_goes_first():
    sizes = {"a": 40 * MIB, "b": 40 * MIB, "c": 40 * MIB, "huge": 500 * MIB}
    loads: list[str] = []

    def load(name: str) -> Weighty:
        loads.append(name)
        return Weighty(name, sizes[name])

    models = LoadedModels(load, lambda: 100 * MIB, "cpu")
    models.get("a")
    models.get("b")
    models.get("a")  # already held: no load, and now the most recently used
    assert loads == ["a", "b"] and models.names == {"a", "b"}
    models.get("c")  # 120 MiB would not fit: b, the least recently used, goes
    assert models.names == {"a", "c"} and list(models.sizes()) == ["a", "c"]
    models.get("huge")  # larger than the whole budget: loaded alone
    assert models.names == {"huge"} and models.unloads == 3
    models.get("a")
    assert loads == ["a", "b", "c", "huge", "a"] and models.names == {"a"}


def test_room_is_made_before_a_load_from_the_estimate_of_its_weights():
    held_while_loading: list[frozenset[str]] = []
    models: LoadedModels

    def load(name: str) -> Weighty:
        held_while_loading.append(models.names)
        return Weighty(name, 60 * MIB)

    models = LoadedModels(load, lambda: 100 * MIB, "cpu", estimate=lambda name: 60 * MIB)
    models.get("a")
    models.get("b")
    # b's 60 MiB estimate did not fit beside a: a was unloaded before b loaded.
    assert held_while_loading == [frozenset(), frozenset()]


def test_the_estimate_of_a_model_is_its_weights_at_the_precision_it_loads(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 4000)
    (tmp_path / "model_index.json").write_text("{}")
    assert weights_on_disk(tmp_path, "float32") == 4000
    assert weights_on_disk(tmp_path, "float16") == 2000
    # Half-precision files are what diffusers loads when they are there.
    (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"x" * 2000)
    assert weights_on_disk(tmp_path, "float16") == 2000
    assert weights_on_disk(tmp_path, "float32") == 4000


@pytest.mark.parametrize("text, total, expected", [
    ("90%", 1000, 900), ("100%", 1000, 1000), ("20GiB", 1, 20 * 2**30), ("500MB", 1, 500 * 10**6),
    ("1.5 GB", 1, 1_500_000_000)])
def test_the_memory_budget_is_a_share_or_an_amount(text, total, expected):
    assert memory_budget_bytes(text, total) == expected


@pytest.mark.parametrize("text", ["", "90", "0%", "101%", "-1GB", "lots", "5 parsecs"])
def test_a_memory_budget_that_is_neither_is_refused(text):
    with pytest.raises(ValueError):
        memory_budget_bytes(text, 1000)


def test_two_models_under_a_budget_for_one_swap_and_every_image_completes(make_config,
                                                                         tmp_path):
    """Three accounts ask for two models, interleaved; only one model fits at a time."""
    config = make_config(engine={"gpu_memory_budget": "100MiB",
                                 "model_swap_seconds": SWAP_SECONDS, "batch_size": 2})
    database = ConnectionPool(config.storage.database)
    generators: dict[str, list[Weighty]] = {"draft": [], "final": []}
    lock = threading.Lock()

    def load(name: str) -> Weighty:
        generator = Weighty(name if name != "tiny" else "", 80 * MIB, seconds=BATCH_SECONDS)
        with lock:
            generators.setdefault(name, []).append(generator)
        return generator

    engine = Engine(config, database, load_model=load)
    jobs = []
    for n in range(3):
        account = accounts.create_account(database.db(), f"user{n}@example.com",
                                          "correct horse battery", audit.Actor.cli(),
                                          credits=100)
        for settings in (DRAFT, FINAL, DRAFT):
            submitted = submit(database.db(), account.id, None, ["p"] * 4, settings)
            jobs.append((account.id, submitted.job_id))
            engine.queue.put_recovered(submitted.images)
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while not all(get_job(database.db(), account_id, job_id).status == "completed"
                      for account_id, job_id in jobs):
            assert time.monotonic() < deadline, "the jobs did not all finish"
            time.sleep(0.05)
    finally:
        engine.stop()
    made = {name: sum(len(g.made) for g in made) for name, made in generators.items()}
    assert made["draft"] == 24 and made["final"] == 12
    models = engine.workers[0].models
    # The default model, then draft and final in turns: each load unloaded the other.
    assert models.loads == 1 + len(generators["draft"]) + len(generators["final"])
    assert models.unloads == models.loads - 1
    # Drafts alone take 12 batches (0.6 s), longer than the swap bound: the final images
    # did not wait for all of them, and the drafts were loaded again after.
    first_final = min(generators["final"][0].batches)
    last_draft = max(moment for generator in generators["draft"] for moment in generator.batches)
    assert first_final < last_draft and len(generators["draft"]) >= 2
    # Each model kept the worker at least the swap bound once loaded: far fewer swaps
    # than batches (18 batches of 2).
    assert models.loads <= 6, models.loads
    database.close()
