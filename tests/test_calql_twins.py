"""Cal-QL on the schema twins of the real Minari datasets (issue 8): each preset family runs
offline + online steps end to end on its twin, and the tests assert what evaluation sees
(maze, horizon, termination at success, score scale) and what the data becomes (terminals,
MC returns, success_in_data)."""

import json
from dataclasses import replace

import minari
import numpy as np
import pytest

import calql_finetune as calql

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UMAZE, MEDIUM = "D4RL/antmaze/umaze-v1", "D4RL/antmaze/medium-play-v1"


def tiny(env: str, run_dir, **overrides) -> calql.Args:
    """The preset of `env` with tiny networks and a few steps of each phase."""
    base = dict(run_dir=str(run_dir), actor_hidden_dims=(8,), critic_hidden_dims=(8,),
                batch_size=16, cql_n_actions=2, eval_episodes=1, offline_steps=4,
                offline_eval_every=2, online_steps=1, eval_every=10_000, log_every=2,
                progress=False)
    return replace(calql.preset_args(env), **{**base, **overrides})


def cells(maze_map, kind):
    return [(i, j) for i, row in enumerate(maze_map) for j, c in enumerate(row) if c == kind]


def walls(maze_map):
    """1 = wall, 0 = free (start, goal and combined cells are free)."""
    return [[1 if c == 1 else 0 for c in row] for row in maze_map]


