"""Download diffusers models from the Hugging Face Hub."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.utils import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"

# Configs, tokenizer vocabularies and sentencepiece models: all small.
SMALL_FILE_SUFFIXES = (".json", ".txt", ".model")

# The appliance never runs the safety checker, and its weights are over 1 GB.
SKIPPED_COMPONENTS = frozenset({"safety_checker"})

# Weight file names, sharded or not. Plain names have no dot before the
# extension, which also rules out extras such as ".non_ema." copies.
FP16_SAFETENSORS = re.compile(r"/[^./]+(\.fp16(-\d+-of-\d+)?|-\d+-of-\d+\.fp16)\.safetensors$")
PLAIN_SAFETENSORS = re.compile(r"/[^./]+\.safetensors$")
PLAIN_BIN = re.compile(r"/[^./]+\.bin$")
WEIGHT_PREFERENCE = (FP16_SAFETENSORS, PLAIN_SAFETENSORS, PLAIN_BIN)
# Index files that list the shards of a sharded checkpoint, variant or not.
SHARD_INDEX = re.compile(r"\.index(\.fp16)?\.json$|\.fp16\.index\.json$")

T = TypeVar("T")


class ModelPullError(RuntimeError):
    pass


def pipeline_components(model_index: dict[str, Any]) -> list[str]:
    """Names of the sub-folders a pipeline loads, from its model_index.json."""
    return sorted(
        name
        for name, value in model_index.items()
        if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None
    )


def _files_in(folder: str, repo_files: Iterable[str]) -> list[str]:
    prefix = folder + "/"
    return sorted(
        path for path in repo_files if path.startswith(prefix) and "/" not in path[len(prefix) :]
    )


def _matching(pattern: re.Pattern[str], files: list[str]) -> list[str]:
    return [path for path in files if pattern.search(path)]


def _weights_for(files: list[str]) -> list[str]:
    for pattern in WEIGHT_PREFERENCE:
        weights = _matching(pattern, files)
        if weights:
            return weights
    return []


def _small_files_for(files: list[str]) -> list[str]:
    return [
        path
        for path in files
        if path.endswith(SMALL_FILE_SUFFIXES) and not SHARD_INDEX.search(path)
    ]


def _shard_indexes_for(files: list[str], weights: list[str]) -> list[str]:
    if not any(re.search(r"-\d+-of-\d+", path) for path in weights):
        return []
    wants_fp16 = any(".fp16" in path for path in weights)
    wanted_kind = (
        ".safetensors" if any(path.endswith(".safetensors") for path in weights) else ".bin"
    )
    return [
        path
        for path in _matching(SHARD_INDEX, files)
        if (".fp16" in path) == wants_fp16 and wanted_kind in path
    ]


def select_files(repo_files: Iterable[str], components: Iterable[str]) -> list[str]:
    """The files a text-to-image pipeline needs, out of everything in its repo.

    Per component folder: its configs, plus one set of weights, preferring
    half-precision safetensors, then full-precision safetensors, then pickled
    .bin files (old repositories ship only those). Root level checkpoints
    (.ckpt, single-file .safetensors), ONNX and Flax exports are never fetched.
    """
    repo_files = list(repo_files)
    selected = [MODEL_INDEX]
    for component in components:
        if component in SKIPPED_COMPONENTS:
            continue
        files = _files_in(component, repo_files)
        weights = _weights_for(files)
        selected += _small_files_for(files) + weights + _shard_indexes_for(files, weights)
    return selected


def _hub_call(repo_id: str, revision: str | None, action: Callable[[], T]) -> T:
    try:
        return action()
    except GatedRepoError as error:
        raise ModelPullError(
            f"Model {repo_id} is gated: accept its terms on huggingface.co and log in"
            " (or set HF_TOKEN) first."
        ) from error
    except RepositoryNotFoundError as error:
        raise ModelPullError(
            f"Model {repo_id} was not found on the Hugging Face Hub"
            " (or it is private and no valid token is set)."
        ) from error
    except RevisionNotFoundError as error:
        raise ModelPullError(f"Model {repo_id} has no revision {revision!r}.") from error
    except HFValidationError as error:
        raise ModelPullError(
            f"{repo_id!r} is not a valid Hugging Face model id: {error}"
        ) from error
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as error:
        raise ModelPullError(
            f"Cannot download {repo_id}: the Hugging Face Hub is unreachable"
            " or offline mode (HF_HUB_OFFLINE) is on."
        ) from error
    except HfHubHTTPError as error:
        raise ModelPullError(f"The Hugging Face Hub refused to serve {repo_id}: {error}") from error
    except Exception as error:
        # Connection failures surface as the HTTP client's own exception types,
        # which differ between huggingface_hub releases.
        raise ModelPullError(
            f"Could not download {repo_id}: {type(error).__name__}: {error}"
        ) from error


def _read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def pull(repo_id: str, target: Path, revision: str | None = None) -> Path:
    target = Path(target)
    api = HfApi()
    info = _hub_call(repo_id, revision, lambda: api.model_info(repo_id, revision=revision))
    repo_files = [sibling.rfilename for sibling in info.siblings or []]
    if MODEL_INDEX not in repo_files:
        raise ModelPullError(
            f"Model {repo_id} is not a diffusers pipeline: it has no {MODEL_INDEX}."
        )
    # Pinning the commit keeps every file of this pull from the same revision.
    commit = info.sha or revision
    index_path = _hub_call(
        repo_id,
        revision,
        lambda: hf_hub_download(repo_id, MODEL_INDEX, revision=commit, local_dir=target),
    )
    wanted = select_files(repo_files, pipeline_components(_read_json(index_path)))
    logger.info("Pulling %d files of %s into %s", len(wanted), repo_id, target)
    _hub_call(
        repo_id,
        revision,
        lambda: snapshot_download(
            repo_id, revision=commit, local_dir=target, allow_patterns=wanted
        ),
    )
    return target
