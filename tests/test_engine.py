"""The engine's throughput machinery: batching across jobs and accounts, the PNG
writers beside the GPU thread, several devices, compile padding, the tiny VAE."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny

from appliance.accounts import accounts, audit
from appliance.core.config import ConfigError, ModelSettings, config_from_dict
from appliance.engine import diffusers_generator, writer
from appliance.engine.diffusers_generator import compiled_batch_sizes, load_configured_generator
from appliance.engine.engine import Engine, worker_devices
from appliance.engine.pipeline import ModelLoadError
from appliance.jobs.catalog import Catalog
from appliance.jobs.models import GenerationSettings
from appliance.jobs.store import get_job, submit

from .helpers import TEST_GENERATION, InstantGenerator, bearer

URL = "/api/playground/images"
SETTINGS = GenerationSettings(**TEST_GENERATION)


class Recorder:
    """Wraps a generator; notes each batch's prompts and thread, and can hold the first batch."""

    def __init__(self, real, hold_first: bool = False):
        self.real = real
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def generate(self, prompts, seeds, settings):
        self.entered.set()
        self.release.wait(30)
        self.batches.append(list(prompts))
        self.threads.add(threading.current_thread().name)
        return self.real.generate(prompts, seeds, settings)


# One machine's queue: a cluster node claims batches ahead (prefetch), so a job that arrives
# later joins a batch claimed after it (test_cluster covers the shared queue's turns).
@pytest.mark.sqlite_only
def test_a_small_job_of_another_account_shares_the_next_batch(make_client, make_config):
    config = make_config(engine={"batch_size": 4, "batch_window_seconds": 0.0})
    # Each batch takes a moment, so that the jobs' end times tell the batches apart.
    recorder = Recorder(InstantGenerator(seconds=0.1), hold_first=True)
    client = make_client(load_generator=lambda: recorder, app_config=config)
    big_key = client.key(client.account("big@example.com", credits=12))
    small_key = client.key(client.account("small@example.com", credits=1))
    big = client.http.post(URL, json={"prompts": [f"big {i}" for i in range(12)]},
                           headers=bearer(big_key)).json()["jobId"]
    assert recorder.entered.wait(30)
    # The worker holds the first batch of the big job; now the small job arrives.
    small = client.http.post(URL, json={"prompts": ["small"]},
                             headers=bearer(small_key)).json()["jobId"]
    recorder.release.set()
    big_job = client.wait_for_job(big_key, big)
    small_job = client.wait_for_job(small_key, small)

    assert recorder.batches == [
        ["big 0", "big 1", "big 2", "big 3"],
        ["big 4", "small", "big 5", "big 6"],
        ["big 7", "big 8", "big 9", "big 10"],
        ["big 11"],
    ]
    assert small_job["finishedAt"] < big_job["finishedAt"]
    assert big_job["completedImages"] == 12 and small_job["completedImages"] == 1
    assert recorder.threads == {"engine-worker"}


def test_pngs_are_written_beside_the_worker_thread_which_runs_ahead(make_client, make_config,
                                                                      monkeypatch):
    written: list[tuple[str, float, float]] = []
    real_write = writer.write_png_atomic

    def slow_write(image, path, compress_level=6):
        started = time.monotonic()
        time.sleep(0.4)  # far longer than a batch of the instant generator
        real_write(image, path, compress_level)
        written.append((threading.current_thread().name, started, time.monotonic()))

    monkeypatch.setattr(writer, "write_png_atomic", slow_write)
    config = make_config(engine={"batch_size": 1, "batch_window_seconds": 0.0, "png_threads": 1})
    fake = InstantGenerator()
    client = make_client(load_generator=lambda: fake, app_config=config)
    key = client.key(client.account(credits=6))
    # Four batches: the fourth is the first that must wait for a writer.
    job_id = client.http.post(URL, json={"prompts": [str(i) for i in range(4)]},
                              headers=bearer(key)).json()["jobId"]
    job = client.wait_for_job(key, job_id)

    assert job["completedImages"] == 4
    assert {name for name, _, _ in written} == {"png-writer_0"}
    assert set(fake.threads) == {"engine-worker"}
    first_saved = written[0][2]
    # The second batch is made while the first is still being written...
    assert fake.started[1] < first_saved
    # ...but no more than three batches wait for the writers: the fourth waits.
    assert fake.started[3] >= first_saved - 0.05


