"""Tests of benchmark/datasets.py: ids, determinism, atomic builds, episode structure, scores;
the sparse-reward datasets calql_finetune.py uses (PointMaze, pen)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest

from benchmark import datasets

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Minari datasets root for this test only."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def _episodes(ds_id: str) -> list:
    return list(minari.load_dataset(ds_id).iterate_episodes())


def _normalized_mean(ds_id: str) -> float:
    dataset = minari.load_dataset(ds_id)
    returns = np.array([ep.rewards.sum() for ep in dataset.iterate_episodes()])
    return float(np.mean(minari.get_normalized_score(dataset, returns)))


# --------------------------------------------------------------------------- names, CLI
def test_names_resolve_to_ids() -> None:
    assert datasets.dataset_id("pendulum-medium") == "local/pendulum/medium-v0"
    assert datasets.dataset_id("cartpole-mixed") == "local/cartpole/mixed-v0"
    assert datasets.dataset_id("local/pendulum/expert-v0") == "local/pendulum/expert-v0"
    assert datasets.dataset_id("D4RL/pen/human-v2") == "D4RL/pen/human-v2"
    with pytest.raises(KeyError):
        datasets.dataset_id("pendulum-nonsense")
    ids = [spec.dataset_id for spec in datasets.LOCAL_DATASETS.values()]
    assert len(set(ids)) == len(ids)
    for level in ("random", "medium", "expert", "medium-replay", "medium-expert"):
        assert f"local/pendulum/{level}-v0" in ids


def test_cli_list_and_build(fresh_root: Path, capsys: pytest.CaptureFixture) -> None:
    datasets.main(["--list"])
    out = capsys.readouterr().out
    for name, spec in datasets.LOCAL_DATASETS.items():
        assert f"{name}" in out and spec.dataset_id in out
    assert " built" not in out and not (fresh_root / "local").exists()

    datasets.main(["pendulum-random"])
    out = capsys.readouterr().out
    assert "built local/pendulum/random-v0: 100 episodes, 20000 transitions, mean return" in out
    datasets.main(["pendulum-random"])
    assert "present local/pendulum/random-v0" in capsys.readouterr().out
    datasets.main(["--list"])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "pendulum-random" in ln)
    assert line.split()[-1] == "built"

    with pytest.raises(SystemExit) as exc:  # one line naming what can be built, no traceback
        datasets.main(["pendulum-random", "local/pen/nope-v0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown dataset local/pen/nope-v0 (did you mean local/pen/cloned-v0?); buildable " \
           "here: pendulum-random" in err
    datasets.main(["local/pendulum/random-v0"])  # ids are accepted too
    assert "present local/pendulum/random-v0" in capsys.readouterr().out


def test_script_entry_point(fresh_root: Path) -> None:
    env = {**os.environ, "MINARI_DATASETS_PATH": str(fresh_root)}
    result = subprocess.run(
        [sys.executable, "benchmark/datasets.py", "--list"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert f"datasets root: {fresh_root}" in result.stdout
    assert "local/ale-pong/random-v0" in result.stdout


# --------------------------------------------------------------------------- building
def test_build_idempotent_and_deterministic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    runs = []
    for name in ("a", "b"):
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / name))
        assert datasets.build("pendulum-medium") == "local/pendulum/medium-v0"
        runs.append(_episodes("local/pendulum/medium-v0"))
    meta = tmp_path / "b" / "local/pendulum/medium-v0/data/metadata.json"
    stamp = meta.stat().st_mtime_ns
    capsys.readouterr()
    assert datasets.build("pendulum-medium") == "local/pendulum/medium-v0"
    assert datasets.ensure("local/pendulum/medium-v0") == "local/pendulum/medium-v0"
    assert capsys.readouterr().out == "" and meta.stat().st_mtime_ns == stamp

    assert len(runs[0]) == len(runs[1]) == 100
    for ep_a, ep_b in zip(*runs, strict=True):
        for key in ("observations", "actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(getattr(ep_a, key), getattr(ep_b, key))

    datasets.build("pendulum-medium", force=True)
    assert "built local/pendulum/medium-v0" in capsys.readouterr().out
    np.testing.assert_array_equal(_episodes("local/pendulum/medium-v0")[7].actions,
                                  runs[0][7].actions)


def test_failed_build_leaves_no_folder(
    fresh_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from minari.dataset._storages.hdf5_storage import HDF5Storage

    original = HDF5Storage.update_episodes
    calls = []

    def write_one_then_fail(self, episodes):  # a crash half-way through Minari's writing
        calls.append(1)
        original(self, list(episodes)[:1])
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(HDF5Storage, "update_episodes", write_one_then_fail)
    with pytest.raises(RuntimeError, match="simulated crash"):
        datasets.build("pendulum-random")
    assert calls, "the simulated crash was never reached"
    assert not (fresh_root / "local/pendulum/random-v0").exists()
    assert not [p for p in fresh_root.iterdir() if p.name.startswith(".staging")]
    assert not datasets.is_built("pendulum-random")

    monkeypatch.setattr(HDF5Storage, "update_episodes", original)
    assert datasets.ensure("pendulum-random") == "local/pendulum/random-v0"
    assert minari.load_dataset("local/pendulum/random-v0").total_episodes == 100


# --------------------------------------------------------------------------- Pendulum
def test_pendulum_episode_structure(local_dataset) -> None:
    ds_id = local_dataset("pendulum-expert")
    dataset = minari.load_dataset(ds_id)
    assert dataset.total_episodes == 100 and dataset.total_steps == 20_000
    env = dataset.recover_environment()
    assert env.spec.id == "Pendulum-v1"
    for k, ep in enumerate(dataset.iterate_episodes()):
        assert ep.observations.shape == (201, 3) and ep.actions.shape == (200, 1)
        assert ep.rewards.shape == (200,) and np.all(ep.rewards <= 0.0)
        assert not ep.terminations.any()
        assert ep.truncations[-1] and not ep.truncations[:-1].any()
        assert np.all(np.abs(ep.actions) <= 2.0)
        if k < 5:  # initial states are the evaluation env's own resets
            obs, _ = env.reset(seed=2_000 + k)
            np.testing.assert_array_equal(ep.observations[0], obs)


def test_pendulum_scores(local_dataset) -> None:
    scores = {}
    for level in ("random", "medium", "medium-replay", "expert"):
        ds_id = local_dataset(f"pendulum-{level}")
        meta = minari.load_dataset(ds_id).storage.metadata
        assert meta["ref_min_score"] < -1000.0 < -200.0 < meta["ref_max_score"] < 0.0
        scores[level] = _normalized_mean(ds_id)
    assert scores["expert"] > 0.9
    assert 0.4 < scores["medium"] < 0.65
    assert abs(scores["random"]) < 0.1
    assert scores["expert"] > scores["medium"] > scores["medium-replay"] > scores["random"]


def test_pendulum_medium_expert_is_medium_plus_expert(local_dataset) -> None:
    both = _episodes(local_dataset("pendulum-medium-expert"))
    parts = _episodes(local_dataset("pendulum-medium")) + _episodes(
        local_dataset("pendulum-expert"))
    assert len(both) == len(parts) == 200
    for ep, ref in zip(both[::37], parts[::37], strict=True):
        np.testing.assert_array_equal(ep.observations, ref.observations)
        np.testing.assert_array_equal(ep.actions, ref.actions)


def test_pendulum_controller_swings_up() -> None:
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=0)
    env.unwrapped.state = np.array([np.pi, 0.0])  # hanging straight down, at rest
    obs = np.array([-1.0, 0.0, 0.0], dtype=np.float32)
    for _ in range(200):
        obs, *_ = env.step(np.array([datasets.pendulum_controller(obs)], dtype=np.float32))
    assert obs[0] > 0.99 and abs(obs[2]) < 0.1  # upright and still


# --------------------------------------------------------------------------- CartPole
def test_cartpole_structure_and_scores(local_dataset) -> None:
    lengths, scores = {}, {}
    for level in ("random", "medium", "expert", "mixed"):
        ds_id = local_dataset(f"cartpole-{level}")
        dataset = minari.load_dataset(ds_id)
        assert dataset.total_steps < 50_000 and dataset.recover_environment().spec.id == (
            "CartPole-v1")
        eps = list(dataset.iterate_episodes())
        for ep in eps:
            n = len(ep.rewards)
            assert ep.observations.shape == (n + 1, 4) and ep.actions.shape == (n,)
            assert set(np.unique(ep.actions)) <= {0, 1}
            ended = ep.terminations | ep.truncations
            assert ended[-1] and not ended[:-1].any()
            assert ep.terminations[-1] or n == 500  # before 500 steps only by failing
            assert not ep.truncations[-1] or n == 500
        lengths[level] = np.array([len(ep.rewards) for ep in eps])
        scores[level] = _normalized_mean(ds_id)
    assert lengths["random"].max() < 200 and np.all(lengths["expert"] == 500)
    assert np.mean(lengths["medium"] < 500) > 0.8
    assert scores["expert"] > 0.99 and abs(scores["random"]) < 0.1
    assert 0.3 < scores["medium"] < 0.7
    assert scores["random"] < scores["mixed"] < scores["expert"]


# --------------------------------------------------------------------------- Pong
def test_pong_frames_are_exact(local_dataset) -> None:
    dataset = minari.load_dataset(local_dataset("pong-random"))
    meta = dataset.storage.metadata
    assert meta["jpeg_encoding"] is False and dataset.total_steps == 2500
    size = sum(f.stat().st_size for f in dataset.storage.data_path.rglob("*") if f.is_file())
    assert size < 30e6
    ep = dataset[0]
    assert ep.observations.shape[1:] == (210, 160, 3) and ep.observations.dtype == np.uint8
    assert ep.terminations[-1]  # a random player loses the game
    env = datasets.make_env("ALE/Pong-v5")
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(ep.observations[0], obs)
    for t in range(30):  # same seed, same actions: identical frames (sticky actions included)
        obs, *_ = env.step(int(ep.actions[t]))
        np.testing.assert_array_equal(ep.observations[t + 1], obs)
    last = dataset[dataset.total_episodes - 1]
    assert last.truncations[-1] and not last.terminations.any()


# ------------------------------------------------------------------- sparse reward (Cal-QL)
def test_sparse_reward_ids_and_specs() -> None:
    assert datasets.dataset_id("pointmaze-sparse") == "local/pointmaze/sparse-v0"
    assert datasets.dataset_id("pen-cloned-local") == "local/pen/cloned-v0"
    assert datasets.LOCAL_DATASETS["pen-cloned-local"].record_success
    assert not datasets.LOCAL_DATASETS["pendulum-medium"].record_success  # others unchanged


def test_pointmaze_sparse_structure(local_dataset) -> None:
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


def test_pen_cloned_local_has_the_d4rl_pen_structure(local_dataset) -> None:
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


def test_umaze_planner_follows_the_corridor() -> None:
    path = datasets.maze_next_cells(datasets.UMAZE, (1, 1))
    cell, visited = (3, 1), [(3, 1)]
    while cell != (1, 1):
        cell = path[cell]
        visited.append(cell)
    assert visited == [(3, 1), (3, 2), (3, 3), (2, 3), (1, 3), (1, 2), (1, 1)]
    assert path[(1, 2)] == (1, 1)  # next to the goal: step into it


def test_pointmaze_umaze_structure(local_dataset) -> None:
    """Minari's D4RL/pointmaze recipe: one continuing run cut at each success (truncation,
    never termination), random goals, and the eval env with the fixed goal cell."""
    spec = datasets.LOCAL_DATASETS["pointmaze-umaze-binary"]
    dataset = minari.load_dataset(local_dataset("pointmaze-umaze-binary"))
    assert dataset.total_steps == 30_000 and dataset.total_episodes == 386
    env = dataset.recover_environment(eval_env=True)
    assert env.spec.id == "PointMaze_UMaze-v3" and env.spec.max_episode_steps == 300
    assert env.spec.kwargs["maze_map"] == datasets.UMAZE_EVAL
    assert env.spec.kwargs["continuing_task"] and not env.spec.kwargs["reset_target"]
    assert dataset.recover_environment().spec.kwargs["reset_target"]
    episodes = list(dataset.iterate_episodes())
    goal_cells = set()
    for k, ep in enumerate(episodes):
        n, success = len(ep.rewards), ep.infos["success"]
        assert success.shape == (n + 1,) and not success[0]
        assert not ep.terminations.any()  # a continuing task never terminates
        assert ep.truncations[-1] and not ep.truncations[:-1].any()
        assert not success[1:-1].any() and success[-1] == (k < len(episodes) - 1)
        np.testing.assert_array_equal(ep.rewards, success[1:].astype(float))
        goals = ep.observations["desired_goal"]
        assert np.all(goals == goals[0])  # one goal per episode
        goal_cells.add(tuple(np.round(goals[0])))
        if k:  # the run continues from the previous episode's last state, with a new goal
            prev = episodes[k - 1].observations
            np.testing.assert_array_equal(ep.observations["observation"][0],
                                          prev["observation"][-1])
    assert len(goal_cells) == 7  # every free cell of the U-maze is a goal somewhere
    assert np.all(np.abs(np.concatenate([ep.actions for ep in episodes])) <= 1.0)
    # Deterministic, and the budget only cuts: a shorter build is a prefix of the stored one.
    short = [datasets.collect(dataclasses.replace(spec, max_steps=1_000)) for _ in range(2)]
    for ep_a, ep_b, ep in zip(*short, episodes, strict=False):
        for key in ("actions", "rewards", "truncations"):
            np.testing.assert_array_equal(getattr(ep_a, key), getattr(ep_b, key))
        if ep_a.truncations[-1] and ep_a.infos["success"][-1]:  # whole episodes only
            np.testing.assert_allclose(ep_a.actions, ep.actions)
            np.testing.assert_allclose(ep_a.observations["observation"],
                                       ep.observations["observation"])
    assert sum(len(ep.rewards) for ep in short[0]) == 1_000


def test_building_a_maze_shows_no_adroit_warning():
    """Issue 22: gymnasium-robotics' import warning names three Adroit envs; not shown for
    the others (a fresh process: the warning comes with the first import)."""
    code = "from benchmark.datasets import make_env; make_env('PointMaze_UMaze-v3').close()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Adroit" not in proc.stderr, proc.stderr
