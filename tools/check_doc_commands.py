"""Check that the commands in README.md, docs/*.md, bench/README.md and apps/README.md run as written.

    python tools/check_doc_commands.py             # parse every command (seconds)
    python tools/check_doc_commands.py --scripts   # also parse each `python script.py ...` command's
                                                   # arguments with the script's own argparse parser
    python tools/check_doc_commands.py -v          # list every command checked

What is checked, without running anything long:
- `diffpref ...` parses with the real parser (`diffpref.cli.build_parser().parse_args`);
- `diffpref train` and `train/train.py` (under python, accelerate launch or torchrun): the
  `--config` file exists, and the config with its `key=value` overrides loads (`load_config`:
  every key is a TrainConfig key, every value valid);
- `python path.py`, `bash path.sh`: the file exists; `python -m module`: the module is found;
- every relative markdown link points at a file that exists;
- with `--scripts`, each `python path.py ARGS` / `python -m module ARGS` is started in a child
  process whose `ArgumentParser.parse_args` stops the script right after parsing ARGS, so the
  script's own parser judges them and its work never runs.

Commands come from fenced ```bash blocks (backslash-continued lines joined, `#` comments
dropped, `&&`/`;`/`|` chains split), from indented code blocks that start like a command, and from inline `code` spans that start with `diffpref `,
`python ` or `bash ` unless they hold a placeholder (`...`, `[`, `FILE`-style capitals).
Running the long commands themselves is left to the person who measures.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# reports/ is left out on purpose: its commands reproduce a figure at the commit named beside
# them, and may use keys the current code no longer has.
DOC_GLOBS = ("README.md", "docs/*.md", "bench/README.md", "apps/README.md")

FENCE = re.compile(r"^```(\w*)\s*$")
INLINE = re.compile(r"`((?:[^`\n]|\n(?!\s*\n))+)`")
INLINE_STARTS = ("diffpref ", "python ", "bash ", "accelerate launch ", "torchrun ")
# An inline span that holds one of these is a usage pattern, not a command to run.
PLACEHOLDER = re.compile(r"\.\.\.|\[|\]|\(|\)|\b[A-Z][A-Z_]{1,}\b(?!=)|<|>|\\\|")
ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", "||", ";", "|", "&"}
# Shell built-ins and tools the docs use around diffpref's own commands; nothing to check.
IGNORED = {"pip", "mkdir", "ln", "cd", "ls", "cat", "export", "echo", "cp", "rm", "git", "nvidia-smi", "tensorboard"}


@dataclass
class Command:
    doc: str
    line: int
    text: str
    argv: list[str]
    inline: bool


@dataclass
class Problem:
    command: Command
    message: str

    def __str__(self) -> str:
        return f"{self.command.doc}:{self.command.line}: {self.command.text}\n    -> {self.message}"


def doc_files(root: Path = ROOT) -> list[Path]:
    files: list[Path] = []
    for pattern in DOC_GLOBS:
        files += sorted(root.glob(pattern))
    return files


def _split_chain(text: str) -> list[list[str]]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    parts: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            parts.append([])
        else:
            parts[-1].append(token)
    return [p for p in parts if p]


def extract(path: Path, root: Path = ROOT, inline: bool = True) -> list[Command]:
    """The commands of one markdown file: fenced bash blocks, then runnable inline spans."""
    rel = str(path.relative_to(root))
    commands: list[Command] = []
    lines = path.read_text().splitlines()
    prose = list(lines)  # the file with every fenced block blanked: where inline spans live
    fence_lang: str | None = None
    indented_command = False
    pending, pending_line = "", 0
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line.strip())
        if match or fence_lang is not None:
            prose[number - 1] = ""
        if match:
            fence_lang = None if fence_lang is not None else match.group(1)
            continue
        if fence_lang is None:
            # An indented code block (4 spaces after a blank line, or after another such line) that
            # starts like a command is one too: some docs write commands that way.
            stripped = line.strip()
            after_blank = number == 1 or not lines[number - 2].strip() or indented_command
            indented_command = (line.startswith("    ") and after_blank and stripped.startswith(INLINE_STARTS))
            if indented_command:
                prose[number - 1] = ""
                for argv in _split_chain(stripped):
                    commands.append(Command(rel, number, stripped, argv, inline=False))
            continue
        if fence_lang not in ("bash", "sh", "shell", "console"):
            continue
        stripped = line.rstrip()
        if not pending:
            pending_line = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = (pending + stripped).strip()
        pending = ""
        if not text or text.startswith("#"):
            continue
        for argv in _split_chain(text):
            commands.append(Command(rel, pending_line, text, argv, inline=False))
    if inline:
        text = "\n".join(prose)
        # A span may wrap onto the next line of its paragraph, never across a blank line.
        for match in INLINE.finditer(text):
            span = " ".join(match.group(1).split())
            if span.startswith(INLINE_STARTS) and not PLACEHOLDER.search(span):
                number = text.count("\n", 0, match.start()) + 1
                for argv in _split_chain(span):
                    commands.append(Command(rel, number, span, argv, inline=True))
    return commands


def _strip_env(argv: list[str]) -> list[str]:
    i = 0
    while i < len(argv) and ENV_ASSIGN.match(argv[i]):
        i += 1
    return argv[i:]


def _check_train_args(args: list[str], root: Path) -> str | None:
    """`--config FILE key=value ...` as `diffpref train` and train/train.py take them."""
    from diffpref.config import ConfigError, load_config
    from diffpref.training.config import TrainConfig

    parser = argparse.ArgumentParser(prog="train", add_help=False, exit_on_error=False)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    if args[:1] in (["--help"], ["-h"]):
        return None
    error = _parse(parser, args)
    if error is not None:
        return error
    parsed = parser.parse_args(args)
    config = root / parsed.config
    if not config.exists():
        return f"--config {parsed.config} does not exist"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):  # HfArgumentParser prints a bad value's message there
            load_config(TrainConfig, config, parsed.overrides)
    except (ConfigError, ValueError) as exc:
        printed = stderr.getvalue().strip().splitlines()
        return f"config does not load: {printed[-1] if printed else exc}"
    return None


# argparse's message when only required arguments are missing: an inline span such as
# `diffpref world relabel --decided-only` names a command or a flag, it is not meant to run.
# `diffpref generate --users` names a flag (argparse: "expected one argument").
FRAGMENT = re.compile(r"the following arguments are required|expected one argument")


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """None when ``args`` parse (or ask for --help), else argparse's error message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exc:
        if exc.code in (0, None):
            return None
        lines = stderr.getvalue().strip().splitlines() or [f"exit {exc.code}"]
        return lines[-1]
    return None


