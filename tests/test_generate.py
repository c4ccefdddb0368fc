import json

import numpy as np
import pytest
from PIL import Image

from diffpref.cli import main
from diffpref.generate import read_prompts


def _run_generate(tmp_path, model_dir, out, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red star\n\n# comment\na blue square on a white background\n")
    return main(["generate", "--prompts", str(prompts), "--out", str(out), "--model", str(model_dir),
                 "--num-images", "2", "--steps", "2", "--device", "cpu", *extra])


def test_generate_writes_images_and_metadata_and_resumes(tmp_path, tiny_sd15_dir, capsys):
    out = tmp_path / "out"
    assert _run_generate(tmp_path, tiny_sd15_dir, out, "--batch-size", "3") == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["prompt"] for r in rows} == {"a red star", "a blue square on a white background"}
    assert sorted(r["seed"] for r in rows) == [0, 0, 1, 1]
    for row in rows:
        assert Image.open(out / row["file"]).size == (row["width"], row["height"])
    first = np.asarray(Image.open(out / rows[0]["file"])).astype(int)

    # A rerun does nothing; a lost image is regenerated, identically, with another batch size.
    capsys.readouterr()
    assert _run_generate(tmp_path, tiny_sd15_dir, out) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generated"] == 0
    (out / rows[0]["file"]).unlink()
    assert _run_generate(tmp_path, tiny_sd15_dir, out, "--batch-size", "1") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generated"] == 1
    # Batched float math may round one 8-bit level differently; the image is otherwise the same.
    regenerated = np.asarray(Image.open(out / rows[0]["file"])).astype(int)
    assert np.abs(regenerated - first).max() <= 2


def test_generate_survives_a_torn_metadata_line(tmp_path, tiny_sd15_dir, capsys):
    out = tmp_path / "out"
    assert _run_generate(tmp_path, tiny_sd15_dir, out) == 0
    meta = out / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])  # crash in the middle of the last write
    capsys.readouterr()
    assert _run_generate(tmp_path, tiny_sd15_dir, out) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generated"] == 1
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.startswith('{"file"') and line.endswith("}")]
    assert len({r["file"] for r in rows}) == 4  # the torn line was ended, so the new line is whole


def test_read_prompts_formats_and_errors(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a star"}\n\n{"prompt": "a circle", "id": 2}\n')
    assert read_prompts(jsonl) == ["a star", "a circle"]
    jsonl.write_text('{"prompt": "a star"}\n{"text": "oops"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        read_prompts(jsonl)
    empty = tmp_path / "e.txt"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(empty)
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "missing.txt")


def test_generate_reports_missing_model_cleanly(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a star\n")
    assert main(["generate", "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"version", "embedded_model", "embedded_clip", "device", "attention"} <= set(info)
    assert info["device"] in ("cpu", "cuda") and info["attention"] in ("sdpa", "xformers")


def test_generate_best_of_records_every_candidate_seed_and_score(tmp_path, tiny_sd15_dir, capsys):
    from diffpref.world.render import WorldAttributes, render

    rows = []
    for i, (liked, other) in enumerate([("red", "blue"), ("red", "green")]):
        for name, color in (("a", liked), ("b", other)):
            render(WorldAttributes("circle", color, "white", 0.5, 0.6, 0.8)).save(tmp_path / f"{i}{name}.png")
        rows.append({"prompt": "a circle", "image_0": str(tmp_path / f"{i}a.png"), "image_1": str(tmp_path / f"{i}b.png"),
                     "label": 1.0})
    examples = tmp_path / "choices.jsonl"
    examples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "best"
    assert _run_generate(tmp_path, tiny_sd15_dir, out, "--best-of", "3", "--reward-examples", str(examples)) == 0
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 4
    for row in meta:
        assert row["best_of"] == 3 and row["candidate_seeds"] == [row["seed"] + j for j in range(3)]
        assert row["chosen"] == int(np.argmax(row["scores"])) and row["shown_seed"] == row["candidate_seeds"][row["chosen"]]
    # the shown image is plain generation at its recorded seed
    plain = tmp_path / "plain"
    row = meta[0]
    assert main(["generate", "--prompts", str(tmp_path / "prompts.txt"), "--out", str(plain), "--model",
                 str(tiny_sd15_dir), "--num-images", "1", "--seed", str(row["shown_seed"]), "--steps", "2",
                 "--device", "cpu"]) == 0
    again = next(r for r in (json.loads(x) for x in (plain / "metadata.jsonl").read_text().splitlines())
                 if r["prompt"] == row["prompt"])
    diff = np.asarray(Image.open(plain / again["file"])).astype(int) - np.asarray(Image.open(out / row["file"])).astype(int)
    assert np.abs(diff).max() <= 2  # batched float math may round one 8-bit level differently
    assert main(["generate", "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "x"), "--model",
                 str(tiny_sd15_dir), "--best-of", "2", "--steps", "2", "--device", "cpu"]) == 2
