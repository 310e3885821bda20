"""Helpers shared by the benchmark runner, the report and the speed measurement.

The runner's contract with the three scripts is the run directory: ``config.json``,
``metrics.jsonl`` (one row per evaluation), ``checkpoint.pt`` and, once finished,
``summary.json``. The runner adds ``job.json`` (suite, script, task, variant, seed, metric)
and ``log.txt`` (the script's output, one block per attempt).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
JOB_FILE = "job.json"
LOG_FILE = "log.txt"
SUITE_FILE = "suite.json"

Status = Literal["done", "resume", "new"]


def read_json(path: Path) -> Any:
    """A JSON file's content."""
    return json.loads(Path(path).read_text())


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a missing file or a torn last line gives fewer rows."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


# Run-file keys renamed by issue 22 item 4 (docs/run_files.md): today's key -> the one older
# runs wrote. Cal-QL's old rows had both `score` and an always-null `normalized_score`.
OLD_KEYS = {"score": "normalized_score", "episode_length": "length_mean",
            "final_score": "final_normalized_score"}


def current_keys(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics row or summary.json in today's keys: an older run's `normalized_score`
    becomes `score` (and so on, OLD_KEYS), its summary's text `score` `score_definition`.
    Keys a run never wrote (`value_gap_return`, `wall_time_s` in rows) stay absent."""
    out = dict(record)
    if isinstance(out.get("score"), str):  # CQL-SAC's summary: how the score is computed
        out.setdefault("score_definition", out.pop("score"))
    for new, old in OLD_KEYS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def current_metric(metric: str) -> str:
    """A job.json `metric` in today's keys (older jobs name `normalized_score`)."""
    return next((new for new, old in OLD_KEYS.items() if old == metric), metric)


# The flags of each script's run length, as Part III's LENGTH_FIELD: a resume may grow them.
LENGTH_FLAGS = {"--total-steps": "total_steps", "--online-steps": "online_steps"}


def grows(run_dir: Path, argv: Sequence[str]) -> bool:
    """Whether `argv` asks for a longer run than the finished one in run_dir (a length flag
    above config.json's value)."""
    try:
        saved = read_json(Path(run_dir) / "config.json")["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    asked = {LENGTH_FLAGS[a]: b for a, b in zip(argv, argv[1:], strict=False)
             if a in LENGTH_FLAGS}
    return any(k in saved and int(v) > saved[k] for k, v in asked.items())


def run_status(run_dir: Path, argv: Sequence[str] = ()) -> Status:
    """done: summary.json exists; resume: a checkpoint without summary, or a finished run
    that `argv` (the job's arguments) grows; new: otherwise."""
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").exists():
        return "resume" if grows(run_dir, argv) else "done"
    if (run_dir / "checkpoint.pt").exists():
        return "resume"
    return "new"


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a text file ('' when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def cpu_model() -> str:
    """CPU model name from lscpu (Linux), else platform.processor()."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Machine, software and date, for the header of every results file."""
    import torch

    info: dict[str, Any] = dict(
        date=time.strftime("%Y-%m-%d %H:%M %Z"), host=platform.node(), cpu=cpu_model(),
        cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
    )
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_lines(info: dict[str, Any]) -> list[str]:
    """Markdown bullet lines describing a machine_info() dict."""
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return [f"- Machine: {info['cpu']}, {info['cores']} cores{gpu}",
            f"- Software: Python {info['python']}, torch {info['torch']}",
            f"- Date: {info['date']}"]


def command_line() -> str:
    """The current process's command line, as it would be typed from the repository root
    (shell-quoted, so that it can be pasted back)."""
    argv = list(sys.argv)
    if argv:
        with contextlib.suppress(ValueError):
            argv[0] = str(Path(argv[0]).resolve().relative_to(REPO))
    return shlex.join(["python", *argv])


def shown_path(path: Path | str) -> str:
    """A path as a report may print it: relative to the repository when inside it, else
    `<run root>` (no machine's own folders in committed text)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO)) or "."
    except ValueError:
        return "<run root>"


# An absolute path (/a/b...) that is not part of a URL or of a relative path.
_ABSOLUTE = re.compile(r"(?<![\w.:/~<>-])/(?:[\w.+=@%-]+/)+[\w.+=@%-]*")


def scrub(text: str, root: Path | str | None = None) -> str:
    """Text with the machine's paths taken out: the run root as shown_path() gives it, the
    repository as `.`, the interpreter as `python`, the home folder as `~`, and any other
    absolute path as `<path>`."""
    swaps = {sys.executable: "python", str(REPO): "."}
    if root is not None:
        swaps[str(Path(root).resolve())] = shown_path(root)
    swaps[str(Path.home())] = "~"
    for old in sorted(swaps, key=len, reverse=True):  # longest first: nested folders
        text = text.replace(old, swaps[old])
    return _ABSOLUTE.sub("<path>", text)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` that keeps the description's line breaks and shows every option's default
    (argparse.ArgumentDefaultsHelpFormatter without its noise: no default for switches and
    for options without one, none where the help already names it, lists space-separated)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (text == argparse.SUPPRESS or not action.option_strings or "default" in text
                or default in (None, False, argparse.SUPPRESS) or default == []):
            return action.help
        shown = (" ".join(map(str, default)) if isinstance(default, list | tuple)
                 else str(default))
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


EXIT_MARK = "=== exit code "


def failure_reason(log: str) -> str:
    """Why a run failed, from its log.txt: the script's one-line error (`error: ...`), else
    the last line of a traceback, else the log's last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    attempt = max((i for i, line in enumerate(lines) if line.startswith("=== ")
                   and not line.startswith(EXIT_MARK)), default=-1)
    lines = [line for line in lines[attempt + 1:] if not line.startswith("=== ")]
    errors = [line for line in lines if line.startswith(("error:", "could not start:"))]
    if errors:
        return errors[-1]
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1]
    return lines[-1] if lines else "no output"


def exit_code(log: str) -> int | None:
    """The exit code the runner wrote at the end of the log's last attempt (None: none,
    e.g. the runner itself was stopped)."""
    marks = [line for line in log.splitlines() if line.startswith(("=== ", EXIT_MARK))]
    if not marks or not marks[-1].startswith(EXIT_MARK):
        return None
    return int(marks[-1][len(EXIT_MARK):].split()[0])