def _script_after(argv: list[str], launcher_flags_with_value: set[str]) -> int | None:
    """Index of the first .py argument after a launcher's own options."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.endswith(".py"):
            return i
        if token in launcher_flags_with_value:
            i += 2
            continue
        i += 1
    return None


# Launcher options that take a value (the docs use these; others are flags or `--opt=value`).
LAUNCHER_VALUES = {"--nproc_per_node", "--nproc-per-node", "--num_processes", "--num_machines", "--config_file",
                   "--mixed_precision", "--nnodes", "--main_process_port", "--master_port", "--gpu_ids"}


def _check_diffpref(args: list[str], root: Path) -> str | None:
    from diffpref.cli import build_parser

    error = _parse(build_parser(), args)
    if error is not None:
        return f"diffpref's parser refused it: {error}"
    if args[:1] == ["train"] and "--help" not in args and "-h" not in args:
        return _check_train_args(args[1:], root)
    return None


def _check_module(module: str, args: list[str], root: Path) -> str | None:
    """`-m MODULE ARGS`: the module exists; `diffpref.cli` is the diffpref command itself."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return f"module {module!r} is not importable"
    return _check_diffpref(args, root) if module == "diffpref.cli" else None


def check(command: Command, root: Path = ROOT) -> str | None:
    """None when the command is valid as written, else what is wrong."""
    argv = _strip_env(command.argv)
    if not argv:
        return None
    head = argv[0]
    if head == "diffpref":
        return _check_diffpref(argv[1:], root)
    if head in ("python", "python3"):
        if argv[1:2] == ["-m"]:
            return _check_module(argv[2] if len(argv) > 2 else "", argv[3:], root)
        if argv[1:2] == ["-c"]:
            return None
        script = argv[1] if len(argv) > 1 else ""
        if not (root / script).is_file():
            return f"script {script} does not exist"
        if script == "train/train.py":
            return _check_train_args(argv[2:], root)
        return None
    if head in ("accelerate", "torchrun"):
        rest = argv[2:] if head == "accelerate" else argv[1:]
        if head == "accelerate" and argv[1:2] != ["launch"]:
            return None  # accelerate config / env: nothing of ours
        for flag in ("--config_file", "--config-file"):
            if flag in rest and not (root / rest[rest.index(flag) + 1]).is_file():
                return f"{flag} {rest[rest.index(flag) + 1]} does not exist"
        if "-m" in rest or "--module" in rest:  # the launcher runs a module: -m MODULE ARGS
            at = max(rest.index(flag) for flag in ("-m", "--module") if flag in rest)
            return _check_module(rest[at + 1] if len(rest) > at + 1 else "", rest[at + 2:], root)
        at = _script_after(rest, LAUNCHER_VALUES)
        if at is None:
            return "no .py script after the launcher's options"
        script = rest[at]
        if not (root / script).is_file():
            return f"script {script} does not exist"
        if script == "train/train.py":
            return _check_train_args(rest[at + 1:], root)
        return None
    if head in ("bash", "sh"):
        script = argv[1] if len(argv) > 1 else ""
        return None if (root / script).is_file() else f"script {script} does not exist"
    if head in IGNORED:
        return None
    return f"unknown command {head!r}: teach tools/check_doc_commands.py what to check, or add it to IGNORED"


