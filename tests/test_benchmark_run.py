"""The runner: skip finished runs, resume interrupted ones, report failures without stopping
the others, the submitit (local executor) launcher, and the `smoke` suite end to end."""

import json
import re
import textwrap
from argparse import Namespace
from pathlib import Path

import pytest

from benchmark import common, run, suites
from benchmark.common import read_json, read_jsonl, run_status

# A stand-in for the three scripts: the same run-dir contract, no training. It records its
# arguments in calls.jsonl; `--env fail` exits 3 with a message; `--env stop` checkpoints
# and exits as an interrupted run does.
FAKE_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    argv = sys.argv[1:]
    run_dir = Path(argv[argv.index("--run-dir") + 1])
    env = argv[argv.index("--env") + 1]
    with open(run_dir / "calls.jsonl", "a") as fh:
        fh.write(json.dumps(argv) + "\\n")
    if "--total-steps" in argv:  # config.json records the run length, as the scripts' do
        steps = int(argv[argv.index("--total-steps") + 1])
        (run_dir / "config.json").write_text(json.dumps({"args": {"total_steps": steps}}))
    print("fake training", env)
    if env == "fail":
        print("error: boom, the dataset is broken", file=sys.stderr)
        sys.exit(3)
    (run_dir / "checkpoint.pt").write_text("ckpt")
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 10, "score": 42.0}) + "\\n")
    if env == "stop":
        sys.exit(130)
    (run_dir / "summary.json").write_text(json.dumps({"updates_per_sec": 1.0}))
""")


@pytest.fixture
def fake_suite(tmp_path, monkeypatch):
    """Register suite 'fake' (envs ok, fail, ok2) running the fake script."""
    script = tmp_path / "fake_script.py"
    script.write_text(FAKE_SCRIPT)
    entries = tuple(suites.Entry(str(script), env, "v") for env in ("ok", "fail", "ok2"))
    monkeypatch.setitem(suites.SUITES, "fake", suites.Suite("fake", "fake runs", entries, 1))
    return tmp_path / "out"


def calls(job) -> list[list[str]]:
    return [json.loads(line) for line in (job.run_dir / "calls.jsonl").read_text().splitlines()]


def test_failed_run_is_reported_and_does_not_stop_the_others(fake_suite, capsys):
    rc = run.main(["--suite", "fake", "--out", str(fake_suite), "--no-report", "--jobs", "1"])
    out = capsys.readouterr().out
    assert rc == 1
    jobs = {j.entry.env: j for j in suites.suite_jobs("fake", fake_suite.resolve())}
    assert run_status(jobs["ok"].run_dir) == run_status(jobs["ok2"].run_dir) == "done"
    assert "FAILED fake/fake_script__v__fail/s0 (exit code 3)" in out
    assert "error: boom, the dataset is broken" in out  # the log tail is shown
    assert "2 ran, 0 skipped (finished before), 1 failed" in out
    assert read_json(jobs["ok"].run_dir / "job.json")["suite"] == "fake"
    invocation = read_json(fake_suite / "fake" / "suite.json")["invocations"][-1]
    assert (invocation["ok"], invocation["failed"]) == (2, 1)


def test_finished_runs_are_skipped_and_interrupted_ones_resumed(fake_suite, capsys):
    jobs = {j.entry.env: j for j in suites.suite_jobs("fake", fake_suite.resolve())}
    run.execute(jobs["ok"])  # finished before
    jobs["ok2"].run_dir.mkdir(parents=True)
    (jobs["ok2"].run_dir / "checkpoint.pt").write_text("interrupted")  # no summary.json
    assert [run_status(j.run_dir) for j in jobs.values()] == ["done", "new", "resume"]

    run.main(["--suite", "fake", "--out", str(fake_suite), "--no-report"])
    assert "3 runs (1 finished, 1 to resume, 1 new)" in capsys.readouterr().out
    assert len(calls(jobs["ok"])) == 1, "a finished run must not run again"
    (resumed,) = calls(jobs["ok2"])
    assert resumed[-2:] == ["--resume", str(jobs["ok2"].run_dir)]
    as_run = suites.suite_jobs("fake", fake_suite.resolve(), common_args=("--device", "auto"))
    assert resumed[:-2] == as_run[2].argv()  # the same arguments plus --resume
    assert "--resume" not in calls(jobs["fail"])[0]


def test_interrupted_run_fails_then_resumes(fake_suite):
    script = suites.SUITES["fake"].entries[0].script
    job = suites.Job("fake", suites.Entry(script, "stop", "v"), 0, fake_suite / "stop")
    first = run.execute(job)
    assert first.status == "failed" and first.returncode == 130
    assert run_status(job.run_dir) == "resume"
    second = run.execute(job)
    assert second.resumed and calls(job)[-1][-2:] == ["--resume", str(job.run_dir)]


def test_a_finished_run_the_suite_now_runs_longer_is_resumed(fake_suite):
    """A suite whose --total-steps grew resumes its finished runs (the script's resume grows
    them, tests/test_run_contract.py); the same or a shorter length leaves them done."""
    script = suites.SUITES["fake"].entries[0].script

    def job(steps: int) -> suites.Job:
        return suites.Job("fake", suites.Entry(script, "ok", "v", ("--total-steps", str(steps))),
                          0, fake_suite / "grow")

    assert run.execute(job(10)).status == "ok"
    assert [run_status(job(n).run_dir, job(n).argv()) for n in (5, 10, 20)] == [
        "done", "done", "resume"]
    assert run.execute(job(10)).status == "skipped"
    grown = run.execute(job(20))
    assert grown.status == "ok" and grown.resumed
    assert calls(job(20))[-1] == job(20).argv(resume=True)
    assert run_status(job(20).run_dir, job(20).argv()) == "done"


def test_the_length_flags_are_the_scripts_run_lengths():
    """common.LENGTH_FLAGS names each script's LENGTH_FIELD (Part III), as its flag."""
    for script in ("cql_sac_continuous.py", "cql_qrdqn_atari.py", "calql_finetune.py"):
        (field,) = re.findall(r'^LENGTH_FIELD = "(\w+)"', (common.REPO / script).read_text(),
                              re.MULTILINE)
        assert common.LENGTH_FLAGS["--" + field.replace("_", "-")] == field, script