def test_an_image_that_cannot_be_saved_fails_alone_and_is_refunded(make_client, make_config,
                                                                    monkeypatch):
    real_write = writer.write_png_atomic

    def failing_write(image, path, compress_level=6):
        if path.stem == "1":
            raise OSError(28, "No space left on device")
        real_write(image, path, compress_level)

    monkeypatch.setattr(writer, "write_png_atomic", failing_write)
    config = make_config(engine={"batch_size": 3})
    client = make_client(load_generator=InstantGenerator, app_config=config)
    account = client.account(credits=3)
    key = client.key(account)
    job_id = client.http.post(URL, json={"prompts": ["a", "b", "c"]},
                              headers=bearer(key)).json()["jobId"]
    job = client.wait_for_job(key, job_id)

    assert [image["status"] for image in job["images"]] == ["completed", "failed", "completed"]
    assert "saving the image failed: OSError" in job["images"][1]["error"]
    assert job["creditsRefunded"] == 1
    assert client.balance(account) == 1 == accounts.ledger_total(client.database.db(), account.id)


def test_one_worker_per_device_all_fed_from_one_queue(make_config, database, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert worker_devices(make_config(engine={"devices": "all"})) == ["cuda:0", "cuda:1"]
    assert worker_devices(make_config()) == ["cpu"]
    config = make_config(engine={"devices": ["cuda:0", "cuda:1"], "batch_size": 1})
    fake = InstantGenerator(seconds=0.2)
    loads = []

    def load():
        loads.append(threading.current_thread().name)
        return fake

    engine = Engine(config, database, load_generator=load)
    account = accounts.create_account(database.db(), "dev@example.com", "correct horse battery",
                                      audit.Actor.cli(), credits=8)
    submitted = submit(database.db(), account.id, None, [str(i) for i in range(8)], SETTINGS)
    engine.queue.put_recovered(submitted.images)
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while get_job(database.db(), account.id, submitted.job_id).status != "completed":
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.05)
        assert engine.ready
    finally:
        engine.stop()
    names = {"engine-worker-cuda:0", "engine-worker-cuda:1"}
    assert sorted(loads) == sorted(names)
    assert set(fake.threads) == names
    assert time.monotonic() - engine.heartbeat < 30