# The child's parse_args parses (so a bad argument exits 2 with argparse's message), then raises
# this to stop the script before its work; `python -m` and script paths both run as __main__.
_CHILD = r"""
import argparse, runpy, sys
class _Parsed(BaseException):
    pass
_original = argparse.ArgumentParser.parse_args
def _parse_then_stop(self, args=None, namespace=None):
    _original(self, args, namespace)
    raise _Parsed
argparse.ArgumentParser.parse_args = _parse_then_stop
kind, target, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv = [target] + argv
try:
    if kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, __import__("os").path.dirname(target))
        runpy.run_path(target, run_name="__main__")
except _Parsed:
    sys.exit(0)
print("the script finished without calling ArgumentParser.parse_args", file=sys.stderr)
sys.exit(3)
"""


def check_script_arguments(command: Command, root: Path = ROOT, timeout: float = 300) -> str | None:
    """Parse a `python script.py ARGS` command's ARGS with the script's own parser, in a child process."""
    argv = _strip_env(command.argv)
    if not argv or argv[0] not in ("python", "python3") or argv[1:2] == ["-c"]:
        return None
    if argv[1:2] == ["-m"]:
        if argv[2] == "pytest":
            return None
        kind, target, args = "module", argv[2], argv[3:]
    else:
        kind, target, args = "path", argv[1], argv[2:]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _CHILD, kind, target, *args], check=False, cwd=root, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"its own parser refused it (exit {result.returncode}): {tail}"
    return None


def check_command(command: Command, root: Path = ROOT, scripts: bool = False) -> str | None:
    """The one verdict on a command: `check`, a fragment rule for inline spans, then `--scripts`."""
    message = check(command, root)
    if message is not None and command.inline and FRAGMENT.search(message):
        return None
    if message is None and scripts:
        message = check_script_arguments(command, root)
        if message is not None and command.inline and FRAGMENT.search(message):
            return None
    return message


def run_checks(files: list[Path], root: Path = ROOT, scripts: bool = False, inline: bool = True,
               on_ok=None) -> tuple[int, list[Problem]]:
    """(number of commands checked, the problems found) over ``files``."""
    problems: list[Problem] = []
    checked = 0
    for path in files:
        for command in extract(path, root, inline=inline):
            checked += 1
            message = check_command(command, root, scripts)
            if message is not None:
                problems.append(Problem(command, message))
            elif on_ok is not None:
                on_ok(command)
    return checked, problems


LINK = re.compile(r"\]\(([^)\s]+)\)")


def broken_links(files: list[Path], root: Path = ROOT) -> list[str]:
    """Relative markdown links whose target does not exist (docs move; links must follow)."""
    broken = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target) or target.startswith("#"):
                    continue
                if not (path.parent / target.split("#")[0]).exists():
                    broken.append(f"{path.relative_to(root)}:{number}: link to {target} does not exist")
    return broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="markdown files (default: README.md, docs/, bench/README.md, apps/README.md)")
    parser.add_argument("--scripts", action="store_true", help="also parse python scripts' arguments with their own parsers")
    parser.add_argument("--no-inline", action="store_true", help="only fenced bash blocks")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    files = [Path(f).resolve() for f in args.files] or doc_files()
    checked, problems = run_checks(files, scripts=args.scripts, inline=not args.no_inline,
                                   on_ok=(lambda c: print(f"ok  {c.doc}:{c.line}: {shlex.join(c.argv)}")) if args.verbose else None)
    links = broken_links(files)
    if args.json:
        print(json.dumps({"checked": checked, "problems": [str(p) for p in problems], "broken_links": links}, indent=1))
    else:
        for problem in [*map(str, problems), *links]:
            print(problem)
        print(f"{checked} commands in {len(files)} files, {len(problems)} problems, {len(links)} broken links")
    return 1 if problems or links else 0


if __name__ == "__main__":
    sys.exit(main())
