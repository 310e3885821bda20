"""cql_qrdqn_atari.py end to end: Atari-shaped and DQN-replay runs, a dataset id alone, a
stop and resume across target refreshes with --lagrange, evaluation, W&B (the learning check
is tests/test_cql_qrdqn_learning.py). The run
contract (run files, signals, kills, resume, divergence, bad inputs) is
tests/test_run_contract.py."""

import dataclasses
import os
import signal
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import SCRIPTS, read_json, read_metrics, run_script, untimed
from dqn_replay import make_dqn_replay_dir

import cql_qrdqn_atari as m


def args_for(env, dataset_id=None, dqn_replay_dir=None, data_fraction=0.01, **overrides):
    """The env's preset with overrides, as tests build complete Args."""
    preset = m.preset_args(env, dataset_id, dqn_replay_dir, data_fraction)
    return dataclasses.replace(preset, **overrides)


def small(env="cartpole-medium", **kw):
    base = dict(total_steps=300, eval_every=150, eval_episodes=2, log_every=50,
                progress=False, hidden_dims=(32, 32), num_quantiles=8)
    base.update(kw)
    return args_for(env, **base)



def test_pong_local_run_with_nature_torso(tmp_path, local_dataset):
    local_dataset("pong-random")
    run_dir = tmp_path / "pong"
    summary = m.main(args_for("pong-random", total_steps=4, eval_every=2, eval_episodes=1,
                            batch_size=8, max_episode_steps=60, log_every=2, progress=False,
                            run_dir=str(run_dir)))
    config = read_json(run_dir / "config.json")["args"]
    # the Atari preset: paper optimizer and QR-DQN settings
    assert (config["qf_lr"], config["adam_eps"], config["num_quantiles"]) == (5e-5, 3.125e-4, 200)
    assert config["target_update_every"] == 2000 and config["clip_reward"] is True
    assert config["eval_epsilon"] == 0.001
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [2, 4]
    ret = rows[-1]["return_mean"]
    assert summary["final_score"] == pytest.approx(100 * (ret + 20.7) / (14.6 + 20.7))


def test_dqn_replay_run(tmp_path):
    replay = make_dqn_replay_dir(tmp_path / "Pong" / "1" / "replay_logs", num_checkpoints=2)
    run_dir = tmp_path / "run"
    summary = m.main(args_for("pong", dqn_replay_dir=str(replay), data_fraction=0.5,
                              total_steps=2, eval_every=2, eval_episodes=1, batch_size=4,
                            max_episode_steps=30, log_every=1, progress=False,
                            run_dir=str(run_dir)))
    config = read_json(run_dir / "config.json")
    assert config["args"]["cql_weight"] == 1.0  # preset for a large fraction (0.5 > 5%)
    assert summary["transitions"] > 0 and config["dataset"]["source"].startswith("dqn_replay:")
    # the paper's presets: alpha 4.0 with 1% of the data, 1.0 with 10%
    assert m.preset_args("pong", dqn_replay_dir="x", data_fraction=0.01).cql_weight == 4.0
    assert m.preset_args("pong", dqn_replay_dir="x", data_fraction=0.1).cql_weight == 1.0
    argv = ["--env", "pong", "--dqn-replay-dir", "x", "--data-fraction", "0.1"]
    assert m.parse_args(argv).cql_weight == 1.0
    assert m.parse_args([*argv, "--cql-weight", "2.5"]).cql_weight == 2.5


