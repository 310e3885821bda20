"""Cal-QL end to end: offline then online on the local datasets, resume across the phase
boundary, bad inputs."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from minari.data_collector import EpisodeBuffer

import calql_finetune as calql

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "calql_finetune.py")
TINY = ["--hidden-dims", "16", "16", "--batch-size", "32", "--cql-n-actions", "3",
        "--eval-episodes", "1", "--log-every", "25", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_args(run_dir: Path, env: str = "pointmaze-binary", **overrides) -> calql.Args:
    """The preset of `env` with tiny networks and a short schedule."""
    base = dict(run_dir=str(run_dir), actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16),
                batch_size=32, cql_n_actions=3, eval_episodes=1, offline_steps=40,
                offline_eval_every=20, online_steps=250, eval_every=100, log_every=25,
                progress=False)
    return replace(calql.preset_args(env), **{**base, **overrides})


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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
    config = json.loads((run / "config.json").read_text())
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
        assert r["normalized_score"] is None  # binary: no score from relabelled returns
    on_disk = json.loads((run / "summary.json").read_text())
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


def test_sigterm_across_the_offline_online_boundary_then_resume_is_bit_identical(
        local_dataset, tmp_path, monkeypatch):
    local_dataset("pointmaze-sparse")
    kw = dict(offline_steps=60, offline_eval_every=30, online_steps=250, eval_every=100, seed=5)
    reference = calql.main(tiny_args(tmp_path / "ref", **kw))
    run = tmp_path / "run"
    original = calql.Trainer.step

    def stop_after(n: int):
        calls = []

        def step(self, *a, **k):
            calls.append(1)
            out = original(self, *a, **k)
            if len(calls) == n:  # as if `kill -TERM` arrived during this update
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        return step

    # 1) stopped during pre-training (step 45 of 60)
    monkeypatch.setattr(calql.Trainer, "step", stop_after(45))
    with pytest.raises(SystemExit) as exc:
        calql.main(tiny_args(run, **kw))
    assert exc.value.code == 128 + signal.SIGTERM
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["parts"]["loop"]["phase"] == "offline" and ckpt["step"] == 45
    # 2) resumed: crosses the boundary; the signal arrives mid-way through an online
    #    trajectory's updates (45 + 50 = step 95, 35 online updates into the first
    #    trajectory's budget) and is honoured at that trajectory's end (UTD 1)
    monkeypatch.setattr(calql.Trainer, "step", stop_after(50))
    with pytest.raises(SystemExit):
        calql.main(tiny_args(run, resume=str(run), **kw))
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    loop = ckpt["parts"]["loop"]
    assert loop["phase"] == "online" and loop["env_steps"] > 0
    assert ckpt["step"] == 60 + loop["env_steps"] > 95  # the updates owed were all made
    assert ckpt["parts"]["online"]["size"] == loop["env_steps"]
    # 3) resumed to the end: the same evaluations and training metrics, bit for bit
    monkeypatch.setattr(calql.Trainer, "step", original)
    resumed = calql.main(tiny_args(run, resume=str(run), **kw))
    ref_rows, rows = read_metrics(tmp_path / "ref"), read_metrics(run)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for a, b in zip(ref_rows, rows, strict=True):
        assert a == b
    for key in ("offline_score", "final_score", "cumulative_regret", "value_gap",
                "gradient_steps", "env_steps", "episodes"):
        assert resumed[key] == reference[key], key


def test_a_finished_run_can_be_extended_but_not_changed(local_dataset, tmp_path):
    local_dataset("pointmaze-sparse")
    run = tmp_path / "run"
    first = calql.main(tiny_args(run, online_steps=0))
    assert first["env_steps"] == 0 and first["offline_score"] == first["final_score"]
    longer = calql.main(tiny_args(run, online_steps=120, resume=str(run)))
    assert longer["env_steps"] >= 120 and longer["offline_score"] == first["offline_score"]
    with pytest.raises(SystemExit, match="cql_weight: 1.0 -> 2.0"):
        calql.main(tiny_args(run, cql_weight=2.0, resume=str(run)))


def write_dataset(root: Path, dataset_id: str, env_id: str, success: bool | None) -> None:
    """A tiny hand-made Minari dataset (random actions); success None: no success infos."""
    old = os.environ["MINARI_DATASETS_PATH"]
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        env = gym.make(env_id)
        buffers = []
        for k in range(2):
            obs, _ = env.reset(seed=k)
            rows = dict(observations=[obs], actions=[], rewards=[], terminations=[],
                        truncations=[])
            for t in range(10):
                action = env.action_space.sample()
                obs, r, _, _, _ = env.step(action)
                rows["observations"].append(obs)
                rows["actions"].append(action)
                rows["rewards"].append(r)
                rows["terminations"].append(False)
                rows["truncations"].append(t == 9)
            infos = None if success is None else {"success": np.full(11, success)}
            buffers.append(EpisodeBuffer(**{k: np.asarray(v) for k, v in rows.items()},
                                         infos=infos))
        minari.create_dataset_from_buffers(dataset_id, buffers, env=env_id)
    finally:
        os.environ["MINARI_DATASETS_PATH"] = old


BAD_INPUTS = {
    "no-success-info": (dict(env="pen-binary", dataset_id="test/pendulum/dense-v0"),
                        "has no per-step 'success' info; --env pen-binary needs it (binary"),
    "all-failures": (dict(env="pen-binary", dataset_id="test/pendulum/fail-v0"),
                     "none of its 2 trajectories reaches success"),
    "dense-as-binary": (dict(env="hopper-binary"), "hopper is a dense-reward task"),
    "mixing-ratio": (dict(mixing_ratio=1.5), "--mixing-ratio 1.5 is outside [0, 1]"),
    "negative-mixing": (dict(mixing_ratio=-0.1), "outside [0, 1]"),
    "unknown-env": (dict(env="pen-human"), "unknown --env 'pen-human'"),
    "missing-local": (dict(env="pointmaze-binary"),
                      "build it with: python benchmark/datasets.py local/pointmaze/sparse-v0"),
    "no-network": (dict(env="pen-binary"), "could not be downloaded"),
}


@pytest.fixture
def bad_root(tmp_path, monkeypatch):
    """A datasets root with two hand-made datasets and nothing else; no network."""
    write_dataset(tmp_path, "test/pendulum/dense-v0", "Pendulum-v1", success=None)
    write_dataset(tmp_path, "test/pendulum/fail-v0", "Pendulum-v1", success=False)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_give_one_line_errors(bad_root, case):
    overrides, message = BAD_INPUTS[case]
    with pytest.raises(SystemExit) as exc:
        calql.main(tiny_args(bad_root / "run", **overrides))
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("argv, message", [
    (["--env", "pen-binary", "--dataset-id", "test/pendulum/dense-v0"], "no per-step 'success'"),
    (["--env", "pointmaze-binary", "--mixing-ratio", "1.5"], "outside [0, 1]"),
])
def test_bad_inputs_on_the_command_line_exit_non_zero(bad_root, argv, message):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, *argv, *TINY, "--run-dir",
                           str(bad_root / "run")], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]


def test_command_line_run_on_the_local_pen_dataset(local_dataset, tmp_path):
    """The README command shape: `--env pen-binary --dataset-id local/pen/cloned-v0`."""
    ds = local_dataset("pen-cloned-local")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, "--env", "pen-binary", "--dataset-id", ds,
                           *TINY, "--offline-steps", "20", "--offline-eval-every", "20",
                           "--online-steps", "100", "--eval-every", "100",
                           "--run-dir", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["env_steps"] >= 100 and summary["offline_success_rate"] is not None
