#!/usr/bin/env bash
# Fetches, into .whl/, wheels of the Python packages the appliance needs that
# the GPU benchmark machine's image lacks (diffusers, litestar, ...), for its
# Python 3.12 on x86-64 Linux. Run it on a machine with internet access, from
# the repository root, after `./install.sh --dev`; bench/gpu.sh installs them.
#
#   bench/fetch_wheels.sh            # versions as installed in .venv
#
# Environment: PYTHON (default .venv/bin/python), PY_VERSION (default 3.12).
set -eu

main() {
    cd "$(dirname "$0")/.."
    local python="${PYTHON:-.venv/bin/python}" version="${PY_VERSION:-3.12}"
    mkdir -p .whl
    # name==version of each runtime dependency, transitively, as installed here,
    # less what the GPU image already has (its package list, read 2026-11-17).
    "$python" - > .whl/wanted.txt <<'PY'
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ON_GPU_IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
certifi charset-normalizer click cloudpickle colorama contourpy coverage cycler cython
einops filelock fonttools frozenlist fsspec h11 h5py hf-xet httpcore httpx huggingface-hub
humanize hypothesis idna imageio iniconfig jinja2 joblib kiwisolver lxml markdown
markdown-it-py markupsafe matplotlib mdurl mpmath msgpack multidict networkx numpy
nvidia-ml-py opencv-python-headless packaging pandas pathspec pillow pip pluggy
prometheus-client propcache protobuf psutil pyarrow pygments pyparsing pytest
python-dateutil pyyaml regex requests rich safetensors scipy sentencepiece setuptools
shellingham six sympy tabulate tokenizers torch tqdm transformers triton typer
typing-extensions urllib3 uvloop werkzeug wheel yarl zipp
""".split())

seen, todo = {}, ["ai-media-maker"]
while todo:
    name = canonicalize_name(todo.pop())
    if name in seen:
        continue
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        seen[name] = None
        continue
    seen[name] = dist.version
    for text in dist.requires or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            todo.append(requirement.name)
for name, version in sorted(seen.items()):
    if version and name != "ai-media-maker" and name not in ON_GPU_IMAGE:
        print(f"{name}=={version}")
PY
    echo "fetching $(wc -l < .whl/wanted.txt) wheels for Python $version into .whl/"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
        --python-version "$version" --implementation cp --abi "cp${version/./}" --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any \
        -r .whl/wanted.txt
    du -sh .whl
}

main "$@"
