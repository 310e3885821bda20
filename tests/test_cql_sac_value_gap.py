"""CQL-SAC's value gap (issue 17 item 3, paper Table 4): Q(s0, pi(s0)) against the discounted
return of one rollout long enough that the return left out is below GAP_TAIL (1%) of the
return scale, past the time limit and ending only at a true termination, while the score
keeps the family's horizon. CPU stub envs, no training."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import cql_sac_continuous as cql

GAMMA = 0.99


def test_gap_horizon_is_the_fewest_steps_below_the_tail_fraction():
    assert cql.GAP_TAIL == 0.01
    assert cql.gap_horizon(GAMMA) == 459
    assert GAMMA**459 < cql.GAP_TAIL <= GAMMA**458
    assert (cql.gap_horizon(0.9), cql.gap_horizon(0.995)) == (44, 919)
    assert cql.gap_horizon(0.0) == 1 and cql.gap_horizon(1.0) is None
    for gamma in (0.5, 0.9, 0.97, 0.99, 0.995, 0.999):
        h = cql.gap_horizon(gamma)
        assert gamma**h <= cql.GAP_TAIL < gamma**(h - 1), gamma


def test_tail_bound_and_the_config_block():
    assert cql.gap_tail_bound(GAMMA, 459, 2.0) == pytest.approx(GAMMA**459 * 2.0 / 0.01)
    assert cql.gap_tail_bound(1.0, 10, 1.0) is None and cql.gap_tail_bound(1.0, 10, 0.0) == 0
    block = cql.value_gap_spec(GAMMA, 200, np.array([0.5, -3.0, 1.0], np.float32))
    assert block == dict(
        horizon=459, rule="ceil(log(0.01) / log(gamma))", tail_fraction=0.01,
        score_max_steps=200, rollout_max_steps=459, runs_past_time_limit=True,
        reward_abs_max=3.0, tail_bound=pytest.approx(GAMMA**459 * 3.0 / 0.01),
        note=block["note"])
    assert "value_gap_tail_bound" in block["note"]
    longer = cql.value_gap_spec(GAMMA, 1000, np.ones(3))  # gym: the score horizon is longer
    assert longer["rollout_max_steps"] == 1000 and not longer["runs_past_time_limit"]
    assert cql.value_gap_spec(1.0, 200, np.ones(3))["rollout_max_steps"] == 200  # no horizon


class MinusOne(gym.Env):
    """Reward -1 at every step; terminates at `end` (None: never); truncates by itself at
    `cut` (None: never), a limit the time limit cannot lift."""

    observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    def __init__(self, end: int | None = None, cut: int | None = None):
        self.end, self.cut = end, cut

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self.t += 1
        return (np.zeros(3, np.float32), -1.0, self.t == self.end, self.t == self.cut,
                {"t": self.t})


gym.register("CqlSacGapMinusOne-v0", entry_point=MinusOne, max_episode_steps=200)


def evaluate(env_kwargs: dict, score_steps: int = 200, reward_scale: float = 1.0) -> dict:
    """Evaluate an untrained agent on MinusOne built as main builds it (make_eval_env with
    the gap's rollout limit), rewards as trained = raw (-1) x reward_scale."""
    torch.manual_seed(0)
    args = cql.replace(cql.preset_args("pendulum-medium"), actor_hidden_dims=(8,),
                       critic_hidden_dims=(8,), eval_episodes=2, gamma=GAMMA)
    gap = cql.value_gap_spec(GAMMA, score_steps, np.array([-1.0], np.float32))
    spec = dict(id="CqlSacGapMinusOne-v0", max_episode_steps=score_steps, kwargs=env_kwargs)
    env = cql.make_eval_env(spec, gap["rollout_max_steps"])
    assert env.spec.max_episode_steps == gap["rollout_max_steps"] == 459
    tf = cql.Transform(np.zeros(3, np.float32), np.ones(3, np.float32), np.ones(2, np.float32),
                       np.zeros(2, np.float32), reward_scale, 0.0)
    out = cql.evaluate(cql.Agent(3, 2, args), env, tf, args, {}, torch.device("cpu"), gap)
    env.close()
    return out


def test_the_gap_runs_past_the_time_limit_and_the_score_does_not():
    out = evaluate({})
    assert out["return_mean"] == -200.0 and out["episode_length"] == 200  # the score's horizon
    assert out["value_gap_steps"] == 459
    obtained = -(1 - GAMMA**459) / (1 - GAMMA)  # sum_{t<459} gamma^t (-1)
    assert out["value_gap"] == pytest.approx(out["q_pred_s0"] - obtained, abs=1e-9)
    assert out["value_gap_tail_bound"] == pytest.approx(GAMMA**459 / (1 - GAMMA))  # <= 1%
    assert out["value_gap_tail_bound"] < cql.GAP_TAIL / (1 - GAMMA)
    assert out["value_gap_return"] == out["value_gap"]  # rewards not scaled


def test_the_gap_in_return_units_is_the_gap_over_the_reward_scale():
    out = evaluate({}, reward_scale=0.1)
    obtained = -0.1 * (1 - GAMMA**459) / (1 - GAMMA)  # in training-reward (Q) units
    assert out["value_gap"] == pytest.approx(out["q_pred_s0"] - obtained, abs=1e-9)
    assert out["value_gap_return"] == pytest.approx(out["value_gap"] / 0.1)
    assert out["return_mean"] == -200.0  # the score's return: raw rewards


def test_a_true_termination_ends_the_rollout_with_no_tail():
    out = evaluate(dict(end=3))
    assert out["value_gap_steps"] == 3 and out["value_gap_tail_bound"] == 0.0
    assert out["return_mean"] == -3.0 and out["episode_length"] == 3
    obtained = -(1 + GAMMA + GAMMA**2)
    assert out["value_gap"] == pytest.approx(out["q_pred_s0"] - obtained, abs=1e-9)


def test_a_termination_after_the_score_horizon_ends_the_gap_only():
    out = evaluate(dict(end=300))
    assert out["return_mean"] == -200.0 and out["episode_length"] == 200
    assert out["value_gap_steps"] == 300 and out["value_gap_tail_bound"] == 0.0


def test_an_env_that_cannot_run_past_its_own_limit_records_the_tail_bound():
    out = evaluate(dict(cut=250))
    assert out["return_mean"] == -200.0 and out["value_gap_steps"] == 250
    assert out["value_gap_tail_bound"] == pytest.approx(GAMMA**250 / (1 - GAMMA))
    obtained = -(1 - GAMMA**250) / (1 - GAMMA)
    assert out["value_gap"] == pytest.approx(out["q_pred_s0"] - obtained, abs=1e-9)