def test_all_without_a_gpu_is_one_cpu_worker(make_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_devices(make_config(engine={"devices": "all"})) == ["cpu"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("gpu", "engine.devices must be \"all\" or a list of CUDA devices"),
        (["cuda:0", "cpu"], "engine.devices must list CUDA devices (cuda:N), got 'cpu'"),
        (["cuda:0", "cuda:0"], "engine.devices names a device twice"),
        ([0, 1], "engine.devices must be a list of strings"),
    ],
)
def test_bad_device_lists_are_refused_naming_the_key(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({"engine": {"devices": value}}, base_dir=tmp_path)


def test_compiled_pipeline_is_warmed_up_and_batches_are_padded(make_config, monkeypatch, caplog):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda module, **options: compiled.append((type(module).__name__, options)))
    rendered = []
    real_render = diffusers_generator.render

    def spy(pipe, prompts, seeds, **options):
        rendered.append(len(prompts))
        return real_render(pipe, prompts, seeds, **options)

    monkeypatch.setattr(diffusers_generator, "render", spy)
    config = make_config(engine={"compile": "max-autotune", "batch_size": 4})
    with caplog.at_level(logging.INFO, logger="appliance.engine.diffusers_generator"):
        generator = load_configured_generator(config)

    assert compiled == [("UNet2DConditionModel", {"mode": "max-autotune", "dynamic": False}),
                        ("Decoder", {"mode": "max-autotune", "dynamic": False})]
    assert compiled_batch_sizes(4) == generator.batch_sizes == (1, 2, 4)
    assert compiled_batch_sizes(12) == (1, 2, 4, 8, 12)
    assert rendered == [1, 2, 4] and "warmed up batches of 4 at 64x64" in caplog.text
    images = generator.generate(["a", "b", "c"], [1, 2, 3], SETTINGS)
    assert rendered[-1] == 4 and len(images) == 3
    # Padding changes nothing in the images asked for.
    plain = diffusers_generator.DiffusersGenerator(generator.pipe)
    unpadded = plain.generate(["a", "b", "c"], [1, 2, 3], SETTINGS)
    for padded_image, image in zip(images, unpadded, strict=True):
        assert np.abs(np.asarray(padded_image, np.int16) - np.asarray(image, np.int16)).max() <= 1


def test_vae_decoded_in_chunks_gives_the_same_images(make_config):
    generator = load_configured_generator(make_config())
    whole = diffusers_generator.DiffusersGenerator(generator.pipe, vae_chunk=0)
    chunked = diffusers_generator.DiffusersGenerator(generator.pipe, vae_chunk=1)
    prompts, seeds = ["a cat", "a dog", "a fox"], [1, 2, 3]
    together = whole.generate(prompts, seeds, SETTINGS)
    for a, b in zip(together, chunked.generate(prompts, seeds, SETTINGS), strict=True):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1


def test_on_the_cpu_the_unet_is_channels_last_and_the_vae_decodes_one_at_a_time(make_config):
    # What made the CPU fastest (see optimize_pipeline and vae_chunk).
    generator = load_configured_generator(make_config(engine={"vae_decode_chunk": 8}))
    conv_in = generator.pipe.unet.conv_in.weight
    assert conv_in.is_contiguous(memory_format=torch.channels_last) and not conv_in.is_contiguous()
    assert generator.pipe.vae.decoder.conv_in.weight.is_contiguous()
    assert generator.vae_chunk == 1
    assert diffusers_generator.vae_chunk(8, "cuda:0") == 8
    off = load_configured_generator(make_config(engine={"channels_last": False}))
    assert off.pipe.unet.conv_in.weight.is_contiguous()


def write_tiny_vae(folder: Path) -> Path:
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8),
                    decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)
                    ).save_pretrained(folder)
    return folder


def test_a_configured_tiny_vae_decodes_the_images(make_config, tmp_path):
    folder = write_tiny_vae(tmp_path / "taesd")
    # Relative to the config file's folder, like every path setting.
    config = make_config(engine={"tiny_vae": "taesd"})
    assert config.source is None
    config = dataclasses.replace(config, source=tmp_path / "c.toml")
    generator = load_configured_generator(config)
    assert isinstance(generator.pipe.vae, AutoencoderTiny)
    # A model from the catalog with a [models.NAME] tiny_vae of "" keeps its own VAE.
    own = dataclasses.replace(config, models={"tiny": ModelSettings(tiny_vae="")})
    kept = load_configured_generator(own, "cpu", Catalog(own).served("tiny"))
    assert not isinstance(kept.pipe.vae, AutoencoderTiny)
    (image,) = generator.generate(["a cat"], [1], SETTINGS)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert np.asarray(image).std() > 0
    assert folder.is_dir()


def test_a_missing_tiny_vae_is_a_load_error(make_config, tmp_path):
    config = make_config(engine={"tiny_vae": str(tmp_path / "nowhere")})
    with pytest.raises(ModelLoadError, match="nowhere"):
        load_configured_generator(config)
