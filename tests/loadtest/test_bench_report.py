"""make bench's report: targets judged from the sweeps, the ratio to the naive server, and a
markdown report that can be pasted as it is (synthetic sweeps: no servers started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import bench, runner


def _step(rate: float, p50: float, p99: float, *, target: float, errors: dict | None = None):
    latency = {"p50": p50, "p90": p99, "p99": p99, "p99.9": p99, "max": p99, "mean": p50}
    return {
        "offered_rate": rate,
        "achieved_rate": rate,
        "sent_rate": rate,
        "requests": int(rate * 8),
        "ok": int(rate * 8),
        "latency_ms": latency,
        "errors": errors or {},
        "error_rate": 0.0,
        "loadavg_after": [1.0, 1.0, 1.0],
        "held": not errors and p99 <= target,
        "sustained": not errors and p99 <= 1000,
        "service": {
            "stages_ms": {"fetch": {"count": 8, "mean": 1.0, "p50": 1.0, "p99": 2.0}},
            "batches": 8,
            "mean_rows_per_batch": 1000.0,
            "mean_requests_per_batch": 1.0,
            "query_cache_hit_rate": 0.8,
            "feature_cache_hit_rate": 0.95,
        },
    }


def _sweep(target: float, steps: list[dict]) -> dict:
    return {
        "candidates": 1000,
        "p99_target_ms": target,
        "stop_p99_ms": 1000.0,
        "highest_rate_held": max((s["offered_rate"] for s in steps if s["held"]), default=None),
        "highest_rate_sustained": max(
            (s["offered_rate"] for s in steps if s["sustained"]), default=None
        ),
        "steps": steps,
    }


@pytest.fixture
def runs() -> dict:
    service = {
        "1,000 given": _sweep(
            40, [_step(r, 8, p, target=40) for r, p in ((25, 20), (50, 30), (75, 60), (100, 900))]
        ),
        "100 given": _sweep(
            15, [_step(r, 3, p, target=15) for r, p in ((100, 9), (200, 14), (300, 40))]
        ),
        "retrieval k=200": _sweep(20, [_step(50, 5, 25, target=20)]),
    }
    naive = {
        "1,000 given": _sweep(
            40,
            [
                _step(2, 200, 400, target=40),
                _step(5, 300, 800, target=40),
                _step(8, 2000, 4000, target=40, errors={"timeout": 3}),
            ],
        )
    }
    return {
        "service-1w": {
            "server": "service",
            "workers": 1,
            "ready": {},
            "sweeps": service,
            "cpu_profile": {
                "1,000 given": {
                    "requests": 300,
                    "client_p50_ms": 10.5,
                    "event_loop_cpu_ms": 3.0,
                    "other_threads_cpu_ms": 5.0,
                    "redis_cpu_ms": 1.5,
                    "stages_mean_ms": {"fetch": 3.0, "score": 4.0},
                    "query_cache_hit_rate": 1.0,
                    "loadavg": 0.5,
                }
            },
        },
        "naive-1w": {"server": "naive", "workers": 1, "ready": {}, "sweeps": naive},
    }


def test_targets_and_ratio(runs: dict) -> None:
    targets = {t["target"]: t for t in bench.targets(runs)}
    given_1000 = targets["1,000 given"]
    assert given_1000["met"] and given_1000["runs"]["service-1w"]["highest_rate_held"] == 50
    assert targets["100 given"]["met"]  # p50 3 <= 6 and p99 14 <= 15 at 200/s
    assert not targets["retrieval k=200"]["met"]  # p99 25 > 20
    ratio = targets["3x naive at 1,000 given"]
    assert ratio["naive_sustainable_rate"] == 5
    assert ratio["ratios"]["service-1w"] == 20  # 100 / 5, both under 1 s
    assert ratio["ratios_service_within_40ms"]["service-1w"] == 10  # 50 / 5
    assert ratio["met"]


def test_markdown_report_and_plot(runs: dict, tmp_path: Path) -> None:
    report = {
        "started": "2026-01-01T00:00:00+00:00",
        "git": "abc1234",
        "seconds": 600.0,
        "machine": {
            "cpus": 2,
            "cpu": "test CPU",
            "gpu": "none",
            "onnxruntime": "1.0",
            "python": "3.11",
        },
        "loadavg_start": [0.5, 0.5, 0.5],
        "loadavg_end": [1.5, 1.0, 0.7],
        "redis": {"url": "redis://127.0.0.1:6379/0", "prefix": "fusionrank-bench"},
        "data": "../shared/data/fashion",
        "step_seconds": 8,
        "workload": {
            "catalogue_products": 44072,
            "queries": 30150,
            "queries_by_source": {"derived": 30000, "queries.csv": 150},
            "zipf_exponent": 1.0,
        },
        "runs": runs,
        "targets": bench.targets(runs),
        "parity": {"lists": 16, "same_top10": 16, "max_score_diff": 1e-6, "mismatches": []},
        "plot": None,
    }
    png = bench.plot(runs, tmp_path / "latency.png")
    assert png is None or png.stat().st_size > 1000
    text = bench.markdown(report)
    assert "| 1,000 given: p50 ≤ 15 ms, p99 ≤ 40 ms at ≥ 50 req/s |" in text
    assert "held up to 50 req/s; at 50/s p50 8.0 / p99 30.0 ms" in text
    assert "(naive: 5 req/s): service-1w: 20.0×" in text
    # the stage table: query cache 80 %, feature cache 95 % of rows
    assert "| 80% | 95% | 1,000 | 1.00 |" in text
    assert "16/16 top-10 lists identical" in text
    assert "Load average** (1/5/15 min) at start 0.5/0.5/0.5" in text
    assert "## Service stages from /metrics" in text
    assert "| 1,000 given | 10.50 | 3.00 | 5.00 | 1.50 | 9.50 | fetch 3.00, score 4.00 |" in text


def test_a_rate_held_only_above_a_failed_one_is_not_claimed() -> None:
    steps = [
        {"offered_rate": 50, "held": True, "sustained": True},
        {"offered_rate": 100, "held": False, "sustained": True},
        {"offered_rate": 200, "held": True, "sustained": True},
        {"offered_rate": 300, "held": False, "sustained": False},
    ]
    assert runner._held_up_to(steps, "held") == 50
    assert runner._held_up_to(steps, "sustained") == 200
    assert runner._held_up_to(steps[1:], "held") is None