def test_dataset_id_alone_runs(tmp_path, local_dataset):
    """--dataset-id of a discrete Minari set with no --env: the preset of its observations;
    config.json names the dataset and exactly the evaluation env."""
    ds_id = local_dataset("cartpole-medium")
    r = run_script(SCRIPTS["qrdqn"].path, "--dataset-id", ds_id, "--total-steps", "20",
                   "--eval-every", "20", "--eval-episodes", "1", "--num-quantiles", "4",
                   "--no-progress", "--run-dir", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr[-2000:]
    config = read_json(tmp_path / "d" / "config.json")
    assert config["args"]["env"] == "cartpole-medium-v0"
    assert config["dataset"]["dataset_id"] == ds_id and config["dataset"]["source"] == ds_id
    assert config["args"]["hidden_dims"] == [128, 128]  # the vector preset
    gap = config["eval_env"].pop("value_gap")
    assert config["eval_env"] == {"id": "CartPole-v1", "max_episode_steps": 500, "kwargs": {}}
    assert gap["horizon"] == 459 and gap["rollout_max_steps"] == 500  # CartPole's limit >= 459


def test_compile_runs_on_cpu(tmp_path, local_dataset):
    local_dataset("cartpole-medium")
    summary = m.main(small(total_steps=20, eval_every=20, eval_episodes=1, compile=True,
                           run_dir=str(tmp_path / "c")))
    assert summary["final_return"] > 0


# --- checkpoint and resume ------------------------------------------------------------------------


def test_stop_and_resume_across_target_refreshes_with_lagrange(tmp_path, local_dataset,
                                                               monkeypatch, capsys):
    """What the contract's run lacks (no --lagrange; target refresh every 500 > its 400
    updates): SIGINT at update 100 of 230 with the target refreshed every 60 updates and
    alpha' tuned; the resume (--progress, a free field, changed) gives the uninterrupted
    run's rows (evaluated at the last step 230 too), return and tensors."""
    local_dataset("cartpole-medium")
    kw = dict(total_steps=230, eval_every=100, hidden_dims=(16, 16), lagrange=True,
              cql_tau=0.5, target_update_every=60)
    full = m.main(small(run_dir=str(tmp_path / "full"), **kw))
    run, step, calls = tmp_path / "run", m.Trainer.step, []

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == 100:  # as if Ctrl-C arrived during this update
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, batch)

    monkeypatch.setattr(m.Trainer, "step", interrupted)
    with pytest.raises(SystemExit) as exc:
        m.main(small(run_dir=str(run), **kw))
    assert exc.value.code == 128 + signal.SIGINT
    assert f"stopped by signal {int(signal.SIGINT)} at step 100" in capsys.readouterr().err
    monkeypatch.setattr(m.Trainer, "step", step)
    resumed = m.main(small(resume=str(run), progress=True, **kw))
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [100, 200, 230]
    assert all(len(r["episode_returns"]) == 2 for r in rows)  # --eval-episodes 2
    assert untimed(rows) == untimed(read_metrics(tmp_path / "full"))
    assert resumed["final_return"] == full["final_return"]
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False)["parts"]
            for d in (tmp_path / "full", run))
    assert b["trainer"]["updates"] == 230
    a, b = a["agent"], b["agent"]
    assert {k for k in a if k.startswith("q.")} and a.keys() == b.keys()
    for k, v in a.items():  # the Q network, its target copy and log alpha'
        assert torch.equal(v, b[k]), k


# --- evaluation -----------------------------------------------------------------------------------


def test_evaluation_is_seeded_batched_and_uses_epsilon():
    import gymnasium as gym

    torch.manual_seed(0)
    q = m.QRNetwork((4,), 2, 3, (8,))
    make_env = lambda: gym.make("CartPole-v1")  # noqa: E731

    def ev(n, eps, seed, cap=10**9):
        envs = [make_env() for _ in range(n)]
        return np.array(m.evaluate(q, envs, eps, seed, "cpu", cap)["episode_returns"])

    a = ev(3, 0.0, 123)
    np.testing.assert_array_equal(a, ev(3, 0.0, 123))
    # side by side == one after the other (greedy): episode e is env seed 123 + e
    np.testing.assert_array_equal(a, [ev(1, 0.0, 123 + e)[0] for e in range(3)])
    assert (ev(2, 0.0, 5, cap=7) <= 7).all()  # step cap
    # epsilon 1: uniformly random actions, whatever the network
    assert 12 < ev(20, 1.0, 0).mean() < 40
    assert m.eval_seed(0, 100) == m.eval_seed(0, 100) != m.eval_seed(0, 200) != m.eval_seed(1, 100)


def test_value_gap_is_q_s0_minus_discounted_return():
    import gymnasium as gym

    class Const(torch.nn.Module):  # Q = 7 everywhere, 1 quantile
        frames = False

        def forward(self, x):
            return torch.full((len(x), 2, 1), 7.0)

    envs = [gym.make("CartPole-v1") for _ in range(2)]
    out = m.evaluate(Const(), envs, 0.0, 0, "cpu", 5, gamma=0.5, score_range=(1.0, 3.0))
    # 5 steps of reward 1 (capped): discounted return 1 + .5 + .25 + .125 + .0625
    assert out["q_pred_s0"] == 7.0
    assert out["value_gap"] == pytest.approx(7.0 - 1.9375)
    assert out["return_mean"] == 5.0 and out["score"] == pytest.approx(200.0)
    assert out["value_gap_return"] == out["value_gap"] and out["episode_length"] == 5.0
    assert out["success_rate"] is None


