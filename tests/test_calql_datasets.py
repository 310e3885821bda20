"""The local sparse-reward datasets of benchmark/datasets.py used by calql_finetune.py."""

import minari
import numpy as np

from benchmark import datasets


def test_ids_and_specs():
    assert datasets.dataset_id("pointmaze-sparse") == "local/pointmaze/sparse-v0"
    assert datasets.dataset_id("pen-cloned-local") == "local/pen/cloned-v0"
    assert datasets.LOCAL_DATASETS["pen-cloned-local"].record_success
    assert not datasets.LOCAL_DATASETS["pendulum-medium"].record_success  # others unchanged


def test_pointmaze_sparse_structure(local_dataset):
    dataset = minari.load_dataset(local_dataset("pointmaze-sparse"))
    env = dataset.recover_environment(eval_env=True)
    assert env.spec.id == "PointMaze_UMaze-v3" and env.spec.max_episode_steps == 100
    assert env.spec.kwargs["continuing_task"] is False
    assert env.spec.kwargs["maze_map"] == datasets.POINTMAZE_CORRIDOR
    episodes = list(dataset.iterate_episodes())
    assert len(episodes) == 100
    reached = []
    for k, ep in enumerate(episodes):
        n = len(ep.rewards)
        success = ep.infos["success"]
        assert success.shape == (n + 1,) and not success[0]  # reset entry first
        assert ep.observations["observation"].shape == (n + 1, 4)
        # The episode ends at the goal (a termination with success) or at the time limit.
        assert ep.terminations[-1] == success[-1] and not ep.terminations[:-1].any()
        assert not success[1:-1].any()
        assert ep.terminations[-1] or (ep.truncations[-1] and n == 100)
        np.testing.assert_array_equal(ep.rewards, success[1:].astype(float))  # sparse reward
        reached.append(bool(success[-1]))
        if k < 3:  # initial states are the evaluation env's own resets
            obs, _ = env.reset(seed=k)
            np.testing.assert_array_equal(ep.observations["observation"][0], obs["observation"])
    assert 0.3 < np.mean(reached) < 0.7  # mediocre: room for online improvement


def test_pen_cloned_local_has_the_d4rl_pen_structure(local_dataset):
    dataset = minari.load_dataset(local_dataset("pen-cloned-local"))
    env = dataset.recover_environment(eval_env=True)
    assert env.spec.id == "AdroitHandPen-v1" and env.spec.max_episode_steps == 100
    assert dataset.total_episodes == 40 and dataset.total_steps == 4000
    episodes = list(dataset.iterate_episodes())
    succeeded = []
    for ep in episodes:
        assert ep.observations.shape == (101, 45) and ep.actions.shape == (100, 24)
        assert not ep.terminations.any() and ep.truncations[-1] and not ep.truncations[:-1].any()
        assert ep.infos["success"].shape == (101,) and ep.infos["success"].dtype == bool
        assert np.all(np.abs(ep.actions) <= 1.0)
        succeeded.append(ep.infos["success"].any())
    assert 2 <= sum(succeeded) <= 20  # some to keep, more to drop
    # Dense rewards are stored (the binary relabelling happens in calql_finetune.py) ...
    rewards = np.concatenate([ep.rewards for ep in episodes])
    assert len(np.unique(np.round(rewards, 3))) > 100
    # ... and the success flags are the environment's own: replay one successful episode.
    ep = episodes[int(np.flatnonzero(succeeded)[0])]
    obs, _ = env.reset(seed=int(np.flatnonzero(succeeded)[0]))
    np.testing.assert_allclose(ep.observations[0], obs)
    flags = [env.step(a)[4]["success"] for a in ep.actions]
    np.testing.assert_array_equal(flags, ep.infos["success"][1:])
