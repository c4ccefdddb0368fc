"""The docs stay true to the code: docs/config.md is what the generator writes from TrainConfig,
and every command in README.md, docs/, bench/README.md and apps/README.md parses as written."""

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


gen_config_docs = _load("gen_config_docs")
check_doc_commands = _load("check_doc_commands")


def test_config_docs_are_current():
    assert (ROOT / "docs" / "config.md").read_text() == gen_config_docs.render(), (
        "docs/config.md is out of date: run python tools/gen_config_docs.py")


def test_config_docs_check_fails_on_a_stale_file(tmp_path, monkeypatch):
    stale = tmp_path / "config.md"
    stale.write_text(gen_config_docs.render().replace("| `beta` |", "| `beta_old` |"))
    monkeypatch.setattr(gen_config_docs, "OUT", stale)
    monkeypatch.setattr(gen_config_docs, "ROOT", tmp_path)
    assert gen_config_docs.main(["--check"]) == 1
    assert gen_config_docs.main([]) == 0 and gen_config_docs.main(["--check"]) == 0


def test_config_docs_list_every_key_with_its_default():
    import dataclasses

    from diffpref.training.config import TrainConfig

    text = gen_config_docs.render()
    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines() if line.startswith("| `")}
    assert set(rows) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert "| `max_train_steps` | `int` | `200` |" in rows["max_train_steps"]


def test_every_documented_command_parses():
    files = check_doc_commands.doc_files()
    assert ROOT / "README.md" in files and any(f.parent.name == "docs" for f in files)
    checked, problems = check_doc_commands.run_checks(files)
    assert checked > 30  # the docs have dozens of commands: far fewer means extraction broke
    assert not problems, "\n".join(map(str, problems))
    assert not check_doc_commands.broken_links(files)


BAD_DOC = """\
# Commands

```bash
diffpref generate --prompts p.txt --out o --no-such-flag        # 1 unknown flag
diffpref train --config configs/no_such.yaml                    # 2 missing config
diffpref train --config configs/embedded_dpo.yaml no_such_key=1 # 3 unknown key
accelerate launch train/train.py --config configs/embedded_dpo.yaml beta=high   # 4 bad value
python bench/no_such_script.py --json                           # 5 missing script
diffpref world eval --adapter a \\
  --bogus 3                                                     # 6 continued line, unknown flag
python -m diffpref.no_such_module                               # 7 missing module
torchrun --nproc_per_node 2 -m diffpref.cli generate --bogus    # 8 unknown flag under a launcher
```

Inline: `diffpref data inspect x.parquet --jsn` (9 unknown flag) and
`diffpref world relabel --decided-only` (a fragment naming a flag: fine).

```bash
diffpref data inspect x.parquet --json && bash bench/world_experiments.sh
DPO_OVERRIDES="beta=1000" bash bench/ppd_dpo_upper_bound.sh
torchrun --nproc_per_node 2 train/train.py --config configs/embedded_dpo.yaml max_train_steps=3
torchrun --nproc_per_node 2 -m diffpref.cli generate --prompts p.txt --out o
```

[a link that resolves](configs/embedded_dpo.yaml), [one that does not](docs/gone.md), [a site](https://x.org).

An indented block:

    diffpref info --json
    accelerate launch --config_file configs/accelerate/none.yaml train/train.py --config configs/embedded_dpo.yaml
"""


def _doc_root(tmp_path, text):
    """A markdown file in a copy of the repo's layout (paths in commands resolve against its root)."""
    for name in ("configs", "bench", "train"):
        (tmp_path / name).symlink_to(ROOT / name)
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    return doc


def test_checker_finds_each_kind_of_broken_command(tmp_path):
    doc = _doc_root(tmp_path, BAD_DOC)
    checked, problems = check_doc_commands.run_checks([doc], root=tmp_path)
    found = sorted(p.command.line for p in problems)
    assert found == [4, 5, 6, 7, 8, 9, 11, 12, 15, 30], "\n".join(map(str, problems))
    messages = " ".join(p.message for p in problems)
    assert "--no-such-flag" in messages and "no_such.yaml does not exist" in messages
    assert "no_such_key" in messages and "no_such_script.py does not exist" in messages
    assert checked == 17  # 8 bad fenced + 2 inline + 5 good (one chain of two) + 2 indented
    assert "none.yaml does not exist" in messages
    assert check_doc_commands.broken_links([doc], root=tmp_path) == ["doc.md:25: link to docs/gone.md does not exist"]


@pytest.mark.slow
def test_script_arguments_are_parsed_by_the_scripts_own_parser(tmp_path):
    doc = _doc_root(tmp_path, "```bash\npython bench/app.py --json\npython bench/app.py --no-such-option\n```\n")
    _, problems = check_doc_commands.run_checks([doc], root=tmp_path, scripts=True)
    assert [p.command.line for p in problems] == [3], "\n".join(map(str, problems))
    assert "--no-such-option" in problems[0].message


@pytest.mark.slow
def test_every_documented_script_command_parses_with_its_own_parser():
    checked, problems = check_doc_commands.run_checks(check_doc_commands.doc_files(), scripts=True)
    assert checked > 30
    assert not problems, "\n".join(map(str, problems))


def test_readme_opens_with_the_lines_ci_runs():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 200, "README.md is a user's README: move reference to docs/ and results to reports/"
    fence = readme.index("```bash")
    install, main_job, tests = readme[fence + 1:fence + 4]
    # CI runs them as `python -m pip install -q ...` (quiet); otherwise word for word.
    ci = {line.split("# README: ")[1].strip(): [w for w in shlex.split(line.split("#")[0]) if w != "-q"]
          for line in (ROOT / ".ci" / "run").read_text().splitlines() if "# README: " in line}
    assert ci["install"] == ["python", "-m", *shlex.split(install)]
    assert ci["tests"] == [w for w in shlex.split(tests) if w != "-q"] and tests.startswith("python -m pytest")
    assert main_job.startswith("diffpref ")


def test_data_doc_lists_every_skip_reason():
    from diffpref.data.errors import SKIP_REASONS

    rows = [line.split("|")[1].strip(" `") for line in (ROOT / "docs" / "data.md").read_text().splitlines()
            if line.startswith("| `")]
    assert rows == list(SKIP_REASONS), "docs/data.md's skip table must name the readers' reasons, in order"
