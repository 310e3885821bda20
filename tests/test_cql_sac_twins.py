"""CQL-SAC on the schema twins of Minari's real datasets (tests/twins.py): each family's preset
runs end to end, and evaluation sees what the papers evaluated (issue 8): the data's maze with
fixed start/goal cells and termination at the goal (AntMaze, success rate x100), D4RL's
horizons (Adroit pen 100 steps), the data's reward semantics with D4RL's task count x25
(Kitchen), reference returns with a stated source (mujoco/*), the raw return always logged,
`eval_env` in config.json with the value gap's rollout (issue 17 item 3)."""

import json
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch

import cql_sac_continuous as cql

TINY = dict(actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16), batch_size=16,
            cql_n_actions=2, total_steps=4, eval_every=4, eval_episodes=2, log_every=2,
            progress=False, device="cpu")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny networks: one intra-op thread (the shared-CPU fixture of conftest)."""


def run(env: str, dataset_id: str, tmp_path: Path, **overrides) -> dict:
    """The preset of `env` on the twin `dataset_id`; returns config, rows and summary."""
    args = cql.replace(cql.preset_args(env, dataset_id), run_dir=str(tmp_path / "run"),
                       **{**TINY, **overrides})
    summary = cql.main(args)
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return dict(config=json.loads((run_dir / "config.json").read_text()), rows=rows,
                summary=summary, args=args)


def without_gap(eval_env: dict) -> dict:
    """config.json's eval_env less the value gap's block (main adds it to load_data's)."""
    return {k: v for k, v in eval_env.items() if k != "value_gap"}


def walls(maze_map) -> list[list[bool]]:
    return [[c == 1 for c in row] for row in maze_map]


def cell_of(maze_map, mark: str) -> tuple[int, int]:
    (cell,) = [(i, j) for i, row in enumerate(maze_map) for j, c in enumerate(row) if c == mark]
    return cell


# ---------------------------------------------------------------- AntMaze

ANTMAZE = {  # dataset id -> (preset env, data goal cell, data-consistent start cell, horizon)
    "D4RL/antmaze/umaze-v1": ("antmaze-umaze", (1, 1), (3, 1), 700),
    "D4RL/antmaze/medium-play-v1": ("antmaze-medium-play", (6, 6), (1, 1), 1000),
}


@pytest.mark.parametrize("dataset_id", list(ANTMAZE))
def test_antmaze_evaluates_in_the_data_maze_ending_at_the_goal(twin, tmp_path, dataset_id):
    env_name, goal_cell, reset_cell, horizon = ANTMAZE[twin(dataset_id)]
    dataset = minari.load_dataset(dataset_id)
    data_spec = dataset.env_spec
    data_map = data_spec.kwargs.get("maze_map") or gym.spec(data_spec.id).kwargs["maze_map"]
    eval_map = gym.envs.registration.EnvSpec.from_json(
        dataset.storage.metadata["eval_env_spec"]).kwargs["maze_map"]
    out = run(env_name, dataset_id, tmp_path)

    recorded = out["config"]["eval_env"]
    assert recorded["id"] == data_spec.id and recorded["max_episode_steps"] == horizon
    assert recorded["kwargs"]["continuing_task"] is False
    assert walls(recorded["kwargs"]["maze_map"]) == walls(data_map)
    if dataset_id.endswith("umaze-v1"):
        assert walls(eval_map) != walls(data_map)  # Minari #304: the eval spec's mirror maze
    assert cell_of(recorded["kwargs"]["maze_map"], "g") == goal_cell
    assert cell_of(recorded["kwargs"]["maze_map"], "r") == reset_cell

    # The env evaluation builds: the data's walls, start and goal in those cells, and the
    # episode ends (terminated, success) when the ant is at the goal. main adds the value
    # gap's block; the horizon (700 / 1000) is longer than the gap's 459 steps.
    assert cql.load_data(out["args"]).eval_env == without_gap(recorded)
    assert recorded["value_gap"]["rollout_max_steps"] == horizon
    assert recorded["value_gap"]["runs_past_time_limit"] is False
    env = cql.make_eval_env(recorded)
    maze = env.unwrapped.maze
    assert walls(maze.maze_map) == walls(data_map) and env.spec.max_episode_steps == horizon
    obs, _ = env.reset(seed=0)
    assert tuple(maze.cell_xy_to_rowcol(env.unwrapped.goal)) == goal_cell
    assert tuple(maze.cell_xy_to_rowcol(obs["achieved_goal"])) == reset_cell
    ant = env.unwrapped.ant_env
    qpos, qvel = ant.data.qpos.copy(), ant.data.qvel.copy()
    qpos[:2] = env.unwrapped.goal
    ant.set_state(qpos, qvel * 0)
    _, reward, terminated, truncated, info = env.step(np.zeros(8, np.float32))
    assert terminated and not truncated and info["success"] and reward == 1.0
    env.close()

    # Scored as success rate x100 (paper Table 2), raw return logged too.
    last = out["rows"][-1]
    assert last["score"] is not None
    assert last["score"] == pytest.approx(100.0 * last["success_rate"])
    assert np.isfinite(last["return_mean"]) and last["episode_length"] <= horizon
    assert out["summary"]["score_definition"].startswith("success rate x100")
    assert out["config"]["dataset"]["terminals"] == "goal_terminals"


def test_antmaze_goal_steps_are_terminal(twin):
    """Official codes train on D4RL's antmaze terminals (= the goal-reaching steps)."""
    dataset_id = twin("D4RL/antmaze/umaze-v1")
    raw = cql.episodes_to_transitions(minari.load_dataset(dataset_id).iterate_episodes())
    assert raw["dones"].sum() == 0  # the continuing task never terminates
    at_goal = raw["rewards"] == 1.0
    assert at_goal.sum() > 10
    data = cql.load_data(cql.replace(cql.preset_args("antmaze-umaze"), progress=False))
    data = data.transitions
    np.testing.assert_array_equal(data["dones"], at_goal.astype(np.float32))
    # antmaze preset reward transform: goal steps +5, others -5 (Cal-QL r*10 - 5)
    np.testing.assert_array_equal(np.unique(data["rewards"]), [-5.0, 5.0])


def test_the_cql_codes_antmaze_run_trains_on_its_centred_rewards(twin, tmp_path):
    """`--env antmaze-umaze-cql-code` (cql_antmaze_new.py): the same goal terminals and
    evaluation, rewards (r - 0.5) * 4 (goal steps +2, others -2), BC warm start, Lagrange in
    the CQL form; it runs end to end on the twin."""
    twin("D4RL/antmaze/umaze-v1")
    args = cql.replace(cql.preset_args("antmaze-umaze-cql-code"), progress=False)
    data = cql.load_data(args).transitions
    np.testing.assert_array_equal(np.unique(data["rewards"]), [-2.0, 2.0])
    np.testing.assert_array_equal(data["dones"], (data["rewards"] == 2.0).astype(np.float32))
    out = run("antmaze-umaze-cql-code", "D4RL/antmaze/umaze-v1", tmp_path)
    assert out["config"]["args"]["lagrange_form"] == "cql" and out["args"].bc_steps == 40_000
    assert out["config"]["eval_env"]["kwargs"]["continuing_task"] is False
    assert out["rows"][-1]["score"] == 100.0 * out["rows"][-1]["success_rate"]


# ---------------------------------------------------------------- Adroit


@pytest.mark.parametrize("task,horizon", [("pen", 100), ("door", 200)])
def test_adroit_horizon_matches_the_reference_scores(twin, tmp_path, task, horizon):
    dataset_id = twin(f"D4RL/{task}/cloned-v2")
    out = run(f"{task}-cloned", dataset_id, tmp_path)
    assert out["config"]["eval_env"]["max_episode_steps"] == horizon  # D4RL: pen 100, else 200
    last = out["rows"][-1]
    assert last["episode_length"] == horizon  # Adroit never terminates
    lo, hi = minari.load_dataset(dataset_id).storage.metadata["ref_min_score"], \
        minari.load_dataset(dataset_id).storage.metadata["ref_max_score"]
    assert last["score"] == pytest.approx(
        100 * (last["return_mean"] - lo) / (hi - lo))
    assert last["success_rate"] is not None


# ---------------------------------------------------------------- Kitchen


def test_kitchen_evaluates_in_the_data_semantics_and_scores_tasks_x25(twin, tmp_path):
    """Issue 17 item 2: the data (Minari) keeps tasks and never terminates, so its reward is
    the number of goal tasks holding at each step; evaluation now runs in those semantics
    (was: D4RL's, each task paying 1 once, returns <= 4 against Q-values trained on per-step
    counts), so the value gap compares like with like; the score stays D4RL's task count."""
    dataset_id = twin("D4RL/kitchen/complete-v2")
    data_kwargs = minari.load_dataset(dataset_id).env_spec.kwargs
    out = run("kitchen-complete", dataset_id, tmp_path, eval_episodes=1)
    recorded = out["config"]["eval_env"]
    assert recorded["max_episode_steps"] == 280  # D4RL kitchen horizon: the score's
    for key in ("remove_task_when_completed", "terminate_on_tasks_completed"):
        assert recorded["kwargs"][key] is False and data_kwargs[key] is False
    assert recorded["kwargs"]["tasks_to_complete"] == ["microwave", "kettle", "light switch",
                                                       "slide cabinet"]
    assert recorded["value_gap"]["rollout_max_steps"] == 459  # never terminates: 459 steps
    last = out["rows"][-1]
    assert last["score"] is not None
    assert last["score"] == 25.0 * last["tasks_completed"]
    assert last["tasks_completed"] == last["return_mean"]  # D4RL's return: each task once
    assert last["episode_length"] == 280 and last["value_gap_steps"] == 459
    assert cql.load_data(out["args"]).eval_env == without_gap(recorded)
    env = cql.make_eval_env(recorded, recorded["value_gap"]["rollout_max_steps"])
    kitchen = env.unwrapped
    assert not kitchen.remove_task_when_completed and not kitchen.terminate_on_tasks_completed
    assert env.spec.max_episode_steps == 459
    env.close()


class TasksEnv(gym.Env):
    """The kitchen's infos: a task completed at steps 100 and 300, listed in ONE list that
    the env grows in place (as FrankaKitchen's episode_task_completions); reward 2 at every
    step (tasks holding, the data's semantics); never terminates."""

    observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    def __init__(self):
        self.done_tasks = []

    def reset(self, *, seed=None, options=None):
        self.t = 0
        self.done_tasks.clear()  # in place too, as FrankaKitchen's reset
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self.t += 1
        new = {100: "microwave", 300: "kettle"}.get(self.t)
        self.done_tasks += [new] if new else []
        info = dict(step_task_completions=[new] if new else [],
                    episode_task_completions=self.done_tasks)
        return np.zeros(3, np.float32), 2.0, False, False, info


def test_kitchen_demonstration_ends_are_terminal(twin):
    """The official CQL code trains on D4RL's kitchen terminals, True at each demonstration's
    last step; Minari ends each demonstration by truncation: that step becomes terminal, and
    no other."""
    dataset_id = twin("D4RL/kitchen/complete-v2")
    episodes = list(minari.load_dataset(dataset_id).iterate_episodes())
    raw = cql.episodes_to_transitions(episodes)
    assert raw["dones"].sum() == 0 and raw["timeouts"].sum() == len(episodes) > 1
    ends = np.cumsum([len(ep.actions) for ep in episodes]) - 1
    data = cql.load_data(cql.replace(cql.preset_args("kitchen-complete"), progress=False))
    np.testing.assert_array_equal(np.flatnonzero(data.transitions["dones"]), ends)
    assert data.info["terminals"] == "demo_end_terminals"
    mujoco = cql.load_data(cql.replace(cql.preset_args("hopper-medium", twin(
        "mujoco/hopper/medium-v0")), progress=False))
    assert mujoco.info["terminals"] is None  # the data's own terminations


def test_kitchen_score_counts_tasks_within_280_steps_and_the_gap_the_whole_rollout():
    args = cql.replace(cql.preset_args("kitchen-mixed"), actor_hidden_dims=(8,),
                       critic_hidden_dims=(8,), eval_episodes=2)
    agent = cql.Agent(3, 2, args)
    tf = cql.Transform(np.zeros(3, np.float32), np.ones(3, np.float32), np.ones(2, np.float32),
                       np.zeros(2, np.float32), 1.0, 0.0)
    info = cql.scoring({}, "kitchen", "D4RL/kitchen/mixed-v2") | dict(family="kitchen")
    gap = cql.value_gap_spec(args.gamma, cql.KITCHEN_HORIZON, np.array([2.0]))
    out = cql.evaluate(agent, TasksEnv(), tf, args, info, torch.device("cpu"), gap)
    # the task of step 300 is past D4RL's 280 steps: one task, read at step 280
    assert out["tasks_completed"] == 1 and out["score"] == 25.0
    assert out["return_mean"] == 1.0 and out["episode_length"] == 280
    assert out["return_std"] == 0.0  # each episode's own count (the env reuses its list)
    assert out["value_gap_steps"] == 459
    obtained = 2.0 * (1 - args.gamma**459) / (1 - args.gamma)  # the data's reward, 459 steps
    assert out["value_gap"] == pytest.approx(out["q_pred_s0"] - obtained, abs=1e-9)


# ---------------------------------------------------------------- mujoco/*


def test_mujoco_score_is_never_null(twin, tmp_path):
    dataset_id = twin("mujoco/hopper/medium-v0")
    assert minari.load_dataset(dataset_id).storage.metadata.get("ref_min_score") is None
    out = run("hopper-medium", dataset_id, tmp_path, eval_episodes=1)
    assert out["config"]["eval_env"]["id"] == "Hopper-v5"
    dataset = out["config"]["dataset"]
    assert (dataset["ref_min_score"], dataset["ref_max_score"]) == (-20.272305, 3234.3)
    assert "NOT like-for-like" in dataset["ref_source"]
    assert "NOT like-for-like" in out["summary"]["ref_source"]
    last = out["rows"][-1]
    assert last["score"] == pytest.approx(
        100 * (last["return_mean"] + 20.272305) / (3234.3 + 20.272305))
    assert out["summary"]["final_score"] is not None
