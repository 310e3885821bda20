"""Each schema twin (tests/twins.py) has the structure its real Minari dataset has."""

import json
import os

import numpy as np
import pytest
from twins import ANTMAZE_GOAL_RADIUS, D4RL_ADROIT_REFS, FACTS, TWINS, cache_root

IDS = list(FACTS)
NEVER_TERMINATED = [i for i in IDS if FACTS[i]["never_terminated"]]


def load(twin, dataset_id):
    import minari

    return minari.load_dataset(twin(dataset_id))


def episodes(ds):
    return list(ds.iterate_episodes())


def test_twins_cover_every_family():
    assert set(TWINS.values()) == {"mujoco", "antmaze", "adroit", "kitchen", "atari"}
    for ds_id in ["mujoco/hopper/medium-v0", "D4RL/antmaze/umaze-v1",
                  "D4RL/antmaze/medium-play-v1", "D4RL/pen/cloned-v2", "D4RL/door/cloned-v2",
                  "D4RL/relocate/cloned-v2", "D4RL/hammer/cloned-v2", "D4RL/kitchen/complete-v2",
                  "atari/breakout/expert-v0"]:
        assert ds_id in TWINS


def test_fixture_points_minari_at_the_twins(twin):
    ds_id = twin("D4RL/pen/cloned-v2")
    assert ds_id == "D4RL/pen/cloned-v2"
    root = os.environ["MINARI_DATASETS_PATH"]
    assert root == str(cache_root(os.path.dirname(os.path.dirname(__file__))))
    import minari

    assert ds_id in minari.list_local_datasets()


@pytest.mark.parametrize("ds_id", IDS)
def test_env_spec(twin, ds_id):
    facts, ds = FACTS[ds_id], load(twin, ds_id)
    spec = ds.spec.env_spec
    assert spec.id == facts["env_id"]
    assert spec.max_episode_steps == facts["max_episode_steps"]
    for key, value in facts["env_kwargs"].items():
        assert spec.kwargs[key] == value, key
    if facts["family"] == "atari":  # sticky actions 0, frame-skip 4, raw RGB frames
        assert spec.kwargs["repeat_action_probability"] == 0
        assert spec.kwargs["frameskip"] == 4


@pytest.mark.parametrize("ds_id", IDS)
def test_eval_env_spec_and_reference_scores(twin, ds_id):
    facts, ds = FACTS[ds_id], load(twin, ds_id)
    meta = ds.storage.metadata
    assert ("eval_env_spec" in meta) == (facts["eval_env"] is not None)
    assert ("ref_min_score" in meta and "ref_max_score" in meta) == facts["has_ref_scores"]
    if facts["family"] == "adroit":
        assert (meta["ref_min_score"], meta["ref_max_score"]) == D4RL_ADROIT_REFS[facts["task"]]
    if facts["eval_env"] is not None:
        spec = json.loads(meta["eval_env_spec"])
        assert spec["id"] == facts["eval_env"]["id"]
        assert spec["max_episode_steps"] == facts["eval_env"]["max_episode_steps"]
        assert spec["kwargs"]["continuing_task"] is True
        assert spec["kwargs"]["reset_target"] is False
        eval_map = spec["kwargs"]["maze_map"]
        assert eval_map == facts["eval_env"]["kwargs_update"]["maze_map"]
        assert sum(row.count("r") for row in eval_map) == sum(row.count("g") for row in eval_map)
        assert meta["ref_max_score"] > meta["ref_min_score"]


def walls(maze_map):
    return np.array([[cell == 1 for cell in row] for row in maze_map])


def test_antmaze_umaze_eval_walls_mirror_the_data_maze(twin):
    ds = load(twin, "D4RL/antmaze/umaze-v1")
    data_walls = walls(ds.spec.env_spec.kwargs["maze_map"])
    eval_walls = walls(json.loads(ds.storage.metadata["eval_env_spec"])["kwargs"]["maze_map"])
    assert not np.array_equal(eval_walls, data_walls)
    np.testing.assert_array_equal(eval_walls, data_walls[:, ::-1])  # Minari #304


def test_antmaze_medium_eval_walls_equal_the_data_maze(twin):
    ds = load(twin, "D4RL/antmaze/medium-play-v1")
    eval_map = json.loads(ds.storage.metadata["eval_env_spec"])["kwargs"]["maze_map"]
    np.testing.assert_array_equal(walls(eval_map), walls(ds.spec.env_spec.kwargs["maze_map"]))


def _shapes(obs):
    if isinstance(obs, dict):
        return {k: _shapes(v) for k, v in obs.items()}
    return obs.shape[1:]


