from __future__ import annotations

import pytest

from appliance.core.devices import (
    check_device,
    check_device_list,
    cuda_index,
    is_cuda,
    parse_device_list,
    resolve_devices,
)


@pytest.mark.parametrize(
    ("name", "index"),
    [("cuda", 0), ("cuda:0", 0), ("cuda:3", 3), ("cpu", None), ("auto", None), ("cuda:", None),
     ("cuda:x", None), ("cuda:\u0661", None), ("CUDA:0", None), ("cuda:0 ", None), ("gpu", None)],
)
def test_cuda_index_reads_cuda_names_only(name: str, index: int | None) -> None:
    assert cuda_index(name) == index
    assert is_cuda(name) == (index is not None)


def test_a_device_is_auto_cpu_cuda_or_cuda_n() -> None:
    for name in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert check_device(name) is None
    assert check_device("gpu") == "must be auto, cpu, cuda or cuda:N, got 'gpu'"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("all", None),
        ((), None),
        (("cuda:0", "cuda:1"), None),
        (("cuda", "cuda:1"), None),
        ("cuda:0", "must be \"all\" or a list of CUDA devices, got 'cuda:0'"),
        (("cuda:0", "cpu"), "must list CUDA devices (cuda:N), got 'cpu'"),
        (("cuda", "cuda:0"), "names a device twice: ['cuda', 'cuda:0']"),
    ],
)
def test_device_list_is_all_or_distinct_cuda_devices(
        value: tuple[str, ...] | str, problem: str | None) -> None:
    assert check_device_list(value) == problem


def test_device_list_from_a_command_line() -> None:
    assert parse_device_list("all") == "all"
    assert parse_device_list(" cuda:0, cuda:1 ") == ("cuda:0", "cuda:1")
    assert parse_device_list("") == ()
    for text in ("cpu", "cuda:0,cuda:0", "cuda:0,"):
        with pytest.raises(ValueError):
            parse_device_list(text)


def test_resolved_devices_are_one_per_worker() -> None:
    assert resolve_devices("all", "auto", 2) == ["cuda:0", "cuda:1"]
    assert resolve_devices("all", "auto", 0) == ["cpu"]
    assert resolve_devices(("cuda:1",), "cpu", 2) == ["cuda:1"]
    assert resolve_devices((), "cuda:1", 2) == ["cuda:1"]
