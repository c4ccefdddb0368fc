"""bench/time_to_quality.py: the first-crossing logic on made-up curves, and a tiny end-to-end run of the script."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import time_to_quality as ttq


def _curve(*points):
    return [{"step": s, "train_s": t, "win_rate_vs_base": w, "adherence": a} for s, t, w, a in points]


def test_first_crossing_takes_the_first_point_that_reaches_the_target_at_equal_adherence():
    curve = _curve((10, 1.0, 0.70, 0.96), (20, 2.0, 0.80, 0.90), (30, 3.0, 0.81, 0.95), (40, 4.0, 0.90, 0.96))
    # step 20 reaches the win rate but its adherence is more than 0.02 below the target's; step 30 is the first
    assert ttq.first_crossing(curve, 0.80, 0.96)["step"] == 30
    assert ttq.first_crossing(list(reversed(curve)), 0.80, 0.96)["step"] == 30  # order of the list does not matter
    assert ttq.first_crossing(curve, 0.95, 0.96) is None


def test_speedups_against_the_baselines_own_final_point():
    runs = {"dpo": {"curve": _curve((10, 10.0, 0.6, 0.96), (20, 20.0, 0.85, 0.96), (30, 30.0, 0.8, 0.96)),
                    "precompute_s": 5.0},
            "fast": {"curve": _curve((10, 4.0, 0.79, 0.96), (20, 8.0, 0.82, 0.95)), "precompute_s": 15.0},
            "never": {"curve": _curve((10, 1.0, 0.5, 0.96)), "precompute_s": 0.0}}
    out = ttq.speedups(runs)
    assert out["target_win_rate"] == 0.8
    assert out["dpo"]["reached"]["step"] == 20  # DPO's own first crossing, before its final step
    assert out["fast"]["speedup_vs_dpo"] == pytest.approx(20.0 / 8.0)
    assert out["fast"]["speedup_vs_dpo_total"] == pytest.approx(25.0 / 23.0)
    assert out["fast"]["speedup_vs_dpo_full_run"] == pytest.approx(30.0 / 8.0)
    assert out["never"]["reached"] is None and out["never"]["speedup_vs_dpo"] is None
    assert ttq._mean([2.0, None]) is None and ttq._mean([2.0, 4.0]) == 3.0


@pytest.mark.slow  # ~20 s of CPU: make-data, two cache builds, two 2-step runs with evaluations
def test_script_runs_tiny_and_reports_the_contract_keys(tmp_path):
    result = ttq.main(["--users", "red_large", "--max-steps", "2", "--eval-every", "1", "--eval-steps", "1",
                       "--eval-prompts", "2", "--eval-sampling-steps", "1", "--data-root", str(tmp_path / "data"),
                       "--pairs-per-user", "8", "--data-steps", "1", "--out", str(tmp_path / "out"),
                       "--set", "train_batch_size=2"])
    user = result["users"]["red_large"]
    assert {"speedup_vs_dpo", "speedup_vs_dpo_total", "users", "methods"} <= set(result)
    assert {"speedup_vs_dpo", "latent_cache_s", "target_win_rate", "dpo", "inpo"} <= set(user)
    for name in ("dpo", "inpo"):
        run = user["runs"][name]
        assert [p["step"] for p in run["curve"]] == [1, 2] and run["curve"][0]["train_s"] <= run["curve"][1]["train_s"]
    assert user["runs"]["inpo"]["inversion_build_s"] > 0 and user["runs"]["dpo"]["inversion_build_s"] == 0
    crossed = ttq.first_crossing(user["runs"]["inpo"]["curve"], user["target_win_rate"], user["target_adherence_min"] + 0.02)
    assert (user["inpo"]["reached"] or {}).get("step") == (crossed or {}).get("step")


def test_combine_merges_users_and_means_their_speedups():
    def one(user, speedup):
        entry = {"dpo": {"speedup_vs_dpo": 1.0, "speedup_vs_dpo_total": 1.0},
                 "inpo": {"speedup_vs_dpo": speedup, "speedup_vs_dpo_total": speedup / 2}}
        return {"users": {user: entry}, "baseline": "dpo", "methods": {"inpo": {}}, "settings": {}, "wall_s": 5}

    merged = ttq.combine([one("a", 2.0), one("b", 4.0)])
    assert set(merged["users"]) == {"a", "b"}
    assert merged["speedup_vs_dpo"] == pytest.approx(3.0) and merged["speedup_vs_dpo_total"] == pytest.approx(1.5)