def test_submitit_local_executor(fake_suite):
    jobs = suites.suite_jobs("fake", fake_suite.resolve())
    args = Namespace(launcher="submitit-local", suite="fake", time_min=5, cpus_per_task=1,
                     gpus=0, jobs=2, partition=None, mem_gb=None, slurm_extra=[])
    executor = run.make_executor(args, fake_suite / ".submitit")
    seen = []
    results = run.run_submitit(jobs, executor, {}, seen.append, poll_s=0.2)
    status = {r.label.split("__")[-1]: r.status for r in results}
    assert status == {"ok/s0": "ok", "fail/s0": "failed", "ok2/s0": "ok"} and len(seen) == 3
    failed = next(r for r in results if r.status == "failed")
    assert failed.returncode == 3 and "boom" in failed.log_tail
    assert all(r.score == 42.0 for r in results if r.status == "ok")
    # the submitit task pickles without its subprocess handle and requeues itself
    task = run.SubmititTask(jobs[0])
    task._proc = object()
    assert task.__getstate__()["_proc"] is None
    task._proc = None
    assert isinstance(task.checkpoint().function, run.SubmititTask)


def test_smoke_suite_end_to_end(tmp_path, capsys):
    """The README's offline main job: all three real scripts, then skip, then resume."""
    out = tmp_path / "bench"
    assert run.main(["--suite", "smoke", "--out", str(out), "--device", "cpu"]) == 0
    jobs = suites.suite_jobs("smoke", out.resolve())
    for job in jobs:
        assert run_status(job.run_dir) == "done", job.label
        rows = read_jsonl(job.run_dir / "metrics.jsonl")
        assert len(rows) >= 2 and job.entry.metric in rows[-1]
    text = (out / "smoke" / "smoke.md").read_text()
    for name in ("CQL-SAC", "CQL-QR-DQN", "Cal-QL"):
        assert f"**{name}" in text
    assert (out / "smoke" / "smoke_curves.png").exists()
    capsys.readouterr()
    # again: everything is skipped; without its summary, a run resumes from its checkpoint
    (jobs[0].run_dir / "summary.json").unlink()
    assert run.main(["--suite", "smoke", "--out", str(out), "--device", "cpu",
                     "--no-report"]) == 0
    text = capsys.readouterr().out
    assert "1 ran, 2 skipped" in text and f"{jobs[0].label} (resumed)" in text
    assert "3 runs (2 finished, 1 to resume, 0 new)" in text and "needs CPU" in text
    attempts = [line for line in (jobs[0].run_dir / "log.txt").read_text().splitlines()
                if line.startswith("=== ") and not line.startswith(common.EXIT_MARK)]
    assert len(attempts) == 2 and attempts[-1].endswith(f"--resume {jobs[0].run_dir}")
    assert run_status(jobs[0].run_dir) == "done"


def test_report_lists_failed_runs_with_their_reason_and_no_machine_paths(fake_suite):
    assert run.main(["--suite", "fake", "--out", str(fake_suite), "--jobs", "1"]) == 1
    log = (fake_suite / "fake" / "fake_script__v__fail" / "s0" / "log.txt").read_text()
    assert log.splitlines()[-1].startswith("=== exit code 3 after ")
    text = (fake_suite / "fake" / "fake.md").read_text()  # the file run.py's docstring names
    assert "**Runs that did not finish** (1 of 3;" in text
    assert "| `fake/fake_script__v__fail/s0` | 3 | error: boom, the dataset is broken |" in text
    assert ("Report: `python benchmark/report.py <run root> --suite fake --out "
            "<run root>/fake`") in text
    assert str(fake_suite.parent) not in text and str(Path.home()) not in text
    assert not re.search(r"(?<![\w.:/~<>-])/(?:[\w.+=@%-]+/)+", text), "an absolute path"
    invocation = read_json(fake_suite / "fake" / "suite.json")["invocations"][-1]
    assert invocation["failures"] == [dict(label="fake/fake_script__v__fail/s0", returncode=3,
                                           reason="error: boom, the dataset is broken")]


def test_failure_reason_and_exit_code_from_a_log():
    log = ("=== 2026-01-01 00:00:00 python a.py\nerror: first attempt\n=== exit code 1 after 2s\n"
           "=== 2026-01-01 00:01:00 python a.py --resume x\nstep 10\nTraceback (most recent "
           "call last):\n  File x\nValueError: bad shape\n=== exit code 1 after 3s\n")
    assert common.failure_reason(log) == "ValueError: bad shape"  # the last attempt's
    assert common.exit_code(log) == 1
    assert common.exit_code(log + "=== 2026-01-01 00:02:00 python a.py\n") is None  # killed
    assert common.failure_reason("=== x\nstep 1\nstep 2\n") == "step 2"
    assert common.scrub(f"{common.REPO}/a.py --run-dir /tmp/r/demo/s0 https://x.org/a/b",
                        "/tmp/r") == "./a.py --run-dir <run root>/demo/s0 https://x.org/a/b"
