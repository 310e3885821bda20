"""The run contract (issue 10), one module for the three scripts, driven through their command
lines (`python SCRIPT ...` and `main(parse_args(argv))`) on the local datasets: the run files,
signals and bit-identical resume, hard kills, refused resumes, extension of a finished run,
the divergence stop and one-line errors for bad input. The scripts and their tiny runs are
the table `SCRIPTS` in conftest.py.

Replaces (the old per-script tests, now removed; what they checked beyond the contract stays
in the per-script test files):
- test_cql_sac_run.py: test_run_directory_contract -> test_run_files;
  test_sigterm_then_resume_matches_an_uninterrupted_run -> test_sigterm_on_the_command_line_
  then_resume_is_bit_identical; test_resume_after_a_hard_kill_continues_from_the_last_
  checkpoint -> test_sigkill_then_resume_loses_and_repeats_no_row (the stale row) and
  test_a_finished_run_is_extended_from_its_last_step (final return of the longer run);
  test_resume_with_a_different_config_is_refused -> test_resume_with_changed_arguments_is_
  refused + test_common_bad_inputs[resume-missing-dir]; test_divergence_stops_with_step_and_
  last_checkpoint -> test_divergence_names_the_step_and_the_last_good_checkpoint;
  write_dataset, BAD_INPUTS, test_bad_inputs_give_one_line_errors -> conftest.write_dataset,
  conftest.BAD_INPUTS["cql_sac"], test_script_bad_inputs.
- test_calql_run.py: test_sigterm_across_the_offline_online_boundary_then_resume_is_bit_
  identical -> test_signal_stops_then_resume_is_bit_identical[calql] (stops offline at step
  45, then online at a trajectory's end: phase, env_steps and the online buffer's size in
  the checkpoint; `pending_updates` is gone with the catch-up loop);
  test_a_finished_run_can_be_extended_but_not_changed ->
  test_a_finished_run_is_extended_from_its_last_step[calql] (online_steps 0 -> 200; summary
  env_steps 0 first; offline score kept: the rows and summary equal the uninterrupted run's)
  + test_resume_with_changed_arguments_is_refused; write_dataset, BAD_INPUTS, bad_root,
  test_bad_inputs_give_one_line_errors, test_bad_inputs_on_the_command_line_exit_non_zero ->
  conftest.write_dataset, conftest.BAD_INPUTS["calql"], conftest.bad_root,
  test_script_bad_inputs (the two command-line cases are "cli" there).
- test_qrdqn_run.py: test_cartpole_run_writes_the_run_directory -> test_run_files[qrdqn]
  (config, rows, scores, summary, checkpoint step, no .tmp); test_resume_gives_identical_
  numbers -> test_a_finished_run_is_extended_from_its_last_step[qrdqn] (rows, final return,
  the agent's tensors); test_resume_refuses_different_arguments -> test_resume_with_changed_
  arguments_is_refused + test_a_finished_run_is_extended_from_its_last_step (a free field
  changed on resume); test_sigint_saves_checkpoint_and_resume_continues_identically ->
  test_signal_stops_then_resume_is_bit_identical (SIGINT) + test_sigterm_on_the_command_
  line_then_resume_is_bit_identical; test_unknown_env_lists_valid_names, test_continuous_
  dataset_points_to_sac_script, test_missing_replay_dir_and_unknown_game, test_missing_local_
  dataset_says_how_to_build, test_missing_atari_dataset_without_network, test_nan_in_data_is_
  refused -> test_script_bad_inputs[qrdqn-*]; test_divergence_names_step_and_last_checkpoint
  -> test_divergence_names_the_step_and_the_last_good_checkpoint[qrdqn].
"""

import os
import re
import shutil
import signal
import time
from pathlib import Path

