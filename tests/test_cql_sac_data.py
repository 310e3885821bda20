"""CQL-SAC data handling against hand-made episodes, presets and the device replay buffer."""

from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import error_of

import cql_sac_continuous as cql


def episode(obs, terminated: bool, truncated: bool, action_dim: int = 2):
    steps = len(obs) - 1 if not isinstance(obs, dict) else len(next(iter(obs.values()))) - 1
    term = np.zeros(steps, bool)
    trunc = np.zeros(steps, bool)
    term[-1], trunc[-1] = terminated, truncated
    return SimpleNamespace(observations=obs, actions=np.arange(steps * action_dim,
                                                               dtype=np.float32
                                                               ).reshape(steps, action_dim),
                           rewards=np.arange(steps, dtype=np.float32) + 1.0,
                           terminations=term, truncations=trunc)


def test_termination_is_done_truncation_is_not():
    obs_a = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)  # T+1 = 4 observations
    obs_b = 100 + np.arange(3 * 3, dtype=np.float32).reshape(3, 3)
    data = cql.episodes_to_transitions([episode(obs_a, True, False),
                                        episode(obs_b, False, True)])
    assert data["obs"].shape == (5, 3)
    np.testing.assert_array_equal(data["dones"], [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(data["timeouts"], [0, 0, 0, 0, 1])
    # next_obs comes from each episode's own T+1 observations, never from the next episode.
    np.testing.assert_array_equal(data["next_obs"][2], obs_a[3])
    np.testing.assert_array_equal(data["next_obs"][4], obs_b[2])
    np.testing.assert_array_equal(data["obs"][3], obs_b[0])
    np.testing.assert_array_equal(data["rewards"], [1, 2, 3, 1, 2])
    np.testing.assert_array_equal(data["episode_returns"], [6, 3])


def test_dict_observations_flatten_identically_for_dataset_and_env():
    steps = 3
    obs = {"observation": np.arange((steps + 1) * 4).reshape(steps + 1, 4),
           "desired_goal": 50 + np.arange((steps + 1) * 2).reshape(steps + 1, 2),
           "achieved_goal": {"b": np.full((steps + 1, 1), 7), "a": np.full((steps + 1, 1), 9)}}
    data = cql.episodes_to_transitions([episode(obs, False, True)])
    assert data["obs"].shape == (steps, 8)
    # sorted keys, recursively: achieved_goal.a, achieved_goal.b, desired_goal, observation
    np.testing.assert_array_equal(data["obs"][1], [9, 7, 52, 53, 4, 5, 6, 7])
    single = {k: ({kk: vv[1] for kk, vv in v.items()} if isinstance(v, dict) else v[1])
              for k, v in obs.items()}  # what the evaluation env returns at step 1
    np.testing.assert_array_equal(cql.flatten_obs(single), data["obs"][1])


def test_observation_count_mismatch_is_refused():
    bad = episode(np.zeros((4, 3), np.float32), False, True)
    bad.actions = bad.actions[:2]
    with pytest.raises(SystemExit, match="expected T\\+1"):
        cql.episodes_to_transitions([bad])


def test_non_finite_data_is_refused_naming_the_field():
    data = cql.episodes_to_transitions([episode(np.zeros((4, 3), np.float32), False, True)])
    data["rewards"][1] = np.nan
    with pytest.raises(SystemExit, match="'rewards'"):
        cql.check_finite(data, "local/x/y-v0")


def box(low: float, high: float, dim: int = 2) -> gym.spaces.Box:
    return gym.spaces.Box(low, high, (dim,), np.float32)


def test_transform_rewards_states_and_actions():
    obs = np.array([[0, 0], [1, 2], [2, 4], [3, 6]], np.float32)
    data = cql.episodes_to_transitions([episode(obs, False, True)])
    data["actions"] = np.array([[-2, 2], [0, 1], [1, -2]], np.float32)
    data["episode_returns"] = np.array([10.0, -40.0])
    args = cql.replace(cql.preset_args("pendulum-medium"), normalize_states=True,
                       reward_mode="locomotion")
    tf = cql.make_transform(data, box(-2, 2), args)
    assert tf.reward_scale == pytest.approx(1000 / 50) and tf.reward_bias == 0.0
    np.testing.assert_allclose(tf.obs_mean, [1, 2])
    np.testing.assert_allclose(tf.obs_std, np.array([np.std([0, 1, 2]), np.std([0, 2, 4])]) + 1e-3)
    out = cql.apply_transform(data, tf)
    np.testing.assert_allclose(out["actions"], [[-1, 1], [0, 0.5], [0.5, -1]])
    np.testing.assert_allclose(out["rewards"], np.array([1, 2, 3]) * 20.0)
    np.testing.assert_allclose(tf.to_env_action(out["actions"]), data["actions"])
    np.testing.assert_allclose(out["next_obs"][0], tf.obs(obs[1]))
    bias = cql.make_transform(data, box(0, 4), cql.replace(
        args, reward_mode="scale_bias", reward_scale=10.0, reward_bias=-5.0))
    assert bias.reward(np.array([0.0, 1.0])).tolist() == [-5.0, 5.0]
    np.testing.assert_allclose(bias.to_env_action(np.array([-1.0, 1.0])), [0.0, 4.0])


def test_replay_buffer_samples_real_rows_deterministically():
    data = dict(obs=np.arange(100, dtype=np.float32)[:, None],
                rewards=np.arange(100, dtype=np.float32) * 2)
    a = cql.ReplayBuffer(data, torch.device("cpu"), seed=3)
    b = cql.ReplayBuffer(data, torch.device("cpu"), seed=3)
    s1, s2 = a.sample(64), b.sample(64)
    torch.testing.assert_close(s1["obs"], s2["obs"])
    torch.testing.assert_close(s1["rewards"], s1["obs"][:, 0] * 2)  # rows stay aligned
    assert len(torch.unique(s1["obs"])) > 30
    assert not torch.equal(a.sample(64)["obs"], s1["obs"])


def test_load_data_on_local_pendulum(local_dataset):
    local_dataset("pendulum-medium")
    args = cql.preset_args("pendulum-medium")
    data = cql.load_data(args)
    tf, info = data.tf, data.info
    assert info["transitions"] == 20_000 and info["episodes"] == 100
    assert (info["obs_dim"], info["action_dim"]) == (3, 1)
    assert info["ref_min_score"] < info["ref_max_score"] < 0
    transitions = data.transitions
    assert np.abs(transitions["actions"]).max() <= 1.0
    assert transitions["dones"].sum() == 0  # time limits only
    assert float(tf.action_scale[0]) == 2.0
    env = cql.make_eval_env(data.eval_env)
    assert env.spec.id == "Pendulum-v1" and env.spec.max_episode_steps == 200


# ---------------------------------------------------------------- a dataset that is not there
def test_a_mistyped_remote_id_gives_the_download_error_and_the_closest_preset_id(
        offline_minari, tmp_path):
    line = error_of(cql, ["--dataset-id", "mujoco/hoper/medium-v0",
                          "--run-dir", str(tmp_path / "run")])
    root = tmp_path / "datasets"
    assert line.startswith(f"error: dataset mujoco/hoper/medium-v0 is not under {root} and "
                           "could not be downloaded (ConnectionError: [Errno -2] Name or "
                           "service not known); no preset names it: did you mean "
                           "mujoco/hopper/medium-v0? (get it with `minari download "
                           "mujoco/hopper/medium-v0` on a machine with network and copy its "
                           f"~/.minari/datasets/mujoco/hopper/medium-v0 to {root}/mujoco/"
                           "hopper/medium-v0 here; `minari list remote`"), line
    assert "while requesting" not in line and "download mujoco/hoper" not in line
    assert offline_minari == ["mujoco/hoper/medium-v0"]  # it may be an id no preset names


def test_a_preset_remote_id_gets_its_download_command_and_minaris_default_folder(
        offline_minari, tmp_path, monkeypatch):
    monkeypatch.delenv("MINARI_DATASETS_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))  # Minari's default: ~/.minari/datasets
    line = error_of(cql, ["--env", "hopper-medium", "--run-dir", str(tmp_path / "run")])
    assert line == ("error: dataset mujoco/hopper/medium-v0 is not under ~/.minari/datasets and "
                    "could not be downloaded (ConnectionError: [Errno -2] Name or service not "
                    "known); get it with `minari download mujoco/hopper/medium-v0` on a machine "
                    "with network and copy its ~/.minari/datasets/mujoco/hopper/medium-v0 to "
                    "~/.minari/datasets/mujoco/hopper/medium-v0 here")


def test_a_mistyped_local_id_gives_the_closest_one_and_a_build_command_that_works(
        offline_minari, datasets_cli, tmp_path):
    line = error_of(cql, ["--dataset-id", "local/pendulum/expret-v0",
                          "--run-dir", str(tmp_path / "run")])
    assert line == (f"error: dataset local/pendulum/expret-v0 is not under {tmp_path / 'datasets'}"
                    "; no preset names it: did you mean local/pendulum/expert-v0? (build it "
                    "with: python benchmark/datasets.py local/pendulum/expert-v0; `python "
                    "benchmark/datasets.py --list` lists the local datasets it builds)")
    assert offline_minari == []  # a local id is never downloaded
    with pytest.raises(SystemExit) as typo:  # what the typo's own build command answers
        datasets_cli("local/pendulum/expret-v0")
    assert typo.value.code == 2
    assert datasets_cli("local/pendulum/expert-v0") == ["local/pendulum/expert-v0"]


def test_an_id_close_to_no_preset_id_points_to_minaris_list(offline_minari, tmp_path):
    line = error_of(cql, ["--dataset-id", "foo/bar/baz-v0", "--run-dir", str(tmp_path / "run")])
    assert line.endswith("(ConnectionError: [Errno -2] Name or service not known); no preset "
                         "names it or an id close to it; `minari list remote` (with network) "
                         "lists Minari's ids"), line


def test_the_build_command_of_each_local_preset_dataset_is_one_benchmark_datasets_takes(
        datasets_cli):
    local = sorted(ds for ds, _ in cql.ENVS.values() if ds.startswith("local/"))
    command = "build it with: python benchmark/datasets.py "
    names = [cql.how_to_get(ds).removeprefix(command) for ds in local]
    assert len(local) == 5 and datasets_cli(*names) == local


def marked_cells(spec) -> dict[str, tuple[int, int]]:
    """The start (r) and goal (g) cells of an eval spec's maze map."""
    return {c: (i, j) for i, row in enumerate(spec.kwargs["maze_map"]) for j, c in
            enumerate(row) if isinstance(c, str)}


def test_antmaze_umaze_diverse_gets_umaze_start_and_goal():
    """The U-maze data map with its goal cell (umaze) and without it (umaze-diverse, whose
    registered map has none): the eval spec's cells (tests/twins.py, Minari's EVAL_ENV_MAPS)
    land on the same data cells, start (3, 1) and goal (1, 1), as D4RL's umaze and
    umaze-diverse share their goal (antmaze_eval_spec: the same code in Cal-QL)."""
    from twins import ANTMAZE_EVAL_MAPS, ANTMAZE_UMAZE_DATA_MAP

    bare = [[1 if c == 1 else 0 for c in row] for row in ANTMAZE_UMAZE_DATA_MAP]
    eval_spec = gym.envs.registration.EnvSpec("AntMaze_UMaze-v5", max_episode_steps=700,
                                              kwargs={"maze_map": ANTMAZE_EVAL_MAPS["umaze"]})
    for data_map in (ANTMAZE_UMAZE_DATA_MAP, bare):
        data_spec = gym.envs.registration.EnvSpec("AntMaze_UMaze-v5", max_episode_steps=1000,
                                                  kwargs={"maze_map": data_map})
        assert marked_cells(cql.antmaze_eval_spec(data_spec, eval_spec)) == {
            "r": (3, 1), "g": (1, 1)}


@pytest.mark.parametrize("env_id, maze, start, goal", [
    ("AntMaze_Medium-v4", "medium", (1, 1), (6, 6)),
    ("AntMaze_Medium_Diverse_GR-v4", "medium", (1, 1), (6, 6)),
    ("AntMaze_Large-v4", "large", (1, 1), (7, 9)),
    ("AntMaze_Large_Diverse_GR-v4", "large", (1, 1), (7, 9)),
])
def test_antmaze_medium_and_large_keep_the_eval_cells(env_id, maze, start, goal):
    """The registered data mazes of Minari's medium/large datasets (their generation script's
    DATASET_ID_TO_ENV_ID) have the eval maps' walls: the eval cells stay where they are."""
    from twins import ANTMAZE_EVAL_MAPS

    cql.register_robotics_envs(env_id)
    data_spec = gym.spec(env_id)
    eval_spec = gym.envs.registration.EnvSpec(env_id, max_episode_steps=1000,
                                              kwargs={"maze_map": ANTMAZE_EVAL_MAPS[maze]})
    spec = cql.antmaze_eval_spec(data_spec, eval_spec)
    assert marked_cells(spec) == {"r": start, "g": goal} and spec.max_episode_steps == 1000
    assert spec.kwargs["continuing_task"] is False
