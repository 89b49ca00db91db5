"""`appliance bench-cluster`: a short real run on a fresh PostgreSQL database, and the URLs it
refuses."""

from __future__ import annotations

import pytest

from .cli_helpers import invoke, run_benchmark, write_cli_config


@pytest.mark.parametrize("url", ["sqlite:///tmp/appliance.db", "data/appliance.db",
                                 "postgresql://127.0.0.1"])
def test_a_url_that_names_no_postgresql_database_is_refused_in_one_line(tmp_path, url):
    result = invoke(write_cli_config(tmp_path), "bench-cluster", "--database-url", url)
    assert result.exit_code != 0
    assert result.output.count("\n") == 1 and "--database-url" in result.output
    assert "Traceback" not in result.output


@pytest.mark.system
@pytest.mark.usefixtures("root_handlers_restored")
def test_a_short_run_prints_the_claims_beside_the_in_memory_queue(
        postgres, tiny_model, tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\npath = "{tiny_model}"\ndevice = "cpu"\n')
    printed, result = run_benchmark(
        capsys, tmp_path / "cluster.json", "bench-cluster", "--config", str(config),
        "--database-url", postgres.new_database(), "--seconds", "1", "--claimers", "2",
        "--batch", "8", "--queued", "200",
        # The admission half starts three servers (about 20 s of the suite's 7 minutes): it
        # is run by hand, and its figures are in BENCHMARKS.md.
        "--no-admission")
    assert [(run["claimers"], run["batch"]) for run in result["claims"]] == [(2, 8)]
    for run in result["claims"]:
        shared, memory = run["shared"], run["in_memory"]
        assert shared["images"] > 0 and shared["claims_per_second"] > 0
        # Each image was handed to one claimer only, and the database records it so.
        assert shared["claimed_twice"] == 0 and shared["recorded_as_returned"]
        assert 0 < shared["claim_p50_ms"] <= shared["claim_p99_ms"]
        assert memory["images"] > 0 and memory["claimed_twice"] == 0
        assert run["ratio"] == pytest.approx(
            shared["images_per_second"] / memory["images_per_second"])
    assert result["server_settings"]["fsync"] == "off"  # the test server's
    assert "on paper: batches of 8: " in printed