def read_run(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return config, rows


# ---------------------------------------------------------------------------- AntMaze
@pytest.mark.parametrize("env, ds_id, steps, start, goal", [
    ("antmaze-umaze", UMAZE, 700, (3, 1), (1, 1)),
    ("antmaze-medium-play", MEDIUM, 1000, (1, 1), (6, 6)),
])
def test_antmaze_is_evaluated_in_the_data_maze_and_ends_at_the_goal(twin, env, ds_id, steps,
                                                                     start, goal):
    dataset = minari.load_dataset(twin(ds_id))
    description = calql.eval_env_description(dataset, calql.preset_args(env))
    data_map = dataset.env_spec.kwargs["maze_map"]
    eval_spec_map = dataset._eval_env_spec.kwargs["maze_map"]
    kwargs = description["kwargs"]
    # the data's walls, not the eval spec's (its umaze is the mirror image, Minari #304)
    assert walls(kwargs["maze_map"]) == walls(data_map)
    if env == "antmaze-umaze":
        assert walls(eval_spec_map) != walls(data_map)
        assert (cells(data_map, "r"), cells(data_map, "g")) == ([start], [goal])  # its own
    else:
        assert (cells(eval_spec_map, "r"), cells(eval_spec_map, "g")) == ([start], [goal])
    assert (cells(kwargs["maze_map"], "r"), cells(kwargs["maze_map"], "g")) == ([start], [goal])
    assert kwargs["continuing_task"] is False and kwargs["reset_target"] is False
    assert description["max_episode_steps"] == steps and description["id"] == dataset.env_spec.id
    assert json.loads(json.dumps(description)) == description
    # no reference scores: Minari's antmaze references score the continuing task
    assert calql.family_name(ds_id) == "antmaze"
    assert calql.scoring(dataset.storage.metadata, "antmaze", ds_id)["ref_min_score"] is None
    env_ = calql.make_eval_env(description)
    try:
        assert env_.spec.max_episode_steps == steps
        maze = env_.unwrapped.maze
        assert maze.maze_map == kwargs["maze_map"]
        obs, _ = env_.reset(seed=0)
        goal_xy = maze.cell_rowcol_to_xy(np.array(goal))
        start_xy = maze.cell_rowcol_to_xy(np.array(start))
        noise = 0.25 * maze.maze_size_scaling  # the env's position noise, per axis
        assert np.abs(obs["desired_goal"] - goal_xy).max() <= noise
        assert np.abs(obs["achieved_goal"] - start_xy).max() <= noise
        # put the ant on the goal: reward 1, success, and the episode ENDS (terminated)
        ant = env_.unwrapped.ant_env
        qpos = ant.data.qpos.copy()
        qpos[:2] = obs["desired_goal"]
        ant.set_state(qpos, np.zeros_like(ant.data.qvel))
        _, reward, terminated, truncated, info = env_.step(np.zeros(env_.action_space.shape))
        assert reward == 1.0 and terminated and not truncated and info["success"]
    finally:
        env_.close()


def test_antmaze_terminals_mc_returns_and_success_in_data(twin):
    ds_id = twin(UMAZE)
    episodes = list(minari.load_dataset(ds_id).iterate_episodes())
    loaded = calql.load_data(calql.preset_args("antmaze-umaze"))
    data, info = loaded.transitions, loaded.info
    goal = np.concatenate([ep.rewards for ep in episodes]) == 1.0
    assert goal.any() and not np.concatenate([ep.terminations for ep in episodes]).any()
    # D4RL antmaze terminals: exactly the goal-reward steps (Minari's data has none)
    np.testing.assert_array_equal(data["dones"], goal.astype(np.float32))
    np.testing.assert_array_equal(data["rewards"], np.where(goal, 5.0, -5.0))  # r*10 - 5
    assert info["terminals_in_data"] == int(goal.sum())
    # success_in_data from the success infos: one of the twin's two episodes reaches the goal
    reached = [bool(ep.infos["success"][1:].any()) for ep in episodes]
    assert reached == [True, False] and info["success_in_data"] == 0.5
    # MC returns: a goal step is terminal (G = +5); every step after the last goal visit,
    # and every step of the episode that never reaches it, is an all-failure segment
    # (-5 / (1 - 0.99) = -500), as the official loader splits trajectories at terminals.
    mc = data["mc_returns"]
    np.testing.assert_allclose(mc[goal], 5.0)
    first_len = len(episodes[0].rewards)
    last_goal = int(np.flatnonzero(goal[:first_len])[-1])
    np.testing.assert_allclose(mc[last_goal + 1:], -500.0, rtol=1e-6)
    before = int(np.flatnonzero(goal)[0]) - 1
    if before >= 0:  # a failure step right before a goal visit: -5 + 0.99 * 5
        np.testing.assert_allclose(mc[before], -5 + 0.99 * 5, rtol=1e-6)
    assert info["ref_min_score"] is None and info["ref_max_score"] is None


@pytest.mark.parametrize("env, ds_id, env_id, steps", [
    ("antmaze-umaze", UMAZE, "AntMaze_UMaze-v4", 700),
    ("antmaze-medium-play", MEDIUM, "AntMaze_Medium-v4", 1000),
])
def test_antmaze_runs_end_to_end_and_scores_success_x100(twin, tmp_path, env, ds_id, env_id,
                                                         steps):
    twin(ds_id)
    run = tmp_path / "run"
    summary = calql.main(tiny(env, run))
    config, rows = read_run(run)
    eval_env = config["eval_env"]
    assert eval_env["id"] == env_id and eval_env["max_episode_steps"] == steps
    assert walls(eval_env["kwargs"]["maze_map"]) == walls(
        minari.load_dataset(ds_id).env_spec.kwargs["maze_map"])
    assert eval_env["kwargs"]["continuing_task"] is False
    assert config["dataset"]["success_in_data"] == 0.5
    assert [r["step"] for r in rows if r["phase"] == "offline"] == [0, 2, 4]
    assert any(r["phase"] == "online" for r in rows)
    for r in rows:
        assert r["success_rate"] in (0.0, 1.0)  # one evaluation episode
        assert r["score"] == 100.0 * r["success_rate"]  # success rate x 100, never null
        assert "normalized_score" not in r and np.isfinite(r["return_mean"])
        assert r["return_mean"] == r["success_rate"]  # sparse reward 1 only at the goal
        assert 1 <= r["episode_length"] <= steps
        assert r["episode_length"] == steps or r["success_rate"] == 1.0  # ends at the goal
    assert summary["final_score"] == rows[-1]["score"] is not None


# ---------------------------------------------------------------------------- Adroit binary
def test_pen_binary_runs_end_to_end_with_the_d4rl_horizon(twin, tmp_path):
    ds_id = twin("D4RL/pen/cloned-v2")
    dataset = minari.load_dataset(ds_id)
    assert dataset.env_spec.max_episode_steps == 200  # Minari's spec (#286)
    assert dataset.storage.metadata.get("ref_max_score") is not None  # dense D4RL refs
    run = tmp_path / "run"
    summary = calql.main(tiny("pen-binary", run, online_steps=50))
    config, rows = read_run(run)
    assert config["eval_env"]["id"] == "AdroitHandPen-v1"
    assert config["eval_env"]["max_episode_steps"] == 100  # D4RL's pen horizon, not 200
    # success infos over the dataset's episodes (one of two succeeds), before any is dropped
    assert config["dataset"]["success_in_data"] == 0.5
    assert config["dataset"]["episodes_kept"] == 1
    for r in rows:
        assert r["score"] == 100.0 * r["success_rate"]  # not from relabelled {-1, 0} returns
        assert 1 <= r["episode_length"] <= 100
        assert r["episode_length"] == 100 or r["success_rate"] == 1.0
        assert -100 <= r["return_mean"] <= 0  # success - 1 per step
    assert summary["env_steps"] >= 50 and summary["offline_score"] is not None


@pytest.mark.parametrize("task, steps", [("pen", 100), ("door", 200), ("relocate", 200)])
def test_adroit_eval_env_horizon(twin, task, steps):
    dataset = minari.load_dataset(twin(f"D4RL/{task}/cloned-v2"))
    description = calql.eval_env_description(dataset, calql.preset_args(f"{task}-binary"))
    assert description["max_episode_steps"] == steps
    env = calql.make_eval_env(description)
    try:
        assert env.spec.max_episode_steps == steps
        env.reset(seed=0)
        args = calql.preset_args(f"{task}-binary")
        t, done = 0, False
        while not done:  # zero actions never succeed: the episode is cut at the horizon
            _, reward, terminal, truncated, info = calql.env_step(
                env, np.zeros(env.action_space.shape), args)
            assert reward == -1.0 and not info["success"] and not terminal
            done, t = truncated, t + 1
        assert t == steps
    finally:
        env.close()


def test_binary_episode_ends_at_success_not_at_the_env_termination():
    class Stub:
        def __init__(self, terminated, success):
            self.out = (np.zeros(1), 7.0, terminated, False, {"success": success})

        def step(self, action):
            return self.out

    args = calql.preset_args("pen-binary")
    assert calql.env_step(Stub(False, True), None, args)[1:4] == (0.0, True, False)
    assert calql.env_step(Stub(True, False), None, args)[1:4] == (-1.0, False, False)


def test_door_and_relocate_twins_have_no_success_to_keep(twin, tmp_path):
    """The door/relocate twins' random episodes never succeed: binary relabelling drops every
    trajectory, with a one-line error (the real cloned-v2 data has successes)."""
    twin("D4RL/door/cloned-v2")
    with pytest.raises(SystemExit) as exc:
        calql.main(tiny("door-binary", tmp_path / "run"))
    assert "none of its 2 trajectories reaches success" in str(exc.value)


# ------------------------------------------------- the other families: as CQL-SAC has them
@pytest.mark.parametrize("ds_id, family, steps", [
    ("mujoco/hopper/medium-v0", "gym", 1000), ("D4RL/hammer/cloned-v2", "adroit", 200),
    ("D4RL/kitchen/complete-v2", "kitchen", 280)])
def test_a_dataset_without_a_preset_is_evaluated_and_scored_by_its_family(twin, tmp_path, ds_id,
                                                                          family, steps):
    """`--dataset-id X` alone (the generic preset): Cal-QL's evaluation env and reference
    scores are the shared family block's, exactly CQL-SAC's (kitchen: D4RL's 280 steps with
    the data's kept tasks; Adroit: D4RL's horizon; Gym: D4RL's references where Minari's data
    store none)."""
    import cql_sac_continuous as cql

    dataset = minari.load_dataset(twin(ds_id))
    args = calql.parse_args(["--dataset-id", ds_id])
    assert args.horizon is None and not args.binary  # the generic preset
    assert calql.family_name(ds_id) == cql.family_name(ds_id) == family
    description = calql.eval_env_description(dataset, args)
    assert description == cql.spec_dict(cql.eval_env_spec(dataset, family))
    assert description["max_episode_steps"] == steps
    meta = dataset.storage.metadata
    scored = calql.scoring(meta, family, ds_id)
    assert scored == cql.scoring(meta, family, ds_id) and scored["ref_max_score"] is not None
    data = calql.load_data(args)
    assert data.info["family"] == family and data.info["ref_source"] == scored["ref_source"]
    assert data.eval_env == description
    # end to end, offline then online, scored by success_first over the family's score
    run = calql.replace(tiny("pen-binary", tmp_path / "run"), **{
        k: getattr(args, k) for k in ("dataset_id", "env", "binary", "horizon", "reward_scale",
                                      "reward_bias", "sparse_reward", "reward_neg")})
    calql.main(run)
    _, rows = read_run(tmp_path / "run")
    last, (lo, hi) = rows[-1], (scored["ref_min_score"], scored["ref_max_score"])
    assert last["phase"] == "online" and last["episode_length"] <= steps
    if last["success_rate"] is not None:  # Adroit reports success: Cal-QL's score
        assert last["score"] == 100.0 * last["success_rate"]
    elif family == "kitchen":  # D4RL's tasks x 25
        assert last["score"] == 25.0 * last["tasks_completed"]
    else:
        assert last["score"] == pytest.approx(100.0 * (last["return_mean"] - lo) / (hi - lo))
