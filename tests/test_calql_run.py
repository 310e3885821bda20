"""Cal-QL end to end: offline then online on the local datasets, the training batches, an
offline-only run extended online and stopped there, the README command. The run contract (run
files, signals, kills, resume, divergence, bad inputs) is tests/test_run_contract.py."""

import os
import re
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCRIPTS, read_json, read_metrics, run_script

import calql_finetune as calql

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_args(run_dir: Path, env: str = "pointmaze-binary", **overrides) -> calql.Args:
    """The preset of `env` with tiny networks and a short schedule."""
    base = dict(run_dir=str(run_dir), actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16),
                batch_size=32, cql_n_actions=3, eval_episodes=1, offline_steps=40,
                offline_eval_every=20, online_steps=250, eval_every=100, log_every=25,
                progress=False)
    return replace(calql.preset_args(env), **{**base, **overrides})


def online_trajectories(run_dir: Path) -> list[dict[str, np.ndarray]]:
    """The online buffer of a checkpoint, split into trajectories where obs stops chaining."""
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    data = {k: v.numpy() for k, v in ckpt["parts"]["online"]["data"].items()}
    cuts = [0] + [i + 1 for i in range(len(data["obs"]) - 1)
                  if not np.array_equal(data["next_obs"][i], data["obs"][i + 1])]
    cuts.append(len(data["obs"]))
    return [{k: v[a:b] for k, v in data.items()} for a, b in zip(cuts[:-1], cuts[1:],
                                                                  strict=True)]


@pytest.mark.parametrize("task", ["pointmaze", "pen"])
def test_offline_then_online_end_to_end(local_dataset, tmp_path, task):
    if task == "pen":
        ds = local_dataset("pen-cloned-local")
        args = tiny_args(tmp_path / "run", env="pen-binary", dataset_id=ds, online_steps=200)
    else:
        local_dataset("pointmaze-sparse")
        args = tiny_args(tmp_path / "run")
    summary = calql.main(args)
    run = tmp_path / "run"
    config = read_json(run / "config.json")
    rows = read_metrics(run)
    # step 0: the initial policy, before any update (the official loop's epoch-0 evaluation)
    assert [r["phase"] for r in rows[:3]] == ["offline"] * 3
    assert [r["step"] for r in rows[:3]] == [0, 20, 40]
    online = [r for r in rows if r["phase"] == "online"]
    assert online and online[-1]["env_steps"] >= args.online_steps
    assert all(r["step"] > 40 for r in online)
    for r in rows:
        train_keys = ("critic_loss", "actor_loss", "cql_gap", "bound_rate_pi",
                      "bound_rate_pi_next", "calib_below_share", "calib_q_minus_vmu")
        for key in ("score", "success_rate", "value_gap", *(train_keys if r["step"] else ())):
            assert np.isfinite(r[key]), key
        assert "normalized_score" not in r  # score: the success rate x 100
        assert r["value_gap_return"] == pytest.approx(r["value_gap"] / args.reward_scale)
    on_disk = read_json(run / "summary.json")
    assert on_disk == summary
    assert summary["offline_score"] == rows[2]["score"]
    assert summary["final_score"] == rows[-1]["score"]
    rates = [r["success_rate"] for r in online]
    assert summary["cumulative_regret"] == pytest.approx(np.mean([1 - s for s in rates]))
    assert summary["max_drop_below_offline"] == pytest.approx(
        max(0.0, rows[2]["score"] - min(r["score"] for r in online)))
    assert summary["env_steps"] >= args.online_steps
    assert summary["gradient_steps"] == 40 + summary["env_steps"]  # UTD 1
    # Every stored online trajectory carries its own MC returns, filled when it ended.
    trajs = online_trajectories(run)
    assert sum(len(t["rewards"]) for t in trajs) == summary["env_steps"]
    assert len(trajs) == summary["episodes"]
    for t in trajs:
        assert set(np.unique(t["rewards"])) <= {-5.0, 5.0}
        ends_at_success = t["rewards"][-1] == 5.0
        assert bool(t["dones"][-1]) == ends_at_success and not t["dones"][:-1].any()
        assert ends_at_success or len(t["rewards"]) == config["dataset"]["horizon"] or \
            len(t["rewards"]) == 100
        want = calql.mc_returns(t["rewards"], t["dones"], 0.99, True, -5.0)
        np.testing.assert_allclose(t["mc_returns"], want, rtol=1e-6)
    if task == "pen":
        assert config["dataset"]["episodes_in_dataset"] == 40
        assert 0 < config["dataset"]["episodes_kept"] < 40


