"""Every command README.md shows works: a documented command that fails is a bug.

Commands are read from the README's ```bash blocks. Each is parsed by the parser of the
program it calls; the three algorithm scripts then run it for a few steps wherever its data
can be built here: local datasets (benchmark/datasets.py), schema twins under the real
Minari ids (tests/twins.py) and a synthetic DQN Replay folder (tests/dqn_replay.py). The
brief run appends tiny sizes and `--device cpu` to the documented command, so every flag
the README wrote is still parsed and used. The set-up commands are the ones CI runs.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import twins
from dqn_replay import make_dqn_replay_dir

import calql_finetune
import cql_qrdqn_atari
import cql_sac_continuous
from benchmark import datasets, gif, report, run, speed, suites

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"cql_sac_continuous.py": cql_sac_continuous, "calql_finetune.py": calql_finetune,
           "cql_qrdqn_atari.py": cql_qrdqn_atari}
BENCHMARK = {"benchmark/run.py": run, "benchmark/report.py": report,
             "benchmark/speed.py": speed, "benchmark/datasets.py": datasets,
             "benchmark/gif.py": gif}  # gif: run on a tiny video in test_benchmark_gif.py
SETUP = ["pip install -r requirements.txt", "python -m pytest"]
# Appended for the brief run: a few steps, tiny networks, one short evaluation.
BRIEF = {
    "cql_sac_continuous.py": "--total-steps 2 --eval-every 2 --eval-episodes 1 --batch-size 8 "
                             "--cql-n-actions 2 --actor-hidden-dims 8 8 --critic-hidden-dims 8 8 "
                             "--bc-steps 1 --log-every 1",
    "calql_finetune.py": "--offline-steps 2 --offline-eval-every 2 --online-steps 3 "
                         "--eval-every 3 --eval-episodes 1 --batch-size 8 --cql-n-actions 2 "
                         "--actor-hidden-dims 8 8 --critic-hidden-dims 8 8 --log-every 1",
    "cql_qrdqn_atari.py": "--total-steps 2 --eval-every 2 --eval-episodes 1 --batch-size 4 "
                          "--num-quantiles 4 --max-episode-steps 30 --log-every 1",
}


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks: continuations joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_commands_for_every_program():
    programs = {shlex.split(c)[1] for c in COMMANDS if c.startswith("python ")}
    assert set(SCRIPTS) | set(BENCHMARK) <= programs
    assert COMMANDS[:2] == SETUP


def test_ci_runs_the_readme_setup_commands_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in SETUP:
        assert any(line.strip().startswith(command) for line in ci), command
    assert not any("torch==" in line for line in ci), "CI must not pin torch ahead of the README"


def test_the_readme_quotes_results_verbatim():
    """Numbers in the README are quoted from a committed report, never typed by hand."""
    quoted = [line[2:] for line in (ROOT / "README.md").read_text().splitlines()
              if line.startswith(("> - **", ">   - `"))]
    reports = "\n".join(p.read_text() for p in (ROOT / "benchmark" / "results").glob("*.md"))
    assert len(quoted) >= 2
    for line in quoted:
        assert line in reports.splitlines(), line


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every table of a markdown text as rows of {header: cell}."""
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("| ") and lines[i + 1].startswith("|---"):
            head = [c.strip() for c in line.strip("|").split(" | ")]
            body = []
            for row in lines[i + 2:]:
                if not row.startswith("| "):
                    break
                body.append(dict(zip(head, (c.strip() for c in row.strip("|").split(" | ")),
                                     strict=True)))
            tables.append(body)
    return tables


BOUND_CELLS = {"CQL settled gap": ("cql", "settled gap"),
               "CQL runs <= 0 [95% CI]": ("cql", "runs with settled gap <= 0 [95% CI]"),
               "CQL converged": ("cql", "converged"),
               "naive SAC settled gap": ("sac", "settled gap"),
               "naive SAC runs <= 0 [95% CI]": ("sac", "runs with settled gap <= 0 [95% CI]")}


