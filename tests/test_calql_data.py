"""Cal-QL data: MC returns by hand, binary relabelling, mixed batches, online trajectories."""

from dataclasses import replace
from types import SimpleNamespace

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from conftest import error_of

import calql_finetune as calql

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def args_for(env: str = "pen-binary", **overrides) -> calql.Args:
    return replace(calql.preset_args(env), run_dir="unused", **overrides)


# ---------------------------------------------------------------- Monte-Carlo returns


def test_mc_returns_dense_truncated_trajectory():
    # Time-limit truncation is not terminal: no done flag, the MC tail after T is 0.
    got = calql.mc_returns(np.array([1.0, 2.0, 3.0]), np.zeros(3), gamma=0.5, sparse=False,
                           reward_neg=-5.0)
    np.testing.assert_allclose(got, [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0])


def test_mc_returns_stop_at_terminals():
    # A terminal (done=1) at t=1: G_1 = r_1 only, and G_0 bootstraps from G_1, not beyond.
    got = calql.mc_returns(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0, 1, 0, 0]), gamma=0.5,
                           sparse=False, reward_neg=-5.0)
    np.testing.assert_allclose(got, [1 + 0.5 * 2, 2.0, 3 + 0.5 * 4, 4.0])


def test_mc_returns_sparse_success_and_all_failure_rule():
    gamma = 0.9
    success = calql.mc_returns(np.array([-5.0, -5.0, 5.0]), np.array([0, 0, 1]), gamma,
                               sparse=True, reward_neg=-5.0)
    np.testing.assert_allclose(success, [-5 + 0.9 * (-5 + 0.9 * 5), -5 + 0.9 * 5, 5.0],
                               rtol=1e-6)
    # Every reward is the failure reward: r_neg / (1 - gamma) at EVERY step (not the
    # finite discounted sum), the value of never succeeding.
    failed = calql.mc_returns(np.full(4, -5.0), np.zeros(4), gamma, sparse=True,
                              reward_neg=-5.0)
    np.testing.assert_allclose(failed, np.full(4, -50.0), rtol=1e-6)
    # The rule is for sparse tasks only: a dense task sums what it saw.
    dense = calql.mc_returns(np.full(2, -5.0), np.zeros(2), gamma, sparse=False,
                             reward_neg=-5.0)
    np.testing.assert_allclose(dense, [-5 - 4.5, -5.0])
    assert calql.mc_returns(np.zeros(0), np.zeros(0), gamma, True, -5.0).shape == (0,)


def test_binary_relabel_drops_failures_and_cuts_after_last_success():
    success = np.array([0, 1, 1, 0, 1, 0, 0], bool)
    rewards, terms = calql.binary_relabel(success)
    np.testing.assert_array_equal(rewards, [-1, 0, 0, -1, 0])  # success - 1, cut after t=4
    np.testing.assert_array_equal(terms, [0, 1, 1, 0, 1])  # every success step is terminal
    assert terms[-1] == 1  # a kept trajectory ends at a terminal, never at a truncation
    assert calql.binary_relabel(np.zeros(3, bool)) is None


def test_success_info_accepts_minari_reset_entry():
    steps = 3
    with_reset = calql.step_success({"success": np.array([False, False, True, False])}, steps)
    np.testing.assert_array_equal(with_reset, [False, True, False])
    np.testing.assert_array_equal(calql.step_success({"success": [1, 0, 0]}, steps),
                                  [True, False, False])
    assert calql.step_success({}, steps) is None and calql.step_success(None, steps) is None
    with pytest.raises(SystemExit, match="5 entries for 3 steps"):
        calql.step_success({"success": np.zeros(5)}, steps)