def test_mixing_ratio_and_utd_reach_the_training_batches(local_dataset, tmp_path, monkeypatch):
    """Each update's batch: offline only in pre-training, mixed (with online data) after."""
    local_dataset("pointmaze-sparse")
    seen, mixed = [], []
    original_mixed, original_step = calql.mixed_batch, calql.Trainer.step

    def spy(offline, online, batch_size, ratio):
        mixed.append((online is not None and online.size > 0, batch_size, ratio))
        return original_mixed(offline, online, batch_size, ratio)

    def step(self, batch):  # the batch came from mixed_batch iff a call was made for it
        seen.append(mixed.pop() if mixed else (False, len(batch["obs"]), None))
        return original_step(self, batch)

    monkeypatch.setattr(calql, "mixed_batch", spy)
    monkeypatch.setattr(calql.Trainer, "step", step)
    summary = calql.main(tiny_args(tmp_path / "run", offline_steps=10, offline_eval_every=10,
                                   online_steps=60, eval_every=60, utd=2, mixing_ratio=0.25))
    assert summary["gradient_steps"] == 10 + 2 * summary["env_steps"]
    assert [s[0] for s in seen] == [False] * 10 + [True] * (2 * summary["env_steps"])
    assert all(s[2] == 0.25 for s in seen[10:]) and all(s[1] == 32 for s in seen)


def test_an_offline_only_run_extended_online_stops_at_a_trajectory_end(local_dataset, tmp_path,
                                                                        monkeypatch):
    """online_steps 0: no environment step, the final score is the offline one. Extended
    online and sent SIGTERM during an online update, it stops at that trajectory's end with
    every update owed made: step = offline steps + environment steps (UTD 1)."""
    local_dataset("pointmaze-sparse")
    run, kw = tmp_path / "run", dict(offline_steps=20, offline_eval_every=20)
    first = calql.main(tiny_args(run, online_steps=0, **kw))
    assert first["env_steps"] == 0 and first["offline_score"] == first["final_score"]
    step, calls = calql.Trainer.step, []

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == 35:  # as if `kill -TERM` arrived during this online update
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch)

    monkeypatch.setattr(calql.Trainer, "step", interrupted)
    with pytest.raises(SystemExit) as exc:
        calql.main(tiny_args(run, online_steps=250, resume=str(run), **kw))
    assert exc.value.code == 128 + signal.SIGTERM
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    loop = state["parts"]["loop"]
    assert loop["phase"] == "online" and loop["env_steps"] < 250
    assert state["step"] == 20 + loop["env_steps"] >= 20 + 35
    assert state["parts"]["online"]["size"] == loop["env_steps"]


def test_the_bars_count_what_the_rows_count_and_print_their_last_line_once(
        local_dataset, tmp_path, capsys):
    """The offline bar counts gradient steps (the rows' `step`), the online one environment
    steps (the rows' `env_steps`; its total grows when the last trajectory runs past
    --online-steps: 300 of 250 here); each bar's last line prints once (tqdm.write redraws a
    bar after a row, and closing it draws it again: it closes before its phase's last row)."""
    local_dataset("pointmaze-sparse")
    summary = calql.main(tiny_args(tmp_path / "run", progress=True))
    frames = [f.strip() for f in re.split(r"[\r\n]", capsys.readouterr().err) if f.strip()]
    rows, n = read_metrics(tmp_path / "run"), summary["env_steps"]
    assert n == rows[-1]["env_steps"] == 300
    for phase, last in (("offline", "| 40/40 "), ("online", f"| {n}/{n} ")):
        bar = [f for f in frames if f" {phase}: " in f]
        assert sum(last in f for f in bar) == 1, bar
        counts = [tuple(map(int, m.groups())) for f in bar
                  if (m := re.search(r"\| (\d+)/(\d+) ", f))]
        assert counts and all(done <= total for done, total in counts), counts


def test_command_line_run_on_the_local_pen_dataset(local_dataset, tmp_path):
    """The README command shape: `--env pen-binary --dataset-id local/pen/cloned-v0`."""
    ds = local_dataset("pen-cloned-local")
    s = SCRIPTS["calql"]
    proc = run_script(s.path, "--env", "pen-binary", "--dataset-id", ds, *s.argv[2:],
                      "--offline-steps", "20", "--offline-eval-every", "20", "--online-steps",
                      "100", "--eval-every", "100", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["env_steps"] >= 100 and summary["offline_success_rate"] is not None