import minari
import pytest
import torch
from conftest import (
    BAD_INPUTS,
    SCRIPTS,
    TIMING_KEYS,
    Script,
    error_of,
    one_line_error,
    read_json,
    read_metrics,
    run_script,
    start_script,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PARAMS = pytest.mark.parametrize("s", list(SCRIPTS.values()), ids=list(SCRIPTS))


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    """`reference(s) -> run_dir`: the uninterrupted tiny run of each script, run once."""
    done: dict[str, Path] = {}

    def reference(s: Script) -> Path:
        if s.key not in done:
            run = tmp_path_factory.mktemp(f"reference-{s.key}") / "run"
            summary = main(s, s.args(run))
            assert read_json(run / "summary.json") == summary
            done[s.key] = run
        return done[s.key]

    return reference


@pytest.fixture
def reference(references, local_dataset, s):
    local_dataset(s.dataset)
    return references(s)


def main(s: Script, argv: list[str]) -> dict:
    return s.module.main(s.module.parse_args(argv))


def same_results(run: Path, ref: Path) -> None:
    """Bit-identical evaluation rows (training metrics included) and summary, but timing."""
    rows, ref_rows = read_metrics(run), read_metrics(ref)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for a, b in zip(rows, ref_rows, strict=True):
        assert a == b
    summary, ref_summary = read_json(run / "summary.json"), read_json(ref / "summary.json")
    assert {k: v for k, v in summary.items() if k not in TIMING_KEYS} == \
        {k: v for k, v in ref_summary.items() if k not in TIMING_KEYS}
    agent, ref_agent = (checkpoint(d)["parts"]["agent"] for d in (run, ref))
    assert agent.keys() == ref_agent.keys()
    for key, value in agent.items():
        assert torch.equal(value, ref_agent[key]), key


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)


