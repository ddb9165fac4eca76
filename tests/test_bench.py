"""`make bench` in miniature, and the arithmetic its verdicts rest on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from loadtest.bench import Level, _row, agreement, stage_split

ROOT = Path(__file__).parents[1]
ROW_KEYS = {"qps", "p50_ms", "p95_ms", "p99_ms", "mfu"}


def test_agreement_is_within_tolerance_and_needs_zero_illegal_items() -> None:
    rows = [{"answered_qps": 100.0, "prom_qps": 90.0, "mfu": 0.01, "prom_mfu": 0.0115}]
    ok = agreement(rows, illegal=0.0, level_s=12)
    assert ok["agree"] is True and abs(ok["max_qps_rel_err"] - 0.1) < 1e-9
    assert agreement(rows, illegal=1.0, level_s=12)["agree"] is False
    assert agreement(rows, illegal=0.0, level_s=5)["agree"] is None  # under the 10 s window
    rows.append({"answered_qps": 50.0, "prom_qps": 75.0, "mfu": 0.01, "prom_mfu": 0.01})
    assert agreement(rows, illegal=0.0, level_s=12)["agree"] is False  # 50% off


def test_stage_split_is_the_mean_per_request_over_the_interval() -> None:
    def scrape(count: float, total: float) -> dict:
        key = (("stage", "triton"),)
        return {
            ("onerec_stage_latency_seconds_count", key): count,
            ("onerec_stage_latency_seconds_sum", key): total,
        }

    split = stage_split(scrape(10, 1.0), scrape(30, 1.5))
    assert abs(split["triton"] - 25.0) < 1e-9  # 0.5 s over 20 requests
    assert split["features"] is None  # no requests seen: no number, not a zero


def test_a_level_without_answers_is_null_not_nan() -> None:
    row = _row(Level(np.array([]), 1.0, 0.0, 3), peak=1e9)
    assert row["p99_ms"] is None and row["errors_or_fallbacks"] == 3
    json.dumps(row, allow_nan=False)


def test_bench_runs_end_to_end_and_writes_the_report(served, redis_binary, tmp_path) -> None:
    """A few seconds per level against the real stack: the shape DESIGN.md names, and the
    same front end on SQLite and on a real redis-server (the bench starts its own)."""
    _, _, _, repo, art = served
    argv = [sys.executable, "-m", "loadtest.bench", "--artifacts", str(art)]
    argv += ["--repository", str(repo)]
    argv += ["--out", str(tmp_path), "--concurrency", "1,4", "--beams", "16,64"]
    argv += ["--histories", "250", "--lifelong-requests", "5", "--delays", "4000"]
    argv += ["--seconds", "1.5"]
    argv += ["--baseline-requests", "3", "--users", "12", "--beam-concurrency", "2"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["prometheus"]["agree"] is None  # 1.5 s levels: under the 10 s window
    assert report["peak_flops"] > 0
    assert [r["concurrency"] for r in report["server"]] == [1, 4]
    for row in report["server"] + report["baseline"]:
        assert set(row) >= ROW_KEYS and row["qps"] > 0 and row["p99_ms"] >= row["p50_ms"]
    assert all(r["errors_or_fallbacks"] == 0 for r in report["server"])
    assert report["server"][1]["triton"]["onerec_decoder"]["avg_batch"] >= 1
    assert report["server"][0]["stages_ms"]["triton"] > 0
    assert all(r["gc"]["full_collections"] >= 0 for r in report["server"])
    cores = report["server"][1]["cpu_cores"]  # psutil: every serving process, by role
    roles = {"front end", "triton", "load generator", "onerec_encoder stubs"}
    assert set(cores) >= roles | {"onerec_decoder stubs", "onerec_reward stubs"}
    assert all(cores[role] > 0 for role in roles | {"onerec_decoder stubs"})
    assert sum(cores.values()) < (os.cpu_count() or 1) + 0.5  # cores, not CPU seconds
    assert [r["beam_width"] for r in report["beam_sweep"]] == [16, 64]
    assert all(r["c1_p99_ms"] >= r["c1_p50_ms"] > 0 for r in report["beam_sweep"])
    topup = report["topup"]  # the tiny set's users all have fewer than 1,000 events
    assert topup["users"] == 0 and topup["before"] == topup["after"] == 0
    (lifelong,) = report["lifelong_sweep"]
    assert lifelong["history"] == 250 and lifelong["p99_ms"] >= lifelong["p50_ms"] > 0
    delay = report["delay_sweep"][0]  # applied through Triton's repository API
    assert delay["max_queue_delay_us"] == 4000 and delay["requests"] > 0
    assert report["prometheus"]["illegal_items_total"] == 0
    assert report["summary"]["throughput_ratio"] > 0
    stores = report["store_sweep"]
    levels = sorted({1, report["summary"]["server_peak_concurrency"]})
    got = [(r["store"], r["concurrency"]) for r in stores["rows"]]
    assert got == [(store, c) for store in ("sqlite", "redis") for c in levels]
    for row in stores["rows"]:
        assert row["qps"] > 0 and row["errors_or_fallbacks"] == 0
    assert set(stores["log_events"]) == {"sqlite", "redis"}
    assert all(w["p99_ms"] >= w["p50_ms"] > 0 for w in stores["log_events"].values())
    selection = report["reward_selection"]["rows"]
    got = [(r["ranking"], r["concurrency"]) for r in selection]
    assert got == [(name, c) for c in levels for name in ("generation", "reward")]
    for row in selection:
        assert row["qps"] > 0 and row["errors_or_fallbacks"] == 0
        assert (row["reward_ms"] is None) == (row["ranking"] == "generation")
    assert all(0 < r["reward_share"] < 1 for r in selection if r["ranking"] == "reward")
    assert "SQLite vs Redis" in (tmp_path / "bench.md").read_text()
    assert "Reward selection" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.md").read_text().startswith("# Benchmark")
    assert (tmp_path / "bench_latency_qps.png").stat().st_size > 0