def test_pen_binary_relabelling_on_the_local_pen_dataset(local_dataset):
    ds_id = local_dataset("pen-cloned-local")
    episodes = list(minari.load_dataset(ds_id).iterate_episodes())
    args = args_for("pen-binary", dataset_id=ds_id)
    loaded = calql.load_data(args)
    data, tf, info = loaded.transitions, loaded.tf, loaded.info
    kept = [ep for ep in episodes if ep.infos["success"][1:].any()]
    assert 0 < len(kept) < len(episodes)  # some failures to drop, some successes to keep
    assert info["episodes_in_dataset"] == 40 and info["episodes_kept"] == len(kept)
    lengths = [int(np.flatnonzero(ep.infos["success"][1:])[-1]) + 1 for ep in kept]
    assert any(n < 100 for n in lengths)  # trajectories really are cut
    assert info["transitions"] == len(data["obs"]) == sum(lengths)
    assert set(np.unique(data["rewards"])) == {-5.0, 5.0}  # (success - 1) * 10 + 5
    start = 0
    for ep, n in zip(kept, lengths, strict=True):
        flags = ep.infos["success"][1:n + 1].astype(np.float32)
        sl = slice(start, start + n)
        np.testing.assert_array_equal(data["rewards"][sl], (flags - 1) * 10 + 5)
        np.testing.assert_array_equal(data["dones"][sl], flags)
        np.testing.assert_array_equal(data["obs"][sl], ep.observations[:n].astype(np.float32))
        np.testing.assert_array_equal(data["next_obs"][sl],
                                      ep.observations[1:n + 1].astype(np.float32))
        np.testing.assert_array_equal(data["actions"][sl], ep.actions[:n])
        assert data["rewards"][start + n - 1] == 5.0 and data["dones"][start + n - 1] == 1.0
        # MC returns per trajectory on the scaled rewards, restarting at each success.
        want = np.zeros(n)
        following = 0.0
        for t in reversed(range(n)):
            following = data["rewards"][start + t] + 0.99 * following * (1 - flags[t])
            want[t] = following
        np.testing.assert_allclose(data["mc_returns"][sl], want, rtol=1e-5, atol=1e-4)
        start += n
    assert tf.reward_scale == 10.0 and tf.reward_bias == 5.0


# ---------------------------------------------------------------- buffers


def test_mixed_batches_have_the_requested_ratio():
    n = 500
    offline = calql.ReplayBuffer({k: np.zeros((n, 2) if k in ("obs", "next_obs", "actions")
                                              else n, np.float32) for k in calql.KEYS},
                                 torch.device("cpu"), seed=0)
    traj = {k: np.ones((40, 2) if k in ("obs", "next_obs", "actions") else 40, np.float32)
            for k in calql.KEYS}
    online = calql.OnlineBuffer(traj, torch.device("cpu"), seed=0, capacity=100)
    assert calql.mixed_batch(offline, online, 64, 0.5)["obs"].sum() == 0  # online empty
    online.add_trajectory(traj)
    assert online.size == 40
    for ratio, n_off in ((0.5, 32), (0.25, 16), (0.0, 0), (1.0, 64), (0.3, 19)):
        batch = calql.mixed_batch(offline, online, 64, ratio)
        assert batch["obs"].shape == (64, 2)
        from_offline = int((batch["rewards"] == 0).sum())
        assert from_offline == n_off, ratio
    assert calql.mixed_batch(offline, None, 64, 0.0)["rewards"].sum() == 0  # pre-training