def wait_for_rows(run: Path, n: int, proc, timeout: float = 240) -> None:
    """Until metrics.jsonl holds n rows and a checkpoint is written (the run is past its
    n-th evaluation: a kill between the row and its checkpoint leaves no run to resume)."""
    deadline = time.time() + timeout
    path = run / "metrics.jsonl"
    while not (path.exists() and len(path.read_text().splitlines()) >= n
               and (run / "checkpoint.pt").exists()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no evaluation row in time"
        time.sleep(0.05)


def rows_before_stop(s: Script) -> int:
    """Rows written once the run is past its first evaluation after an update."""
    return 2 if s.first_steps[0] == 0 else 1


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- run files
@PARAMS
def test_run_files(s, reference):
    """config.json, metrics.jsonl, checkpoint.pt and summary.json: valid JSON, complete,
    consistent with each other (metrics.jsonl = the checkpoint's history)."""
    config = read_json(reference / "config.json")
    assert {"args", "dataset", "eval_env"} <= config.keys()
    assert {"id", "max_episode_steps", "kwargs"} <= config["eval_env"].keys()
    for dotted, want in s.config.items():
        section, key = dotted.split(".")
        assert config[section][key] == want, dotted
    assert config["args"][s.steps.lstrip("-").replace("-", "_")] == int(s.schedule[s.steps])
    rows = read_metrics(reference)
    steps = [r["step"] for r in rows]
    assert steps[:len(s.first_steps)] == list(s.first_steps) and steps == sorted(set(steps))
    for row in rows:
        for key in s.finite if row["step"] else ():
            assert row[key] is not None and abs(row[key]) < float("inf"), key
    state = checkpoint(reference)
    assert state["step"] == steps[-1] and state["history"] == rows
    assert not list(reference.glob("*.tmp"))
    summary = read_json(reference / "summary.json")
    assert summary["updates_per_sec"] > 0 and summary["wall_time_s"] > 0
    for key, row_key in s.summary_of_last_row.items():
        assert summary[key] == rows[-1][row_key], key
    if s.length == "--total-steps":
        assert summary["total_steps"] == steps[-1]
    if s.key == "qrdqn":  # CartPole: 1 per step, at most 500 steps; random play ~22
        assert 9 < rows[-1]["return_mean"] <= 500
    if s.scored:
        meta = minari.load_dataset(config["dataset"]["dataset_id"]).storage.metadata
        lo, hi = meta["ref_min_score"], meta["ref_max_score"]
        assert config["dataset"].get("ref_min_score", lo) == lo
        assert config["dataset"].get("ref_max_score", hi) == hi
        assert rows[-1]["normalized_score"] == pytest.approx(
            100 * (rows[-1]["return_mean"] - lo) / (hi - lo))


# ---------------------------------------------------------------- signals, kills, resume
@PARAMS
def test_sigterm_on_the_command_line_then_resume_is_bit_identical(s, reference, tmp_path):
    run = tmp_path / "run"
    proc = start_script(s.path, *s.args(run))
    wait_for_rows(run, rows_before_stop(s), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert f"--resume {run}" in err and "Traceback" not in err, err[-3000:]
    assert not (run / "summary.json").exists(), "the run ended before the signal"
    assert len(read_metrics(run)) < len(read_metrics(reference))
    first_session_s = checkpoint(run)["timing"]["wall_s"]
    resumed = run_script(s.path, *s.args(run, "--resume", str(run)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_results(run, reference)
    assert read_json(run / "summary.json")["wall_time_s"] > first_session_s  # accumulates


@PARAMS
def test_signal_stops_then_resume_is_bit_identical(s, reference, tmp_path, monkeypatch,
                                                   capsys):
    """SIGINT arrives during the n-th update of a session (a fixed place, in this process):
    checkpoint, exit 128+2, the resume command; each session's resume continues from its
    checkpoint, and the finished run equals the uninterrupted one (Cal-QL: the first
    session stops offline, the second online, across the phase boundary)."""
    run, step = tmp_path / "run", s.module.Trainer.step
    stopped_at = 0
    for n, at in s.signal_stops:
        calls = []

        def interrupted(self, batch, n=n, calls=calls):
            calls.append(1)
            if len(calls) == n:  # as if Ctrl-C arrived during this update
                os.kill(os.getpid(), signal.SIGINT)
            return step(self, batch)

        monkeypatch.setattr(s.module.Trainer, "step", interrupted)
        resume = ("--resume", str(run)) if stopped_at else ()
        with pytest.raises(SystemExit) as exc:
            main(s, s.args(run, *resume))
        assert exc.value.code == 128 + signal.SIGINT
        assert f"--resume {run}" in capsys.readouterr().err
        state = checkpoint(run)
        assert state["step"] == at if at is not None else state["step"] >= stopped_at + n
        stopped_at = state["step"]
        if s.key == "calql":  # offline first, then online with the online buffer's contents
            loop, online = state["parts"]["loop"], state["parts"]["online"]
            assert loop["phase"] == ("offline" if at == 45 else "online")
            assert (loop["env_steps"] > 0) == (loop["phase"] == "online")
            assert online["size"] == loop["env_steps"]
        rows = read_metrics(run)
        assert rows == read_metrics(reference)[:len(rows)]
    monkeypatch.setattr(s.module.Trainer, "step", step)
    main(s, s.args(run, "--resume", str(run)))
    same_results(run, reference)


@PARAMS
def test_sigkill_then_resume_loses_and_repeats_no_row(s, reference, tmp_path):
    """A hard kill after at least one evaluation, plus a row written after the last
    checkpoint (as a kill between the two writes leaves it): the resume rebuilds
    metrics.jsonl from the checkpoint and finishes with the uninterrupted run's rows."""
    run = tmp_path / "run"
    proc = start_script(s.path, *s.args(run))
    wait_for_rows(run, rows_before_stop(s), proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists(), "the run ended before the kill"
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + ("" if text.endswith("\n") else "\n")
                                       + '{"step": 1000000000, "stale": true}\n')
    main(s, s.args(run, "--resume", str(run)))
    same_results(run, reference)


@PARAMS
def test_a_finished_run_is_extended_from_its_last_step(s, reference, tmp_path):
    """A finished run resumed with a larger length continues from its last step to the
    uninterrupted longer run's numbers; a free field (--log-every) may change."""
    run = tmp_path / "run"
    short = main(s, s.args(run, s.length, s.short))
    rows = read_metrics(run)
    assert rows == read_metrics(reference)[:len(rows)] and len(rows) < len(
        read_metrics(reference))
    if s.key == "calql":
        assert short["env_steps"] == 0
    main(s, s.args(run, "--resume", str(run), "--log-every", "50"))
    same_results(run, reference)


@PARAMS
def test_resume_with_changed_arguments_is_refused(s, reference, tmp_path):
    run = copy_run(reference, tmp_path / "run")
    saved = read_json(run / "config.json")["args"]
    message = error_of(s.module, s.args(run, "--resume", str(run), "--cql-weight", "7.5",
                                        "--qf-lr", "0.5"))
    assert f"cql_weight: {saved['cql_weight']!r} -> 7.5" in message
    assert f"qf_lr: {saved['qf_lr']!r} -> 0.5" in message
    assert read_metrics(run) == read_metrics(reference)  # untouched


# ------------------------------------------------------------------------- divergence
@PARAMS
def test_divergence_names_the_step_and_the_last_good_checkpoint(s, local_dataset, tmp_path,
                                                                monkeypatch):
    """NaN rewards from the 41st update on: stopped at the next training-metrics read
    (step 50), naming the checkpoint of the evaluation at step 30, which is kept."""
    local_dataset(s.dataset)
    step, calls = s.module.Trainer.step, []

    def poisoned(self, batch):
        calls.append(1)
        if len(calls) > 40:
            batch = {**batch, "rewards": batch["rewards"] * float("nan")}
        return step(self, batch)

    monkeypatch.setattr(s.module.Trainer, "step", poisoned)
    run = tmp_path / "run"
    message = error_of(s.module, s.args(run, s.steps, "90", s.eval_every, "30", *s.no_online))
    assert "training diverged at step 50 (" in message and "non-finite" in message
    assert f"last good checkpoint is {run / 'checkpoint.pt'} (step 30)" in message
    assert checkpoint(run)["step"] == 30


# ------------------------------------------------------------------ one-line errors
COMMON = ("negative-steps", "zero-eval-episodes", "run-dir-is-a-file", "unknown-env",
          "resume-empty-dir", "resume-missing-dir", "truncated-checkpoint", "max-abs-q")


def common_case(s: Script, case: str, tmp: Path, reference: Path) -> tuple:
    """(command line, what its one-line error says) of a bad input every script refuses;
    --max-abs-q: the first training metrics read (step 25) comes before any checkpoint but
    Cal-QL's, of its evaluation at step 0."""
    run = tmp / "run"
    if case == "negative-steps":
        return s.args(run, s.steps, "-5"), s.steps
    if case == "zero-eval-episodes":
        return s.args(run, "--eval-episodes", "0"), "--eval-episodes"
    if case == "run-dir-is-a-file":
        run.write_text("not a directory")
        return s.args(run), f"--run-dir {run} is a file"
    if case == "unknown-env":
        return s.args(run, "--env", "nonsense-env"), "unknown --env 'nonsense-env'"
    if case == "resume-empty-dir":
        run.mkdir()
        return s.args(run, "--resume", str(run)), "no checkpoint.pt"
    if case == "resume-missing-dir":
        return s.args(run, "--resume", str(tmp / "nothing-here")), "no checkpoint"
    if case == "truncated-checkpoint":
        ckpt = copy_run(reference, run) / "checkpoint.pt"
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        return s.args(run, "--resume", str(run)), str(ckpt)
    assert case == "max-abs-q"
    kept = (f"the last good checkpoint is {run / 'checkpoint.pt'} (step 0)"
            if s.first_steps[0] == 0 else "no checkpoint was written")
    return s.args(run, "--max-abs-q", "1e-9"), "training diverged at step 25 (|Q| ", kept


@PARAMS
@pytest.mark.parametrize("case", COMMON)
def test_common_bad_inputs_give_one_line_errors(s, case, reference, tmp_path):
    argv, *says = common_case(s, case, tmp_path, reference)
    message = error_of(s.module, argv)
    assert all(part in message for part in says), (says, message)


@PARAMS
@pytest.mark.parametrize("case", ["negative-steps", "unknown-env"])
def test_bad_inputs_on_the_command_line_exit_1(s, case, reference, tmp_path):
    argv, says = common_case(s, case, tmp_path, reference)
    proc = run_script(s.path, *argv)
    assert proc.returncode == 1 and says in one_line_error(proc.stderr)


@pytest.mark.parametrize("s, case", [(SCRIPTS[k], c) for k, cases in BAD_INPUTS.items()
                                     for c in cases],
                         ids=[f"{k}-{c}" for k, cases in BAD_INPUTS.items() for c in cases])
def test_script_bad_inputs(s, case, bad_root, tmp_path, monkeypatch):
    """Each script's own bad inputs (conftest.BAD_INPUTS), on hand-made datasets, offline."""
    flags, says, how = BAD_INPUTS[s.key][case]
    if case == "no-cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    (tmp_path / "empty").mkdir()
    flags = [f.replace("{tmp}", str(tmp_path / "empty")) for f in flags]
    tiny = s.argv[2:] if {"--env", "--dataset-id"} & set(flags) else s.argv  # no preset --env
    argv = [*flags, *tiny, "--run-dir", str(tmp_path / "run")]
    offline = {"MINARI_DATASETS_PATH": str(bad_root), "HF_HUB_OFFLINE": "1"}
    if how == "cli":
        proc = run_script(s.path, *argv, env=offline)
        assert proc.returncode == 1
        message = one_line_error(proc.stderr)
    else:
        for key, value in offline.items():
            monkeypatch.setenv(key, value)
        message = error_of(s.module, argv)
    for want in says:
        assert (want.search(message) if isinstance(want, re.Pattern) else want in message), \
            (want, message)