def test_the_readme_lower_bound_table_is_the_reports():
    """Each row of the README's per-dataset lower-bound table: its cells are the named
    report's lower-bound row for that dataset at the paper's Polyak rate, and `updates` is
    the --total-steps that report's suite ran."""
    readme = (ROOT / "README.md").read_text()
    (table,) = [t for t in markdown_tables(readme) if t and "CQL settled gap" in t[0]]
    assert {row["dataset"] for row in table} == set(suites.PENDULUM_LEVELS)
    for row in table:
        name = re.fullmatch(r"\[(.+)\]\(benchmark/results/(.+)\)", row["report"]).group(2)
        report = (ROOT / "benchmark" / "results" / name).read_text()
        env = f"pendulum-{row['dataset']}"
        found = {r["variant"]: r for t in markdown_tables(report) for r in t
                 if "settled gap" in r and r["dataset"] == env}
        for cell, (method, column) in BOUND_CELLS.items():
            assert row[cell] == found[method + suites.LONG][column], (name, env, cell)
        (entry,) = [e for e in suites.SUITES[Path(name).stem].entries
                    if e.env == env and e.variant == "cql" + suites.LONG]
        assert row["updates"] == entry.args[entry.args.index("--total-steps") + 1], name
    # the status table's summary is the sum of these rows
    def counts(column: str) -> dict[str, tuple[int, int]]:  # dataset -> (k, n) of "k/n [CI]"
        return {row["dataset"]: tuple(map(int, row[column].split()[0].split("/")))
                for row in table}

    below, sac = counts("CQL runs <= 0 [95% CI]"), counts("naive SAC runs <= 0 [95% CI]")
    conv, n = counts("CQL converged"), sum(n for _, n in below.values())
    each = ", ".join(f"{d} {k}/{m}" for d, (k, m) in sorted(below.items(), key=lambda i: -i[1][0]))
    assert (f"CQL's settled gap is <= 0 on {sum(k for k, _ in below.values())}/{n} runs ({each}), "
            f"naive SAC's on {sum(k for k, _ in sac.values())}/{n}; CQL's gap passed the stated "
            f"convergence test on {sum(k for k, _ in conv.values())}/{n}") in readme


def brief_run(program: str, run_dir: str, tmp_path: Path, local_dataset) -> Path:
    """The README's training command for `--run-dir run_dir`, brief, in tmp_path."""
    (command,) = [c for c in COMMANDS if c.startswith(f"python {program}")
                  and shlex.split(c)[-2:] == ["--run-dir", run_dir]]
    module, argv = SCRIPTS[program], shlex.split(command)[2:-2]
    local_dataset(data_of(module.parse_args(argv)))
    path = tmp_path / run_dir
    module.main(module.parse_args([*argv, *shlex.split(BRIEF[program]), "--device", "cpu",
                                   "--no-progress", "--run-dir", str(path)]))
    return path


def after_training_command(module, program: str, ns: argparse.Namespace, tmp_path: Path,
                           local_dataset) -> None:
    """--evaluate / --export-policy / --push-to-hub on a brief run of the README's own
    training command for that directory (the Hub folder only: no network here)."""
    documented = ns.evaluate or ns.export_policy or ns.push_to_hub[1]
    run_dir = brief_run(program, documented, tmp_path, local_dataset)
    if ns.push_to_hub:
        assert ns.hub_folder is not None, "the README's push must be runnable here"
        ns.push_to_hub, ns.hub_folder = [ns.push_to_hub[0], str(run_dir)], tmp_path / "hub"
    else:
        ns.evaluate, ns.export_policy = (str(run_dir) if x else None
                                         for x in (ns.evaluate, ns.export_policy))
    module.after_training(ns)
    expected = {"evaluate": run_dir / "evaluations", "export_policy": run_dir / "policy.pt2",
                "push_to_hub": tmp_path / "hub" / "README.md"}
    assert next(path for key, path in expected.items() if getattr(ns, key)).exists()


