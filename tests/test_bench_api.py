"""`appliance bench-api`: wrk's figures read right, and a short real run that prints them."""

from __future__ import annotations

import shutil

import pytest

from appliance.bench import http
from appliance.bench.http import Load, Target, parse_wrk

from .cli_helpers import run_benchmark

WRK_OUTPUT = """Running 1s test @ http://127.0.0.1:18999/job
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.86ms    0.89ms  10.67ms   95.60%
    Req/Sec     5.47k     0.96k    6.12k    81.82%
  Latency Distribution
     50%  668.00us
     75%  708.00us
     90%  827.00us
     99%    6.20ms
  5983 requests in 1.10s, 765.52KB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   5439.80
Transfer/sec:    696.02KB
"""


def test_wrk_figures_are_read_with_their_units():
    assert parse_wrk(WRK_OUTPUT) == Load(requests_per_second=5439.80, p50_ms=0.668, p99_ms=6.2,
                                         errors=7, requests=5983)


def test_each_route_is_loaded_right_after_the_baseline_and_ratios_are_taken_in_pairs(
        monkeypatch):
    turns: list[str] = []
    # Rates in the order of the loads: base, a, base, b | base, b, base, a | base, a, base, b.
    rates = iter([1000, 500, 1000, 300, 2000, 800, 2000, 1200, 500, 150, 500, 100])

    def fake_load(target: Target, seconds: int, connections: int) -> Load:
        turns.append(target.url)
        rate = next(rates)
        return Load(rate, 1.0, 2.0, 0, 10, 1e6 / rate)

    monkeypatch.setattr(http, "load", fake_load)
    pairs = http.load_in_pairs(Target("base", 1, {}),
                               {"a": Target("a", 2, {}), "b": Target("b", 2, {})}, 1, 1, 3)
    # Rotating, each after the baseline: a b, b a, a b.
    assert turns == ["base", "a", "base", "b", "base", "b", "base", "a", "base", "a",
                     "base", "b"]
    assert [(base.requests_per_second, figure.requests_per_second)
            for base, figure in pairs["a"]] == [(1000, 500), (2000, 1200), (500, 150)]
    # Within pairs: 0.5, 0.6 and 0.3; the machine's speed (the baseline's 500 to 2000)
    # does not move them, where medians of each side's own rates would give 500/1000.
    rate_ratio, cpu_ratio = http.paired_ratios(pairs["a"])
    assert rate_ratio == pytest.approx(0.5) and cpu_ratio == pytest.approx(0.5)
    assert http.paired_ratios(pairs["b"])[0] == pytest.approx(0.3)
    assert http.median_load([figure for _, figure in pairs["a"]]).requests_per_second == 500


def test_output_without_figures_is_an_error():
    with pytest.raises(RuntimeError, match="wrk printed no figures"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


@pytest.mark.system
@pytest.mark.usefixtures("root_handlers_restored")
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (install.sh --test)")
def test_a_short_run_prints_each_figure_beside_the_bare_route(tiny_model, tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\npath = "{tiny_model}"\ndevice = "cpu"\n')
    results = tmp_path / "api.json"
    printed, result = run_benchmark(
        capsys, results, "bench-api", "--config", str(config), "--seconds", "1",
        "--connections", "4", "--posts", "2", "--rounds", "1")
    loads = result["loads"]
    assert set(loads) == {"bare_route", "healthz", "job_read", "image_download"}
    assert loads["bare_route"]["ratio"] == 1.0
    for name, figure in loads.items():
        assert figure["requests_per_second"] > 0 and figure["errors"] == 0, name
        assert 0 < figure["p50_ms"] <= figure["p99_ms"], name
        # The server's CPU time a request, read from /proc while wrk ran.
        assert figure["cpu_us_per_request"] > 0, name
    assert result["posts"] == 2 and result["post_100_prompts_p50_ms"] > 0
    assert "GET job (authenticated): " in printed and "x), p50" in printed
