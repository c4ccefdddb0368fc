import json

from diffpref.cli import main


def test_report_renders_what_exists_and_marks_what_is_missing(tmp_path, capsys):
    results = tmp_path / "outputs"
    run = results / "dpo_red_large"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"steps": 300, "wall_clock_s": 321.0, "train_s": 250.5, "eval": {
        "win_rate_vs_base": 0.8, "adherence": 0.9, "base_adherence": 0.91}}))
    (run / "history.jsonl").write_text(json.dumps({"step": 100, "win_rate_vs_base": 0.6}) + "\n")
    (results / "ppd_eval").mkdir()
    (results / "ppd_eval" / "unseen_k4.json").write_text(json.dumps({
        "win_rate_vs_base": 0.7, "adherence": 0.9, "base_adherence": 0.9, "ranking_accuracy": 0.6, "ceiling_win_rate": 0.9,
        "few_shot_ceiling_win_rate": 0.85, "per_user": {}}))
    (results / "ppd_eval" / "seen_k4.json").write_text(json.dumps({  # written before the ceiling was reported
        "win_rate_vs_base": 0.75, "adherence": 0.9, "base_adherence": 0.9, "ranking_accuracy": 0.6, "per_user": {}}))
    (results / "ppd_eval" / "unseen_k4_full.json").write_text(json.dumps({  # no user had held-out pairs to rank
        "win_rate_vs_base": 0.72, "adherence": 0.9, "base_adherence": 0.9, "ranking_accuracy": None, "per_user": {}}))
    for k, rate in ((4, 0.6), (32, 0.65)):
        (results / "ppd_eval" / f"unseen_k{k}_p60.json").write_text(json.dumps({
            "win_rate_vs_base": rate, "per_user": {"u0": {"win_rate": rate - 0.1}, "u1": {"win_rate": rate + 0.1}}}))
    (results / "ppd_dpo_upper_bound").mkdir()
    (results / "ppd_dpo_upper_bound" / "summary.json").write_text(json.dumps({
        "win_rate_vs_base": 0.66, "adherence": 0.95, "base_adherence": 0.97, "win_rate_by_step": {"300": 0.66},
        "per_user": {"u0": {"win_rate": 0.52}, "u1": {"win_rate": 0.8}}}))
    (results / "ppd_dpo_upper_bound_900").mkdir()
    (results / "ppd_dpo_upper_bound_900" / "summary.json").write_text(json.dumps({
        "overrides": "max_train_steps=900 eval_every=300", "win_rate_vs_base": 0.7, "adherence": 0.95,
        "base_adherence": 0.97, "win_rate_by_step": {"300": 0.66, "900": 0.7}, "per_user": {}}))
    (results / "ppd_eval" / "interpolation.json").write_text(json.dumps({
        "users": ["a", "b"], "monotonic": True, "curve": [{"mix": 0.0, "a": 1.0, "b": -1.0}, {"mix": 1.0, "a": -1.0, "b": 1.0}]}))
    ratings = list(range(1, 11))
    (results / "app_raters.json").write_text(json.dumps({
        "ratings": ratings, "users": ["a"], "prompts": 32, "steps": 15, "candidates": 4,
        "active": [0.5 + 0.03 * n for n in ratings], "random": [0.5 + 0.01 * n for n in ratings],
        "random_at_8": 0.58, "active_reaches_random_at_8_after": 3,
        "per_user": {"active": {"a": [0.5 + 0.03 * n for n in ratings]}, "random": {"a": [0.5 + 0.01 * n for n in ratings]}}}))
    assert main(["world", "report", "--results", str(results), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| dpo | red_large | 300 | 321.0 | 250.5 | 0.800 | 0.900 | 0.910 |" in text
    assert "| inpo | red_large | missing |" in text
    assert "| unseen | 4 | 0.700 | 0.900 | 0.900 | 0.600 | 0.900 | 0.850 |" in text and "monotonic: True" in text
    assert "| seen | 4 | 0.750 | 0.900 | 0.900 | 0.600 | - | - |" in text
    assert "| unseen (200 prompts) | 4 | 0.720 | 0.900 | 0.900 | n/a | - | - |" in text
    assert "| u0 | 0.520 | 0.500 | 0.550 | +0.020 |" in text and "| **mean** | 0.660 | 0.600 | 0.650 | +0.060 |" in text
    assert "- `max_train_steps=900 eval_every=300`: mean win rate 0.660 at step 300, 0.700 at step 900;" in text
    assert "| 8 | 0.740 | 0.580 |" in text and "active pairs reach it after 3 ratings" in text
    assert "Active minus random, per rater over the whole curve: +0.110" in text  # 0.02 x mean(1..10)
    for png in ("win_rate_vs_steps.png", "ppd_shots.png", "interpolation.png", "app_active_vs_random.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