@pytest.mark.parametrize("ds_id", IDS)
def test_spaces_and_infos(twin, ds_id):
    facts, ds = FACTS[ds_id], load(twin, ds_id)
    for ep in episodes(ds):
        steps = len(ep.rewards)
        assert ep.actions.shape == (steps, *facts["action_shape"])
        if facts["obs_shape"] is not None:
            assert _shapes(ep.observations) == facts["obs_shape"]
        if facts["family"] == "kitchen":
            tasks = set(facts["env_kwargs"]["tasks_to_complete"])
            assert set(ep.observations["achieved_goal"]) == tasks
            assert set(ep.observations["desired_goal"]) == tasks
            assert ep.observations["observation"].shape == (steps + 1, 59)
        if facts["family"] == "atari":
            assert ep.observations.dtype == np.uint8
            assert ep.observations.shape[0] == steps + 1
        infos = ep.infos or {}
        assert tuple(sorted(infos)) == tuple(sorted(facts["info_keys"]))
        for key, value in infos.items():
            assert len(value) == steps + 1, key  # the reset's info first, as DataCollector
    assert str(ds.action_space).startswith("Discrete" if facts["family"] == "atari" else "Box")


@pytest.mark.parametrize("ds_id", IDS)
def test_episode_ends(twin, ds_id):
    facts, ds = FACTS[ds_id], load(twin, ds_id)
    eps = episodes(ds)
    for ep in eps:
        ends = ep.terminations | ep.truncations
        assert ends[-1] and not ends[:-1].any()
        assert not (ep.terminations[-1] and ep.truncations[-1])
    if facts["never_terminated"]:
        assert not any(ep.terminations.any() for ep in eps)
        assert tuple(len(ep.rewards) for ep in eps) == facts["episode_lengths"]
    if facts["family"] == "atari":  # game over
        assert all(ep.terminations[-1] for ep in eps)
    if facts["family"] == "mujoco":  # falls (terminated) and the 1000-step limit (truncated)
        assert any(ep.terminations[-1] for ep in eps)
        assert any(ep.truncations[-1] and len(ep.rewards) == 1000 for ep in eps)


def test_adroit_episodes_may_outlast_the_spec_limit(twin):
    for task in ("door", "hammer"):  # Minari #303: door up to 300, hammer up to 624 steps
        ds = load(twin, f"D4RL/{task}/cloned-v2")
        assert max(len(ep.rewards) for ep in episodes(ds)) > ds.spec.env_spec.max_episode_steps
    ds = load(twin, "D4RL/pen/cloned-v2")
    assert {len(ep.rewards) for ep in episodes(ds)} == {100, 150}


@pytest.mark.parametrize("ds_id", [i for i in IDS if TWINS[i] == "antmaze"])
def test_antmaze_reward_is_one_within_the_goal_radius(twin, ds_id):
    ds = load(twin, ds_id)
    at_goal = 0
    for ep in episodes(ds):
        obs = ep.observations
        dist = np.linalg.norm(obs["achieved_goal"][1:] - obs["desired_goal"][1:], axis=-1)
        np.testing.assert_array_equal(ep.rewards, (dist <= ANTMAZE_GOAL_RADIUS).astype(float))
        np.testing.assert_array_equal(ep.infos["goal"], obs["desired_goal"])  # never moves
        assert np.all(obs["desired_goal"] == obs["desired_goal"][0])
        np.testing.assert_array_equal(ep.infos["qpos"][:, :2], obs["achieved_goal"])
        at_goal += int(ep.rewards.sum())
    assert at_goal > 0


@pytest.mark.parametrize("ds_id", [i for i in IDS if TWINS[i] == "kitchen"])
def test_kitchen_reward_counts_completed_goal_tasks(twin, ds_id):
    ds = load(twin, ds_id)
    for ep in episodes(ds):
        ach, des = ep.observations["achieved_goal"], ep.observations["desired_goal"]
        done = sum((np.linalg.norm(ach[t][1:] - des[t][1:], axis=-1) < 0.3).astype(float)
                   for t in ach)  # gymnasium_robotics kitchen_env BONUS_THRESH
        np.testing.assert_array_equal(ep.rewards, done)


def test_adroit_rewards_are_dense(twin):
    for task in D4RL_ADROIT_REFS:
        ds = load(twin, f"D4RL/{task}/cloned-v2")
        for ep in episodes(ds):
            assert len(np.unique(ep.rewards)) > 10
            assert not ep.infos["success"][0]  # the reset's success is False
