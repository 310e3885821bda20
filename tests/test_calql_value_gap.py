"""Cal-QL's value gap (issue 17 item 3): one rollout per evaluation episode past the time limit
to the gap horizon (0.99 -> 459 steps) or a terminal (binary: success), scored over the
horizon only; the ONLINE env keeps the horizon, so collected trajectories do not grow."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import read_json, read_metrics

import calql_finetune as calql

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GAMMA = 0.99


def test_gap_horizon():
    assert calql.GAP_TAIL == 0.01 and calql.gap_horizon(GAMMA) == 459
    assert GAMMA**459 < calql.GAP_TAIL <= GAMMA**458
    assert calql.gap_horizon(0.0) == 1 and calql.gap_horizon(1.0) is None


class MinusOne(gym.Env):
    """Dense reward -1 at every step, never terminating; `success` at step `win` (None:
    never), in the info as Adroit reports it."""

    observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    def __init__(self, win: int | None = None):
        self.win = win

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(3, np.float32), -1.0, False, False, {"success": self.t == self.win}


gym.register("CalqlGapMinusOne-v0", entry_point=MinusOne, max_episode_steps=200)


def evaluate(binary: bool, **env_kwargs) -> dict:
    torch.manual_seed(0)
    args = calql.replace(calql.preset_args("pointmaze-binary"), actor_hidden_dims=(8,),
                         critic_hidden_dims=(8,), eval_episodes=2, gamma=GAMMA, binary=binary)
    gap = calql.value_gap_spec(GAMMA, 200, np.array([-1.0], np.float32))
    spec = dict(id="CalqlGapMinusOne-v0", max_episode_steps=200, kwargs=env_kwargs)
    env = calql.make_eval_env(spec, gap["rollout_max_steps"])
    tf = calql.Transform(np.zeros(3, np.float32), np.ones(3, np.float32),
                         np.ones(2, np.float32), np.zeros(2, np.float32), 1.0, 0.0)
    agent = calql.Agent(3, 2, args)
    out = calql.evaluate(agent, env, tf, args, {}, torch.device("cpu"), gap)
    env.close()
    x = torch.zeros(1, 3)  # every episode's s0
    with torch.no_grad():
        out["q0"] = agent.critic(x, agent.actor.act_deterministic(x)).min(0).values.item()
    return out


def test_dense_gap_runs_past_the_time_limit_and_the_score_does_not():
    out = evaluate(binary=False)
    assert out["return_mean"] == -200.0 and out["episode_length"] == 200
    assert out["success_rate"] == 0.0 and out["value_gap_steps"] == 459
    obtained = -(1 - GAMMA**459) / (1 - GAMMA)  # sum_{t<459} gamma^t (-1)
    assert out["value_gap"] == pytest.approx(out["q0"] - obtained, abs=1e-6)
    assert out["value_gap_tail_bound"] == pytest.approx(GAMMA**459 / (1 - GAMMA))
    assert out["q_pred_s0"] == out["q0"] and out["value_gap_return"] == out["value_gap"]
    failed = evaluate(binary=True)  # a failed binary episode: r = -1 for all 459 steps
    assert failed["value_gap"] == pytest.approx(failed["q0"] - obtained, abs=1e-6)
    assert failed["value_gap_steps"] == 459 and failed["success_rate"] == 0.0


def test_binary_success_is_a_terminal_that_ends_the_rollout():
    out = evaluate(binary=True, win=3)
    assert out["value_gap_steps"] == 3 and out["value_gap_tail_bound"] == 0.0
    assert out["episode_length"] == 3 and out["success_rate"] == 1.0
    assert out["return_mean"] == -2.0  # r = success - 1: -1, -1, 0
    assert out["value_gap"] == pytest.approx(out["q0"] - (-1 - GAMMA), abs=1e-6)


def test_success_after_the_horizon_ends_the_gap_but_does_not_score():
    out = evaluate(binary=True, win=300)
    assert out["success_rate"] == 0.0 and out["score"] == 0.0 and out["episode_length"] == 200
    assert out["value_gap_steps"] == 300 and out["value_gap_tail_bound"] == 0.0


def test_online_trajectories_keep_the_horizon(local_dataset, tmp_path, monkeypatch):
    local_dataset("pointmaze-sparse")
    seen = []
    collect = calql.collect_trajectory

    def recording(agent, env, *rest, **kw):
        traj, success = collect(agent, env, *rest, **kw)
        seen.append((env.spec.max_episode_steps, len(traj["rewards"])))
        return traj, success

    monkeypatch.setattr(calql, "collect_trajectory", recording)
    args = calql.replace(
        calql.preset_args("pointmaze-binary"), run_dir=str(tmp_path / "run"),
        actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16), batch_size=32, cql_n_actions=3,
        eval_episodes=1, offline_steps=10, offline_eval_every=10, online_steps=150,
        eval_every=150, log_every=25, progress=False)
    calql.main(args)
    config = read_json(tmp_path / "run" / "config.json")
    horizon, gap = config["eval_env"]["max_episode_steps"], config["eval_env"]["value_gap"]
    assert horizon == 100 and gap["score_max_steps"] == 100 and gap["rollout_max_steps"] == 459
    assert gap["reward_abs_max"] == 5.0  # pointmaze-binary: r * 10 - 5 on {0, 1}
    assert seen and all(limit == horizon and n <= horizon for limit, n in seen), seen
    for row in read_metrics(tmp_path / "run"):
        assert row["episode_length"] <= horizon and row["value_gap_steps"] <= 459
        failed = row["success_rate"] == 0.0  # no terminal: the whole rollout, 459 steps
        assert not failed or row["value_gap_steps"] == 459