class GoalEnv(gym.Env):
    """1-D toy: the action moves x; success (info) once x >= 1; dense reward -1 per step."""

    observation_space = gym.spaces.Box(-10, 10, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = 0.0
        return np.array([self.x], np.float32), {}

    def step(self, action):
        self.x += 0.4 * float(action[0])
        return np.array([self.x], np.float32), -1.0, False, False, {"success": self.x >= 1.0}


class PushRight(torch.nn.Module):
    """A stand-in actor: always +1 (or -1), log-density 0."""

    def __init__(self, sign: float):
        super().__init__()
        self.sign = sign

    def forward(self, obs):
        return torch.full((obs.shape[0], 1), self.sign), torch.zeros(obs.shape[0])


def test_online_trajectory_ends_at_success_and_gets_its_mc_returns():
    args = args_for("pen-binary", gamma=0.9)
    tf = calql.Transform(np.zeros(1, np.float32), np.ones(1, np.float32), np.ones(1, np.float32),
                         np.zeros(1, np.float32), 10.0, 5.0)
    env = gym.wrappers.TimeLimit(GoalEnv(), max_episode_steps=6)
    agent = SimpleNamespace(actor=PushRight(1.0))
    traj, success = calql.collect_trajectory(agent, env, tf, args, torch.device("cpu"), seed=0)
    assert success and len(traj["rewards"]) == 3  # x = 0.4, 0.8, 1.2: ends AT success
    np.testing.assert_array_equal(traj["rewards"], [-5, -5, 5])
    np.testing.assert_array_equal(traj["dones"], [0, 0, 1])
    np.testing.assert_allclose(traj["mc_returns"], [-5 + 0.9 * (-5 + 4.5), -5 + 4.5, 5.0],
                               rtol=1e-6)
    np.testing.assert_allclose(traj["next_obs"][:, 0], [0.4, 0.8, 1.2], rtol=1e-6)
    agent = SimpleNamespace(actor=PushRight(-1.0))  # never succeeds: time limit, all-failure
    traj, success = calql.collect_trajectory(agent, env, tf, args, torch.device("cpu"), seed=1)
    assert not success and len(traj["rewards"]) == 6 and not traj["dones"].any()
    np.testing.assert_allclose(traj["mc_returns"], np.full(6, -5 / 0.1), rtol=1e-6)
    online = calql.OnlineBuffer(traj, torch.device("cpu"), seed=0, capacity=10)
    online.add_trajectory(traj)
    np.testing.assert_allclose(online.data["mc_returns"][:6].numpy(), traj["mc_returns"])
    assert online.data["mc_returns"][6:].abs().sum() == 0
    with pytest.raises(SystemExit, match="online buffer full"):
        online.add_trajectory(traj)


# ---------------------------------------------------------------- a dataset that is not there
def test_a_mistyped_remote_id_gives_the_download_error_and_the_closest_preset_id(
        offline_minari, tmp_path):
    line = error_of(calql, ["--dataset-id", "D4RL/door/clonned-v2",
                            "--run-dir", str(tmp_path / "run")])
    root = tmp_path / "datasets"
    assert line == (f"error: dataset D4RL/door/clonned-v2 is not under {root} and could not be "
                    "downloaded (ConnectionError: [Errno -2] Name or service not known); no "
                    "preset names it: did you mean D4RL/door/cloned-v2? (get it with `minari "
                    "download D4RL/door/cloned-v2` on a machine with network and copy its "
                    f"~/.minari/datasets/D4RL/door/cloned-v2 to {root}/D4RL/door/cloned-v2 "
                    "here; `minari list remote` (with network) lists Minari's ids)")
    assert offline_minari == ["D4RL/door/clonned-v2"]


def test_a_mistyped_local_id_gives_the_closest_one_and_a_build_command_that_works(
        offline_minari, datasets_cli, tmp_path):
    line = error_of(calql, ["--dataset-id", "local/pointmaze/sprase-v0",
                            "--run-dir", str(tmp_path / "run")])
    assert line.endswith("no preset names it: did you mean local/pointmaze/sparse-v0? (build it "
                         "with: python benchmark/datasets.py local/pointmaze/sparse-v0; `python "
                         "benchmark/datasets.py --list` lists the local datasets it builds)"), line
    assert offline_minari == []  # a local id is never downloaded
    local = sorted(ds for ds, _ in calql.ENVS.values() if ds.startswith("local/"))
    command = "build it with: python benchmark/datasets.py "
    names = [calql.how_to_get(ds).removeprefix(command) for ds in local]
    assert local == ["local/pointmaze/sparse-v0"] and datasets_cli(*names) == local


# ------------------------------------------------ families: named by id, success scores first


def test_each_dataset_id_names_its_family_as_in_cql_sac():
    import cql_sac_continuous as cql

    for ds_id, family in [("mujoco/hopper/medium-v0", "gym"), ("D4RL/pen/cloned-v2", "adroit"),
                          ("D4RL/hammer/human-v2", "adroit"), ("D4RL/kitchen/mixed-v2", "kitchen"),
                          ("D4RL/antmaze/umaze-v1", "antmaze"), ("local/pointmaze/sparse-v0", None),
                          ("D4RL/penx/a-v0", None)]:
        assert calql.family_name(ds_id) == cql.family_name(ds_id) == family, ds_id
    assert set(calql.FAMILIES) - {""} == set(cql.FAMILIES)


def test_calql_scores_the_success_rate_first_then_the_family_then_the_return():
    """success_first over each family: a reported success rate scores (x100) wherever it is;
    without one, the family's score (kitchen: tasks x 25; reference scores), else the mean
    return (the generic path without references)."""
    returns, plain = np.array([1.0, 3.0]), [{}, {}]
    assert calql.family_of("antmaze").score({}, returns, 0.5, plain) == (50.0, {})
    assert calql.family_of("kitchen").score({}, returns, 0.25, plain) == (25.0, {})
    assert calql.family_of(None).score({}, returns, None, plain) == (2.0, {})  # mean return
    refs = dict(ref_min_score=0.0, ref_max_score=4.0)
    assert calql.family_of("gym").score(refs, returns, None, plain) == (50.0, {})
    done = [{"episode_task_completions": ["microwave", "kettle"]}, {"episode_task_completions":
                                                                    ["microwave"]}]
    score, extra = calql.family_of("kitchen").score(refs, returns, None, done)
    assert score == 25.0 * 1.5 and extra["tasks_completed"] == 1.5


def test_a_dataset_without_an_env_spec_is_refused_in_one_line():
    dataset = SimpleNamespace(env_spec=None, storage=SimpleNamespace(metadata=dict(
        dataset_id="someone/x/y-v0")))
    with pytest.raises(SystemExit, match="someone/x/y-v0 records no environment"):
        calql.eval_env_description(dataset, args_for())