def test_readme_python_blocks_run(tmp_path, local_dataset, one_torch_thread):
    """The README's Python (the exported policy, used without the script) runs as written,
    on a brief run's policy.pt2 at the path it names."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for code in blocks:
        (path,) = re.findall(r'"(runs/[^"]+/policy.pt2)"', code)
        run_dir = brief_run("cql_sac_continuous.py", str(Path(path).parent), tmp_path,
                            local_dataset)
        cql_sac_continuous.after_training(argparse.Namespace(
            push_to_hub=None, evaluate=None, export_policy=str(run_dir), capture_video=False,
            seed=None, eval_episodes=None, device="cpu"))
        scope: dict = {}
        exec(code.replace(path, str(run_dir / "policy.pt2")), scope)  # noqa: S102
        assert scope["action"].shape == (1, 1)


class Parsed(Exception):
    """Raised instead of running a benchmark program once its arguments are parsed."""


def parse_only(module, argv: list[str], monkeypatch) -> argparse.Namespace:
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed) as parsed:
        module.main(argv)
    return parsed.value.args[0]


def data_of(args) -> str:
    """The Minari dataset id a parsed script command trains on."""
    return args.dataset_id or cql_qrdqn_atari.LOCAL_ENVS[args.env]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in SETUP])
def test_readme_command(command, tmp_path, monkeypatch, twin, local_dataset,
                        one_torch_thread, capsys):
    words = shlex.split(command)
    if words[0] == "minari":  # needs the network; the id must be one a preset names
        assert words[1] == "download"
        named = {cql_sac_continuous.preset_args(e).dataset_id
                 for e in cql_sac_continuous.ENV_PRESETS}
        named |= {calql_finetune.preset_args(e).dataset_id for e in calql_finetune.ENV_PRESETS}
        assert words[2] in named
        return
    assert words[0] == "python", command
    program, argv = words[1], words[2:]
    if program in BENCHMARK:
        module = BENCHMARK[program]
        if program == "benchmark/datasets.py" and argv:  # build (or find) them, for real
            module.main(argv)
            assert all(datasets.is_built(name) for name in argv if not name.startswith("-"))
        else:
            parse_only(module, argv, monkeypatch)
        return
    module = SCRIPTS[program]
    if (after := module.after_training_args(argv)) is not None:
        return after_training_command(module, program, after, tmp_path, local_dataset)
    if "--help" in argv or "--presets" in argv:
        with pytest.raises(SystemExit) as done:
            module.parse_args(argv)
        assert done.value.code in (0, None)
        assert "| source |" in capsys.readouterr().out or "--help" in argv
        return
    args = module.parse_args(argv)
    if "--dqn-replay-dir" in argv:  # the documented layout <Game>/<run>/replay_logs
        where = argv.index("--dqn-replay-dir") + 1
        make_dqn_replay_dir(tmp_path / argv[where], num_checkpoints=2)
        argv[where] = str(tmp_path / argv[where])
    elif data_of(args).startswith("local/"):
        local_dataset(data_of(args))
    elif data_of(args) in twins.TWINS:
        twin(data_of(args))
    else:  # a real dataset with no twin here (the twin of its family runs elsewhere)
        return
    argv = [a for a in argv if a != "--compile"]  # compile: tests/test_compile.py
    brief = [*argv, *shlex.split(BRIEF[program]), "--device", "cpu", "--no-progress",
             "--run-dir", str(tmp_path / "run")]
    summary = module.main(module.parse_args(brief))
    assert summary is not None and (tmp_path / "run" / "summary.json").exists()


def test_the_readme_speed_table_is_the_reports():
    """Each row of the README's speed table is a row of benchmark/results/speed_cpu.md."""
    section = (ROOT / "README.md").read_text().split("### Speed", 1)[1].split("\n#", 1)[0]
    (rows,) = markdown_tables(section)
    report = [r for table in markdown_tables(
        (ROOT / "benchmark" / "results" / "speed_cpu.md").read_text()) for r in table
        if "updates/s" in r and "h per 1M updates" in r]
    assert len(rows) >= 6
    for row in rows:
        assert any({k: r[k] for k in row} == row for r in report), row