class MinusOne(gym.Env):
    """A CPU stub env: reward -1 every step, terminated at step `end` (None: never)."""

    def __init__(self, end=None):
        self.end, self.t = end, 0
        self.action_space = gym.spaces.Discrete(2)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.zeros(4, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(4, np.float32), -1.0, self.t == self.end, False, {}


class ConstQ(torch.nn.Module):  # Q = 7 everywhere, 1 quantile
    frames = False

    def forward(self, x):
        return torch.full((len(x), 2, 1), 7.0)


def test_gap_horizon_values():
    assert m.gap_horizon(0.99) == 459 and 0.99**459 <= m.GAP_TAIL < 0.99**458
    assert m.gap_horizon(0.995) == 919 and m.gap_horizon(0.9) == 44
    assert m.gap_horizon(0.0) == 1 and m.gap_horizon(1.0) is None
    assert m.gap_tail_bound(0.99, 3, 1.0, terminated=True) == 0.0
    assert m.gap_tail_bound(0.99, 459, 2.0, False) == pytest.approx(0.99**459 * 2.0 / 0.01)
    assert m.gap_tail_bound(1.0, 459, 1.0, False) is None


def test_value_gap_sums_past_the_score_horizon_until_a_true_termination():
    """Never terminating, score limit 200: the score counts 200 steps, value_gap the 459 of the
    gap horizon (a time limit is not an end); terminating at t = 3: 3 steps, no tail."""
    import gymnasium as gym

    spec = m.value_gap_spec(0.99, 200, 1.0)
    assert spec["horizon"] == 459 and spec["rollout_max_steps"] == 459
    assert spec["runs_past_time_limit"] and spec["score_max_steps"] == 200
    envs = [gym.wrappers.TimeLimit(MinusOne(), 459) for _ in range(2)]
    out = m.evaluate(ConstQ(), envs, 0.0, 0, "cpu", 200, 0.99, rollout_steps=459, r_absmax=1.0)
    assert out["return_mean"] == -200.0 and out["value_gap_steps"] == 459
    assert out["value_gap"] == pytest.approx(7.0 + (1 - 0.99**459) / 0.01)
    assert out["value_gap_tail_bound"] == pytest.approx(0.99**459 / 0.01)
    out = m.evaluate(ConstQ(), [MinusOne(end=3)], 0.0, 0, "cpu", 200, 0.99, rollout_steps=459)
    assert out["value_gap_steps"] == 3 and out["value_gap_tail_bound"] == 0.0
    assert out["return_mean"] == -3.0 and out["value_gap"] == pytest.approx(7.0 + 1 + .99 + .9801)


def test_config_records_the_value_gap_rollout(local_dataset):
    """CartPole (score limit 500 > 459): no run past the limit; Atari: evaluate's 27k steps."""
    local_dataset("cartpole-expert"), local_dataset("pong-random")
    data = m.load_data(small("cartpole-expert"))
    gap = data.eval_env["value_gap"]
    assert gap["horizon"] == 459 and gap["rollout_max_steps"] == 500
    assert not gap["runs_past_time_limit"] and gap["reward_abs_max"] == 1.0
    assert gap["tail_bound"] == pytest.approx(0.99**500 / 0.01) and gap["note"] is None
    assert data.info["reward_abs_max"] == 1.0
    pong = m.load_data(small("pong-random", hidden_dims=(512,)))
    gap = pong.eval_env["value_gap"]
    assert gap["rollout_max_steps"] == 27_000 and "frame cap" in gap["note"]
    assert "gap_note" not in pong.eval_env


def test_track_logs_to_wandb(tmp_path, local_dataset, monkeypatch):
    """--track: wandb is imported lazily and gets the config, train/eval metrics and summary
    (a stand-in module records the calls; the real wandb import alone takes seconds)."""
    import types

    calls = {"log": [], "summary": {}}

    class Run:
        summary = calls["summary"]

        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    local_dataset("cartpole-medium")
    m.main(small(run_dir=str(tmp_path / "w"), total_steps=20, eval_every=20, eval_episodes=1,
                 log_every=10, track=True, wandb_entity="me"))
    assert calls["init"]["project"] == "cql-calql" and calls["init"]["entity"] == "me"
    assert calls["init"]["config"]["env"] == "cartpole-medium"
    assert [s for s, d in calls["log"] if "train/qr_loss" in d] == [10, 20]
    assert [s for s, d in calls["log"] if "eval/score" in d and "eval/wall_time_s" in d] == [20]
    assert "final_return" in calls["summary"] and calls.get("finished")
