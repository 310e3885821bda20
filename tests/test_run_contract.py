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

import contextlib
import dataclasses
import errno
import importlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import minari
import pytest
import torch
from conftest import (
    BAD_INPUTS,
    OLD_ROW_KEYS,
    OLD_SUMMARY_KEYS,
    ROOT,
    ROW_KEYS,
    SCRIPTS,
    SUMMARY_KEYS,
    TIMING_KEYS,
    Script,
    error_of,
    fresh_python,
    help_default,
    help_entries,
    one_line_error,
    read_json,
    read_metrics,
    run_script,
    script_env,
    start_script,
    untimed,
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
    rows, ref_rows = untimed(read_metrics(run)), untimed(read_metrics(ref))
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
        assert rows[-1]["score"] == pytest.approx(
            100 * (rows[-1]["return_mean"] - lo) / (hi - lo))


def reward_scale(config: dict) -> float:
    """The factor the run's rewards were trained at (QR-DQN: none, 1)."""
    args = config["args"]
    return 1.0 if args.get("reward_mode") == "none" else args.get("reward_scale", 1.0)


def test_the_three_scripts_write_one_set_of_keys(references, local_dataset):
    """One set of run-file keys (docs/run_files.md, issue 22 item 4): the metrics rows of the
    three scripts share exactly ROW_KEYS (besides them: Cal-QL's phase and env_steps, each
    script's training metrics, QR-DQN's episode returns), their summaries SUMMARY_KEYS, none
    the keys these replaced; value_gap_return is value_gap over the reward scale (return
    units), and wall_time_s grows from row to row."""
    rows, summaries = {}, {}
    for s in SCRIPTS.values():
        local_dataset(s.dataset)
        run = references(s)
        rows[s.key], summaries[s.key] = read_metrics(run), read_json(run / "summary.json")
        scale, summary = reward_scale(read_json(run / "config.json")), summaries[s.key]
        for row in rows[s.key]:
            assert row.keys() >= ROW_KEYS and not OLD_ROW_KEYS & row.keys(), (s.key, row)
            assert row["value_gap_return"] == pytest.approx(row["value_gap"] / scale)
        times = [r["wall_time_s"] for r in rows[s.key]]
        assert all(0 < a < b for a, b in pairwise(times)), times
        assert times[-1] <= summary["wall_time_s"]
        assert summary.keys() >= SUMMARY_KEYS and not OLD_SUMMARY_KEYS & summary.keys()
        assert summary["value_gap_return"] == pytest.approx(summary["value_gap"] / scale)
    assert reward_scale(read_json(references(SCRIPTS["cql_sac"]) / "config.json")) == 0.1
    assert set(rows["calql"][0]) == ROW_KEYS | {"phase", "env_steps"}  # step 0: no training
    assert set.intersection(*(set(r) for rs in rows.values() for r in rs)) == ROW_KEYS
    assert set.intersection(*(set(v) for v in summaries.values())) == SUMMARY_KEYS
    assert rows["qrdqn"][-1]["success_rate"] is None
    assert summaries["qrdqn"]["final_success_rate"] is None


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
    times = [r["wall_time_s"] for r in read_metrics(run)]  # the rows' too, session to session
    assert all(a < b for a, b in pairwise(times)) and times[-1] > first_session_s


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
        rows = untimed(read_metrics(run))
        assert rows == untimed(read_metrics(reference))[:len(rows)]
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
    rows = untimed(read_metrics(run))
    assert rows == untimed(read_metrics(reference))[:len(rows)] and len(rows) < len(
        read_metrics(reference))
    if s.key == "calql":
        assert short["env_steps"] == 0
    main(s, s.args(run, "--resume", str(run), "--log-every", "50"))
    same_results(run, reference)
    field = s.length.lstrip("-").replace("-", "_")
    assert field == s.module.LENGTH_FIELD
    assert read_json(run / "config.json")["args"][field] == int(s.schedule[s.length])
    message = error_of(s.module, s.args(run, "--resume", str(run), s.length, s.short))
    assert f"{s.length} {s.short} is shorter than the run's {s.schedule[s.length]}" in message


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


@PARAMS
def test_a_datasets_path_that_cannot_be_created_is_named(s, tmp_path, monkeypatch):
    """MINARI_DATASETS_PATH below a file: one line naming it (was an OSError traceback)."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "file" / "datasets"))
    message = error_of(s.module, s.args(tmp_path / "run"))
    assert f"MINARI_DATASETS_PATH {tmp_path / 'file' / 'datasets'} cannot be created" in message


@PARAMS
def test_a_read_only_datasets_path_is_named(s, tmp_path, monkeypatch):
    """MINARI_DATASETS_PATH in a read-only folder (simulated: this machine runs as root, whom
    permissions do not bind): one line naming it and the reason."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "ro" / "datasets"))
    mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if "ro" in self.parts:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    message = error_of(s.module, s.args(tmp_path / "run"))
    assert f"MINARI_DATASETS_PATH {tmp_path / 'ro' / 'datasets'} cannot be created " \
           "(Permission denied)" in message


@pytest.mark.parametrize("s", [SCRIPTS["cql_sac"], SCRIPTS["calql"]], ids=["cql_sac", "calql"])
def test_a_zero_step_episode_is_skipped(s, bad_root, monkeypatch):
    """One zero-step episode among good ones is skipped (was `cannot reshape array of size
    0`): the other episode's 10 transitions load."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(bad_root))
    args = s.module.parse_args(["--dataset-id", "test/pendulum/one-empty-v0", "--no-progress"])
    assert s.module.load_data(args).info["transitions"] == 10


# ------------------------------------------------ the run's own bad input (issue 19)
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json")


def run_files(run: Path) -> dict[str, bytes]:
    """The bytes of the run files in `run`: an error must leave them as they were."""
    return {n: (run / n).read_bytes() for n in RUN_FILES if (run / n).exists()}


def refuse_loading(*_args, **_kwargs):
    raise AssertionError("the data was loaded before the check")


def one_line_stop(call) -> str:
    """call() must stop with a one-line error (SystemExit with the message)."""
    with pytest.raises(SystemExit) as exc:
        call()
    assert isinstance(exc.value.code, str) and "\n" not in exc.value.code, exc.value.code
    return one_line_error(exc.value.code)


@PARAMS
@pytest.mark.parametrize("device", ["nonsense", "meta", "cuda:0"])
def test_a_device_outside_auto_cpu_cuda_is_refused_before_loading(s, device, tmp_path,
                                                                  monkeypatch):
    """main() itself refuses it (pick_device) before the data loads, nothing written."""
    monkeypatch.setattr(s.module, "load_data", refuse_loading)
    args = replace(s.module.parse_args(s.args(tmp_path / "run")), device=device)
    message = one_line_stop(lambda: s.module.main(args))
    assert f"--device {device!r} is not one of auto, cpu, cuda; use --device " in message
    if device == "cuda:0":
        assert "CUDA_VISIBLE_DEVICES=0" in message
    assert not (tmp_path / "run").exists()


@PARAMS
@pytest.mark.parametrize("seed", ["-2", str(2**64), str(2**31)])
def test_a_seed_outside_0_to_2_31_is_refused(s, seed, local_dataset, tmp_path):
    """On the command line before any data loads (no dataset at all here); through main()
    (2**31) at the latest when the run starts. Nothing is written."""
    run = tmp_path / "run"
    if seed == str(2**31):
        local_dataset(s.dataset)
        message = error_of(s.module, s.args(run, "--seed", seed))
    else:
        (tmp_path / "no-datasets").mkdir()
        proc = run_script(s.path, *s.args(run, "--seed", seed),
                          env={"MINARI_DATASETS_PATH": str(tmp_path / "no-datasets")})
        assert proc.returncode == 1, proc.stderr[-3000:]
        message = one_line_error(proc.stderr)
    assert f"--seed {seed} is outside [0, 2**31)" in message
    assert not run.exists()


DAMAGED_CONFIG = {"empty": b"", "empty-object": b"{}", "binary": bytes(range(256)),
                  "no-args": b'{"args": 3}', "truncated": None}


@PARAMS
@pytest.mark.parametrize("damage", list(DAMAGED_CONFIG))
def test_a_resume_with_a_damaged_config_names_it_and_keeps_the_run(s, damage, reference,
                                                                   tmp_path):
    run = copy_run(reference, tmp_path / "run")
    config = run / "config.json"
    text = config.read_bytes()
    config.write_bytes(DAMAGED_CONFIG[damage] if damage != "truncated" else text[:len(text) // 2])
    before = run_files(run)
    message = error_of(s.module, s.args(run, "--resume", str(run)))
    assert f"{config} is damaged (" in message and "kept as they are" in message, message
    assert run_files(run) == before


@PARAMS
@pytest.mark.parametrize("case", ["other-script-dir", "other-script-checkpoint",
                                  "other-seed-checkpoint"])
def test_a_resume_of_another_run_names_what_made_it(s, case, references, local_dataset,
                                                    tmp_path):
    """Another script's run directory or checkpoint, or a checkpoint of the same script
    with another seed: refused, naming the script (or the argument), nothing changed."""
    other = next(o for o in SCRIPTS.values() if o.key != s.key)
    for script in (s, other):
        local_dataset(script.dataset)
    run = copy_run(references(other if case == "other-script-dir" else s), tmp_path / "run")
    if case == "other-script-dir":
        says = f"is a run of {other.file}, not of {s.file}; continue it with python {other.file}"
    elif case == "other-script-checkpoint":
        shutil.copy(references(other) / "checkpoint.pt", run / "checkpoint.pt")
        says = f"was written by {other.file}, not {s.file}"
    else:
        state = checkpoint(run)
        state["args"]["seed"] = 1
        torch.save(state, run / "checkpoint.pt")
        says = f"was made by another run of {s.file} (seed: 1 -> 0); nothing was changed"
    before = run_files(run)
    message = error_of(s.module, s.args(run, "--resume", str(run)))
    assert says in message, message
    assert len(message) < 300, message
    assert run_files(run) == before


def read_only(directory: Path, monkeypatch) -> None:
    """chmod 555; as root (which writes anyway) os.open answers as the kernel does a user."""
    directory.chmod(0o555)
    if os.geteuid() != 0:
        return
    real = os.open

    def refuse(path, flags, *args, **kwargs):
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writes and Path(os.fsdecode(path)).absolute().is_relative_to(directory):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)


@PARAMS
@pytest.mark.parametrize("case", ["below-a-file", "read-only-new", "read-only-resume"])
def test_a_run_dir_that_cannot_be_written_fails_up_front(s, case, reference, tmp_path,
                                                         monkeypatch):
    """Before any data loads (the command line's check_run_args; below a file: the command
    line itself, with no dataset at all), with the path; nothing written."""
    if case == "below-a-file":
        (tmp_path / "file").write_text("a file")
        (tmp_path / "no-datasets").mkdir()
        run = tmp_path / "file" / "run"
        proc = run_script(s.path, *s.args(run),
                          env={"MINARI_DATASETS_PATH": str(tmp_path / "no-datasets")})
        assert proc.returncode == 1, proc.stderr[-3000:]
        message = one_line_error(proc.stderr)
        assert f"--run-dir {run} cannot be created: {tmp_path / 'file'} is a file" in message
        return
    if case == "read-only-new":
        (tmp_path / "ro").mkdir()
        run, argv, there = tmp_path / "ro" / "run", s.args(tmp_path / "ro" / "run"), tmp_path / "ro"
    else:
        run = there = copy_run(reference, tmp_path / "run")
        argv = s.args(run, "--resume", str(run))
    before = run_files(run) if run.exists() else {}
    read_only(there, monkeypatch)
    try:
        monkeypatch.setattr(s.module, "load_data", refuse_loading)
        message = one_line_stop(lambda: s.module.check_run_args(s.module.parse_args(argv)))
        assert f"--run-dir {run} cannot be written ({there}: Permission denied)" in message
        assert (run_files(run) if run.exists() else {}) == before
    finally:
        there.chmod(0o755)


@PARAMS
@pytest.mark.parametrize("target", ["checkpoint.pt", "summary.json"])
def test_a_failed_write_leaves_no_temp_file_and_names_the_intact_checkpoint(
        s, target, reference, tmp_path, monkeypatch):
    """A full disk at the second checkpoint (or the summary): the temp file is removed, the
    error names the checkpoint that is intact, the rows match it, and a resume finishes
    as the uninterrupted run."""
    run, real, calls = tmp_path / "run", os.replace, []

    def disk_full(src, dst):
        if Path(dst).name == target:
            calls.append(dst)
            if target == "summary.json" or len(calls) == 2:
                assert Path(src).exists()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", disk_full)
    message = error_of(s.module, s.args(run))
    ref_rows = untimed(read_metrics(reference))
    kept = ref_rows[0 if target == "checkpoint.pt" else -1]["step"]
    assert f"could not write {run / target} (No space left on device)" in message, message
    assert f"the checkpoint of step {kept} ({run / 'checkpoint.pt'}) is intact" in message
    assert not list(run.glob("*.tmp"))
    assert checkpoint(run)["step"] == kept
    assert untimed(read_metrics(run)) == ref_rows[:len(checkpoint(run)["history"])]
    monkeypatch.setattr(os, "replace", real)
    main(s, s.args(run, "--resume", str(run)))
    same_results(run, reference)


@PARAMS
def test_a_second_process_on_a_run_dir_refuses_with_the_first_ones_pid(s, reference,
                                                                       tmp_path):
    run = tmp_path / "run"
    first = start_script(s.path, *s.args(run, s.length, "100000"))  # still running below
    try:
        wait_for_rows(run, 1, first)
        for extra in ((), ("--resume", str(run))):
            second = run_script(s.path, *s.args(run, *extra))
            assert second.returncode == 1, second.stderr[-3000:]
            assert f"{run} is in use by another process (PID {first.pid}, holding " \
                f"{run / 'run.lock'})" in one_line_error(second.stderr)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    rows, ref_rows = untimed(read_metrics(run)), untimed(read_metrics(reference))
    n = min(len(rows), len(ref_rows))
    assert rows[:n] == ref_rows[:n]  # no row twice, none of another run
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})


@PARAMS
@pytest.mark.parametrize("name", RUN_FILES)
def test_a_new_run_refuses_a_directory_holding_any_run_file(s, name, reference, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(reference / name, run / name)
    before = run_files(run)
    message = error_of(s.module, s.args(run, "--seed", "3"))
    assert f"{run} " in message and f"({name})" in message, message
    assert ("continue it with --resume" if name == "checkpoint.pt" else
            "no checkpoint to resume") in message
    assert run_files(run) == before


@PARAMS
def test_a_start_that_stopped_before_its_first_checkpoint_may_run_again(s, reference,
                                                                        tmp_path):
    """config.json of the same command and no row (a start killed early): nothing to lose,
    so the same command runs (the benchmark runner's retry of a new job)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(reference / "config.json", run / "config.json")
    (run / "metrics.jsonl").write_text("")
    main(s, s.args(run))
    same_results(run, reference)


@PARAMS
def test_track_makes_a_run_id_that_wandb_accepts(s, local_dataset, tmp_path, monkeypatch):
    """The directory name holds every character W&B refuses in a run id (and a space)."""
    from wandb.sdk.wandb_settings import Settings

    local_dataset(s.dataset)
    name = "run:a;b,c#d?e'f g"
    with pytest.raises(Exception, match="Run ID cannot contain"):
        Settings(run_id=name)
    inits = []

    def init(**kwargs):
        inits.append(kwargs)
        Settings(run_id=kwargs["id"])  # W&B's own check
        return types.SimpleNamespace(log=lambda *a, **k: None, summary={}, finish=lambda: None)

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    main(s, s.args(tmp_path / name, "--track", s.steps, "30", s.eval_every, "30",
                   *s.no_online))
    assert [i["id"] for i in inits] == ["run-a-b-c-d-e-f-g"]
    assert inits[0]["name"] == name


@PARAMS
def test_signals_during_the_stop_change_nothing_exit_is_128_plus_the_first(s, reference,
                                                                           tmp_path):
    """SIGTERM, then SIGINT every 2 ms until the process ends (through its stop and its
    exit): exit 143, one stop message, no traceback, and the resume is bit-identical."""
    run = tmp_path / "run"
    proc = start_script(s.path, *s.args(run))
    wait_for_rows(run, rows_before_stop(s), proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # handled (signals pending together are handled in number order)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        time.sleep(0.002)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and err.count("stopped by signal 15") == 1, err[-3000:]
    resumed = run_script(s.path, *s.args(run, "--resume", str(run)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_results(run, reference)


@PARAMS
def test_ctrl_c_during_start_up_exits_130_with_one_line(s, tmp_path):
    """SIGINT while the data loads (before Run takes the signals over): exit 130, one line,
    no run directory."""
    run = tmp_path / "run"
    code = (f"import os, signal, sys, time\nsys.path.insert(0, {str(ROOT)!r})\n"
            f"sys.argv = {[s.file, *s.args(run)]!r}\nimport {Path(s.file).stem} as m\n"
            "def load(*args, **kwargs):\n    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(30)\n    raise AssertionError('the signal did not stop it')\n"
            "m.load_data = load\nm.cli()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=script_env())
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-3000:]
    assert "stopped by signal 2 during start-up" in one_line_error(proc.stderr)
    assert not run.exists()


@PARAMS
def test_random_signal_stops_then_resume_is_bit_identical(s, reference, tmp_path,
                                                          monkeypatch, capsys):
    """Three sessions, each stopped by SIGINT or SIGTERM during a random update (seeded):
    the rows always a prefix of the uninterrupted run's, the finished run equal to it."""
    rng = random.Random(f"issue-19-{s.key}")
    run, step = tmp_path / "run", s.module.Trainer.step
    for session in range(3):
        n, sig, calls = rng.randint(1, 60), rng.choice((signal.SIGINT, signal.SIGTERM)), []

        def interrupted(self, batch, n=n, sig=sig, calls=calls):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), sig)
            return step(self, batch)

        monkeypatch.setattr(s.module.Trainer, "step", interrupted)
        with pytest.raises(SystemExit) as exc:
            main(s, s.args(run, *(("--resume", str(run)) if session else ())))
        assert exc.value.code == 128 + sig, (session, n, sig)
        rows = untimed(read_metrics(run))
        assert rows == untimed(read_metrics(reference))[:len(rows)]
    monkeypatch.setattr(s.module.Trainer, "step", step)
    main(s, s.args(run, "--resume", str(run)))
    same_results(run, reference)


# --------------------------------------------------------------------------- start and end lines
@PARAMS
def test_a_run_says_where_it_runs_and_how_it_ended(s, local_dataset, tmp_path, capsys,
                                                  monkeypatch):
    """One start line (run directory, data, device, updates), and for a run longer than
    CPU_WARN_UPDATES on a CPU a warning and, after the first log, an estimate of its
    duration; one end line (final score, value gap, wall time, summary.json's path)."""
    local_dataset(s.dataset)
    monkeypatch.setattr(s.module, "CPU_WARN_UPDATES", 10)
    run = tmp_path / "run"
    args = s.module.parse_args(s.args(run, "--device", "cpu", "--log-every", "20"))
    summary = s.module.main(args)
    err = capsys.readouterr().err.splitlines()
    updates, dataset = s.module.planned_updates(args), read_json(run / "config.json")["dataset"]
    data = dataset.get("dataset_id") or dataset.get("source")
    assert f"{s.file}: new run {run} | data {data} | device cpu | {updates:,} updates" in err
    assert any(line.startswith(f"warning: {updates:,} updates is a paper-size run")
               for line in err)
    assert sum(line.startswith("estimate: ") and "hours to go" in line for line in err) == 1
    end = [line for line in err if line.startswith("done: ")]
    assert end == [end[0]] and end[0].endswith(f"| {run / 'summary.json'}")
    assert f"value gap {summary['value_gap']:.4g} |" in end[0]


@PARAMS
def test_config_records_the_command_the_commit_and_the_versions(s, local_dataset, tmp_path):
    """config.json of a command-line run: the exact command, the checkout's commit (with
    '+changes' for a modified tree), and the versions of Python and the packages."""
    local_dataset(s.dataset)
    argv = s.args(tmp_path / "run")
    out = run_script(s.path, *argv)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pull/220" not in out.stderr  # gymnasium-robotics' Adroit notice: not this env's
    config = read_json(tmp_path / "run" / "config.json")
    assert config["command"] == shlex.join(["python", s.file, *argv])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert config["git_commit"].split("+")[0] == head
    import numpy

    assert config["versions"]["torch"] == torch.__version__.split("+")[0]
    assert config["versions"]["numpy"] == numpy.__version__
    assert config["versions"]["python"] == sys.version.split()[0]


@PARAMS
@pytest.mark.parametrize("flag", [["--compile", "True"], ["--track=false"]])
def test_a_switch_given_a_value_is_answered_in_one_line(s, flag):
    out = run_script(s.path, *s.argv, *flag)
    name = flag[0].split("=")[0]
    assert out.returncode == 1
    assert one_line_error(out.stderr) == \
        f"error: {name} is a switch: use {name} or --no-{name[2:]} (no value)"


PROBE = """import json, os, signal, sys
print(json.dumps(dict(argv=sys.argv, path0=sys.path[0], path=sys.path[1:], file=__file__,
                      name=__name__, cwd=os.getcwd(), env=os.environ.get("PROBE_VALUE"),
                      main=sys.modules["__main__"].__dict__ is globals())))
print("to stderr", file=sys.stderr)
how = sys.argv[1]
if how == "exit":
    sys.exit(3)
if how == "raise":
    raise ValueError("boom")
if how == "signal":
    os.kill(os.getpid(), signal.SIGTERM)
if how == "message":
    sys.exit("stopped")
if how == "hang":
    signal.pause()
"""


@pytest.mark.parametrize("how, code", [("end", 0), ("exit", 3), ("raise", 1),
                                       ("signal", -signal.SIGTERM), ("message", 1)])
def test_run_script_is_what_a_fresh_interpreter_gives(how, code, tmp_path):
    """run_script forks from a process with torch imported (tests/preloaded.py): the child's
    argv, sys.path, __file__, __main__, cwd, environment, output and status are a fresh
    `python SCRIPT ARGV`'s."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {"PROBE_VALUE": "x"}
    fast, fresh = (run(str(probe), how, "--flag", env=env) for run in (run_script, fresh_python))
    assert fast.returncode == fresh.returncode == code, (fast.stderr, fresh.stderr)
    assert fast.stdout == fresh.stdout and json.loads(fast.stdout)["env"] == "x"
    if how == "raise":  # the same traceback but for the frames that ran the script
        assert fast.stderr.endswith("ValueError: boom\n") and "Traceback" in fast.stderr
        assert fresh.stderr.endswith("ValueError: boom\n")
    else:
        assert fast.stderr == fresh.stderr


def test_run_script_kills_a_child_past_its_time_as_subprocess_run_does(tmp_path):
    """Past `timeout` the child is killed and TimeoutExpired carries what it wrote; the next
    command runs as usual."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    for run in (run_script, fresh_python):
        with pytest.raises(subprocess.TimeoutExpired) as late:
            run(str(probe), "hang", timeout=3)
        output = late.value.output
        written = output.decode() if isinstance(output, bytes) else output
        assert json.loads(written)["argv"][1:] == ["hang"]
    assert run_script(str(probe), "end").returncode == 0


@PARAMS
def test_run_script_gives_a_scripts_one_line_error_as_a_fresh_interpreter(s):
    fast, fresh = (run(s.path, *s.argv, "--compile", "True") for run in (run_script,
                                                                       fresh_python))
    assert (fast.returncode, fast.stdout, fast.stderr) == (
        fresh.returncode, fresh.stdout, fresh.stderr)


@PARAMS
def test_ctrl_c_while_the_imports_load_exits_130_with_one_line(s, tmp_path):
    """SIGINT while torch and gymnasium are still being imported (the first second of a
    command line): exit 130 with one line, no KeyboardInterrupt traceback."""
    proc = start_script(s.path, *s.args(tmp_path / "run"))
    time.sleep(0.6)  # the stdlib imports and the handler take ms; torch and the data seconds
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "stopped by signal 2 during start-up" in one_line_error(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, env", [("cql_sac_continuous", "pendulum-expert"),
                                       ("cql_qrdqn_atari", "cartpole-expert"),
                                       ("calql_finetune", "antmaze-umaze")])
def test_help_says_what_the_values_shown_are(name, env, capsys, monkeypatch):
    """Issue 22: --help's first line names the task whose values it shows and --presets."""
    module = importlib.import_module(name)
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        module.parse_args(["--env", env, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0
    assert f"The values shown are the ones `--env {env}` runs" in text
    assert "`--presets` prints every preset value with its source" in text
    assert "--threads" in text  # one name per concept in the three scripts
    assert name == "cql_qrdqn_atari" or "--cql-importance-sample" in text  # exact in QR-DQN


HELP_GROUPS = {  # issue 22 item 6: --help's groups, in order (the banners of each Args)
    "cql_sac_continuous": ["run and data", "networks", "SAC", "CQL", "Lagrange",
                           "data transforms", "logging and run"],
    "calql_finetune": ["run and data", "networks", "SAC", "CQL and Cal-QL", "Lagrange",
                       "data transforms", "logging and run"],
    "cql_qrdqn_atari": ["run and data", "networks", "QR-DQN", "CQL", "Lagrange",
                        "Atari", "logging and run"]}


@pytest.mark.parametrize("name, env", [("cql_sac_continuous", "pendulum-expert"),
                                       ("cql_qrdqn_atari", "cartpole-expert"),
                                       ("calql_finetune", "pointmaze-binary")])
def test_help_lists_every_flag_once_in_its_group_with_the_value_that_runs(name, env, capsys):
    """Issue 22 item 6: --help in groups, every field of Args once, under its group, with its
    docstring and the value `--env env` runs; `--presets` listed; lines of at most 100."""
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as exc:
        module.parse_args(["--env", env, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and max(map(len, out.splitlines())) <= 100
    groups, flags, group = [], {}, None
    for line in out.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            group = line[:-1]
            groups.append(group)
        elif line.startswith("  --"):
            flag = line.split()[0]
            assert flag not in flags, f"{flag} twice"
            flags[flag] = group
    assert groups == HELP_GROUPS[name]
    fields = {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(module.Args)}
    assert set(flags) - {"--presets"} == fields and flags["--presets"] is None
    preset, entries = module.preset_args(env), help_entries(out)
    for field in dataclasses.fields(module.Args):  # each flag shows its own preset value
        value = getattr(preset, field.name)
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
        assert help_default(entries[f"--{field.name.replace('_', '-')}"]) == shown, field.name
    assert flags["--seed"] == "run and data" and flags["--compile"] == "logging and run"
    assert flags["--lagrange"] == "Lagrange"
