"""`make chaos` in miniature: the real harness (Redis, a supervised Triton, two front ends,
every fault) on the tiny model, with short windows and a 20 s soak."""

from __future__ import annotations

import json

import psutil

from loadtest import chaos

FAULTS = ["frontend_kill", "triton_kill", "redis_crash", "frontend_drain"]
RECOVERY_S = 90  # the slowest: a killed Triton's backoff, start-up and the front ends' probe


def test_faults_under_load_lose_no_acknowledged_event(redis_binary, served, tmp_path) -> None:
    _, _, _, repo, art = served
    argv = ["--artifacts", str(art), "--repository", str(repo), "--out", str(tmp_path)]
    argv += ["--soak-s", "20", "--warmup-s", "2", "--clients", "2", "--peak-s", "3"]
    argv += ["--peak-clients", "4", "--steady-s", "2", "--settle-s", "1", "--users", "20"]
    argv += ["--bucket-s", "5", "--peak-flops", "1e11", "--recovery-timeout-s", str(RECOVERY_S)]
    rc = chaos.main(argv)
    report = json.loads((tmp_path / "chaos.json").read_text())
    faults = {f["fault"]: f for f in report["faults"]}
    assert list(faults) == FAULTS
    for name, f in faults.items():
        assert f["acked_lost"] == 0 and f["acked_duplicated"] == 0, name
        assert f["recovery_s"] is not None and 0 < f["recovery_s"] < RECOVERY_S, name
        assert f["steady"]["model"] > 0 and f["steady"]["failed"] == 0, name
        assert f["sent"] == f["model"] + f["fallback"] + f["events_acked"] + f["failed"], name
    kill, drain = faults["frontend_kill"], faults["frontend_drain"]
    assert kill["failed"] == 0, kill["failures"]  # the balancer's retry on B
    assert drain["failed"] == 0, drain["failures"]  # out of rotation before it stops
    assert faults["frontend_drain"]["detail"]["exit_code"] == 0
    triton = faults["triton_kill"]
    assert triton["fallback_reasons"].get("model_unavailable", 0) > 0
    assert triton["detail"]["new_pid"] not in (None, triton["detail"]["killed_pid"])
    redis = faults["redis_crash"]
    assert redis["fallback_reasons"].get("feature_store_unavailable", 0) > 0
    assert redis["failures"].get("LogEvents UNAVAILABLE", 0) > 0  # never a false ack
    assert not {"LogEvents acked", "Recommend model"} & set(redis["detail"]["during_outage"])
    assert None not in redis["detail"]["store_health_not_serving_after_s"].values()
    soak = report["soak"]
    assert soak["sent"] > 0 and soak["errors"] == 0 and soak["p99_ms"] > 0
    assert report["events"]["lost"] == 0 and report["events"]["checked"] > 0
    assert report["illegal_items"] == 0
    processes = {row["process"] for row in soak["rss"]}
    assert {"front end A", "front end B", "onerec triton", "redis-server"} <= processes
    assert "onerec triton / tritonserver" in processes
    # 20 s cannot judge memory growth: it is measured, and may be the only complaint.
    assert all(p["kind"] == "rss" for p in report["problems"]), report["problems"]
    assert rc == (3 if report["problems"] else 0)
    assert (tmp_path / "chaos.md").read_text().startswith("# Faults under load")
    assert (tmp_path / "chaos_p99.png").stat().st_size > 0
    for row in soak["rss"]:  # every process the harness started is gone
        if psutil.pid_exists(row["pid"]):
            assert psutil.Process(row["pid"]).status() == psutil.STATUS_ZOMBIE, row
