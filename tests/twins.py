"""Schema twins: tiny datasets under the REAL Minari ids, with the real datasets' structure.

Minari cannot download here, so the training scripts' real-dataset code paths are tested on
"twins": a few episodes collected from the same gymnasium environments, with the same env
spec and kwargs, eval env spec (or none), spaces, infos keys and lengths, termination /
truncation semantics and reference scores (present or absent) as the published datasets.
Only the behaviour (seeded scripted or random actions) and the amount of data differ.
``build_twin(dataset_id, root)`` writes one into a Minari datasets folder; ``TWINS`` maps
id -> family and ``FACTS`` holds each twin's structural facts for other tests to assert on.

Sources (minari-dataset-generation-scripts = github.com/Farama-Foundation/
minari-dataset-generation-scripts; Minari issues = github.com/Farama-Foundation/Minari):

mujoco (``mujoco/hopper/medium-v0``): scripts/mujoco/create_dataset.py and make_env.py.
    ``Hopper-v5`` made with no kwargs (the script empties ``env.spec.kwargs``), default
    1000-step limit; DataCollector with ``record_infos=False`` (no infos); no ``eval_env``
    (so no eval env spec in the metadata); episodes reset with seeds 123, 124, ... and end
    by termination (the hopper falls) or truncation at 1000 steps. The v0 datasets carry no
    reference scores (Minari #323). Twin: 3 uniform-random episodes (terminated after tens of
    steps) and one joint-holding PD episode that lasts the full 1000 steps (truncated).

antmaze (``D4RL/antmaze/umaze-v1``, ``D4RL/antmaze/medium-play-v1``):
    scripts/antmaze/create_antmaze_dataset.py (the version whose ids end in -v1).
    ``AntMaze_UMaze-v4`` / ``AntMaze_Medium-v4`` with ``continuing_task=True,
    reset_target=False``; umaze (not diverse) also passes ``maze_map`` with the goal at
    row 1, col 1 and the reset cell at row 3, col 1; medium-play keeps the registered map.
    Dict observation (achieved_goal 2, desired_goal 2, observation 27); the continuing task
    never terminates and the goal never moves, so reward is 1 at every step within 0.45 of
    the goal; episodes end by the registered time limit (700 umaze, 1000 medium).
    Infos (T+1 entries, the reset's first): ``success`` (the only env key kept) plus
    ``qpos`` = achieved_goal ++ observation[:13], ``qvel`` = observation[13:], ``goal`` =
    desired_goal. Eval env spec: a copy of the data env spec whose ``maze_map`` is the
    script's EVAL_ENV_MAPS entry with fixed ``r``/``g`` cells; for umaze its walls are the
    left-right MIRROR of the data maze's (Minari #304, #301). Reference scores are present:
    Minari computed them in the eval env (random policy / the waypoint expert), i.e.
    returns of the continuing task (steps at the goal). Twin: one episode that starts at the
    goal cell (reset options) with small random actions, so many steps have reward 1, and
    one from a plain seeded reset with random actions. The twin's reference scores are
    returns of the same two behaviours in the eval env (the real values are not known here).

adroit (``D4RL/{pen,door,relocate,hammer}/cloned-v2``): scripts/adroit/recreate_adroit_*.py
    and scripts/D4RL/adroit/utils.py. D4RL actions replayed in ``AdroitHand*-v1`` (dense
    reward, never terminated); a new episode at each D4RL timeout, i.e. every episode ends by
    truncation; ``record_infos=True`` and the callback adds ``success=False`` at reset, so
    ``infos["success"]`` has T+1 entries; no ``eval_env``. The env spec's
    ``max_episode_steps`` is 200 for every task (pen was 100 until Minari #286), although
    episodes are 100-200 steps for pen and up to 300 (door) / 624 (hammer) steps (the
    scripts collected door/hammer with 300/625; Minari #303 lists lengths and limits).
    Reference scores: D4RL's (d4rl/infos.py, the ``<task>-human-v0`` values that D4RL also
    uses for the v1 datasets). Twin: Gaussian actions (std 0.3) around the rest posture;
    episode lengths pen 100/150, door 120/260, hammer 130/300, relocate 150/200.

kitchen (``D4RL/kitchen/{complete,partial,mixed}-v2``): scripts/D4RL/kitchen/
    create_franka_dataset.py. ``FrankaKitchen-v1`` with ``remove_task_when_completed=False,
    terminate_on_tasks_completed=False``, ``tasks_to_complete`` = microwave, kettle, light
    switch, slide cabinet (complete, partial) or microwave, kettle, bottom burner, light
    switch (mixed), ``max_episode_steps`` 280 (complete) / 450 (partial, mixed). Reward =
    number of goal tasks completed at that step (they are never removed, so it accumulates);
    never terminated; each demonstration ends by truncation (Minari's DataCollector truncates
    at the next reset). Infos: only ``ctrl`` (the callback replaces the env's info with
    ``data.ctrl``, reset included: T+1 entries). No eval env, no reference scores. Twin:
    small random actions (no task gets completed, so reward is 0), episodes of 120/180
    steps. FrankaKitchen-v1 is reported not to build with mujoco 4.0.0 (AssertionError in
    gymnasium_robotics/utils/mujoco_utils.py, issue 8); there ``build_twin`` raises
    ``TwinUnavailable`` and the ``twin`` fixture skips. It builds with mujoco 3.x.

atari (``atari/breakout/expert-v0``, ``atari/pong/expert-v0``): scripts/atari/
    create_datasets.py. ``ALE/<Game>-v5`` with ``repeat_action_probability=0`` (frameskip 4
    from the registration) and ``max_episode_steps=27000`` (108k frames); the DataCollector
    wraps the raw env, so observations are 210x160x3 uint8 RGB frames (the policy's resize /
    grayscale / frame-stack wrappers sit outside it); Discrete actions; no infos, no eval
    env, no reference scores. The datasets predate Minari's JPEG option: frames are stored
    exactly (``jpeg_encoding=False``); the twin's HDF5 is gzip-repacked like
    benchmark/datasets.py's pong-random. Episodes end by termination (game over). Twin:
    uniform random actions, 2 Breakout episodes / 1 Pong episode.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from minari.data_collector import EpisodeBuffer

from benchmark.datasets import (
    DatasetSpec,
    _act,
    _compress_hdf5,
    _minari_root,
    _rollout,
    _write_atomically,
    datasets_root,
    is_built,
    make_env,
)

R, G = "r", "g"
HERE = Path(__file__).resolve()


class TwinUnavailable(RuntimeError):
    """The twin's environment cannot be built with the installed packages."""


# --------------------------------------------------------------------------- facts
ANTMAZE_UMAZE_DATA_MAP = [[1, 1, 1, 1, 1], [1, G, 0, 0, 1], [1, 1, 1, 0, 1],
                          [1, R, 0, 0, 1], [1, 1, 1, 1, 1]]
# EVAL_ENV_MAPS of scripts/antmaze/create_antmaze_dataset.py.
ANTMAZE_EVAL_MAPS = {
    "umaze": [[1, 1, 1, 1, 1], [1, 0, 0, R, 1], [1, 0, 1, 1, 1], [1, 0, 0, G, 1],
              [1, 1, 1, 1, 1]],
    "medium": [[1, 1, 1, 1, 1, 1, 1, 1], [1, R, 0, 1, 1, 0, 0, 1], [1, 0, 0, 1, 0, 0, 0, 1],
               [1, 1, 0, 0, 0, 1, 1, 1], [1, 0, 0, 1, 0, 0, 0, 1], [1, 0, 1, 0, 0, 1, 0, 1],
               [1, 0, 0, 0, 1, 0, G, 1], [1, 1, 1, 1, 1, 1, 1, 1]],
    "large": [[1] * 12, [1, R, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1], [1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1],
              [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1], [1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1],
              [1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1], [1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1],
              [1, 0, 0, 1, 0, 0, 0, 1, 0, G, 0, 1], [1] * 12],
}
# D4RL d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE (<task>-human-v0, reused for v1).
D4RL_ADROIT_REFS = {
    "pen": (96.262799, 3076.8331017826877),
    "door": (-56.512833, 2880.5693087298737),
    "relocate": (-6.425911, 4233.877797728884),
    "hammer": (-274.856578, 12794.134825156867),
}
ADROIT_LENGTHS = {"pen": (100, 150), "door": (120, 260), "hammer": (130, 300),
                  "relocate": (150, 200)}
KITCHEN_TASKS = {
    "complete": ["microwave", "kettle", "light switch", "slide cabinet"],
    "partial": ["microwave", "kettle", "light switch", "slide cabinet"],
    "mixed": ["microwave", "kettle", "bottom burner", "light switch"],
}
KITCHEN_LENGTHS = (120, 180)
ANTMAZE_GOAL_RADIUS = 0.45  # gymnasium_robotics maze_v4 compute_reward (sparse)


def _antmaze_facts(maze: str, level: str) -> dict[str, Any]:
    env_id = {"umaze": "AntMaze_UMaze-v4", "medium": "AntMaze_Medium-v4"}[maze]
    steps = {"umaze": 700, "medium": 1000}[maze]
    kwargs: dict[str, Any] = {"continuing_task": True, "reset_target": False}
    if maze == "umaze":
        kwargs = {"maze_map": ANTMAZE_UMAZE_DATA_MAP, **kwargs}
    return dict(
        family="antmaze", env_id=env_id, env_kwargs=kwargs, max_episode_steps=steps,
        eval_env={"id": env_id, "max_episode_steps": steps,
                  "kwargs_update": {"maze_map": ANTMAZE_EVAL_MAPS[maze]}},
        has_ref_scores=True, info_keys=("success", "qpos", "qvel", "goal"),
        obs_shape={"achieved_goal": (2,), "desired_goal": (2,), "observation": (27,)},
        action_shape=(8,), never_terminated=True, episode_lengths=(steps, steps),
        source="scripts/antmaze/create_antmaze_dataset.py", maze=maze, level=level,
    )


def _adroit_facts(task: str) -> dict[str, Any]:
    env_id = f"AdroitHand{task.capitalize()}-v1"
    obs = {"pen": 45, "door": 39, "relocate": 39, "hammer": 46}[task]
    act = {"pen": 24, "door": 28, "relocate": 30, "hammer": 26}[task]
    return dict(
        family="adroit", env_id=env_id, env_kwargs={}, max_episode_steps=200, eval_env=None,
        has_ref_scores=True, ref_scores=D4RL_ADROIT_REFS[task], info_keys=("success",),
        obs_shape=(obs,), action_shape=(act,), never_terminated=True,
        episode_lengths=ADROIT_LENGTHS[task],
        source=f"scripts/adroit/recreate_adroit_{task}.py", task=task,
    )


def _kitchen_facts(level: str) -> dict[str, Any]:
    return dict(
        family="kitchen", env_id="FrankaKitchen-v1",
        env_kwargs={"remove_task_when_completed": False, "terminate_on_tasks_completed": False,
                    "tasks_to_complete": KITCHEN_TASKS[level]},
        max_episode_steps=280 if level == "complete" else 450, eval_env=None,
        has_ref_scores=False, info_keys=("ctrl",), obs_shape=None, action_shape=(9,),
        never_terminated=True, episode_lengths=KITCHEN_LENGTHS,
        source="scripts/D4RL/kitchen/create_franka_dataset.py", level=level,
    )


def _atari_facts(game: str, episodes: int) -> dict[str, Any]:
    return dict(
        family="atari", env_id=f"ALE/{game}-v5", env_kwargs={"repeat_action_probability": 0},
        max_episode_steps=27000, eval_env=None, has_ref_scores=False, info_keys=(),
        obs_shape=(210, 160, 3), action_shape=(), never_terminated=False,
        episodes=episodes, source="scripts/atari/create_datasets.py", game=game,
    )


FACTS: dict[str, dict[str, Any]] = {
    "mujoco/hopper/medium-v0": dict(
        family="mujoco", env_id="Hopper-v5", env_kwargs={}, max_episode_steps=1000,
        eval_env=None, has_ref_scores=False, info_keys=(), obs_shape=(11,), action_shape=(3,),
        never_terminated=False, source="scripts/mujoco/create_dataset.py",
    ),
    "D4RL/antmaze/umaze-v1": _antmaze_facts("umaze", "umaze"),
    "D4RL/antmaze/medium-play-v1": _antmaze_facts("medium", "medium-play"),
    **{f"D4RL/{task}/cloned-v2": _adroit_facts(task) for task in D4RL_ADROIT_REFS},
    **{f"D4RL/kitchen/{level}-v2": _kitchen_facts(level) for level in KITCHEN_TASKS},
    "atari/breakout/expert-v0": _atari_facts("Breakout", 2),
    "atari/pong/expert-v0": _atari_facts("Pong", 1),
}
TWINS: dict[str, str] = {ds_id: facts["family"] for ds_id, facts in FACTS.items()}


# --------------------------------------------------------------------------- helpers
def _register(env_id: str) -> None:
    if env_id.startswith("FrankaKitchen"):
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)


def _make(env_id: str, **kwargs: Any) -> gym.Env:
    """``make_env`` (ALE / robotics registration) that reports an unbuildable env clearly."""
    _register(env_id)
    if not env_id.startswith("FrankaKitchen"):
        return make_env(env_id, **kwargs)
    try:
        return make_env(env_id, **kwargs)
    except Exception as err:  # FrankaKitchen-v1 with mujoco 4: AssertionError in mujoco_utils
        import mujoco

        raise TwinUnavailable(
            f"{env_id} cannot be built here (mujoco {mujoco.__version__}): "
            f"{type(err).__name__}: {err}"
        ) from err


def _copy(obs: Any) -> Any:
    """A deep copy of a (possibly nested dict) observation: some envs reuse their arrays."""
    if isinstance(obs, dict):
        return {k: _copy(v) for k, v in obs.items()}
    return np.array(obs, copy=True)


def _stack(items: list[Any]) -> Any:
    """Stack a list of (possibly nested dict) observations / infos into arrays."""
    if isinstance(items[0], dict):
        return {k: _stack([x[k] for x in items]) for k in items[0]}
    return np.stack([np.asarray(x) for x in items])


def _episode(seed: int, obs: list, actions: list, rewards: list, terms: list, truncs: list,
             infos: list | None) -> EpisodeBuffer:
    return EpisodeBuffer(
        seed=seed, observations=_stack(obs), actions=np.stack(actions),
        rewards=np.asarray(rewards, dtype=np.float64), terminations=np.asarray(terms),
        truncations=np.asarray(truncs), infos=None if infos is None else _stack(infos),
    )


def _env_spec(facts: dict[str, Any]) -> gym.envs.registration.EnvSpec:
    """The data env's spec exactly as the generation script made it."""
    env = _make(facts["env_id"], max_episode_steps=facts["max_episode_steps"],
                **facts["env_kwargs"])
    spec = env.spec
    env.close()
    return spec


def _eval_spec(facts: dict[str, Any]) -> gym.envs.registration.EnvSpec | None:
    """A copy of the data env spec with the eval kwargs (the antmaze script's recipe)."""
    if facts["eval_env"] is None:
        return None
    spec = copy.deepcopy(_env_spec(facts))
    spec.kwargs.update(copy.deepcopy(facts["eval_env"]["kwargs_update"]))
    return spec


# --------------------------------------------------------------------------- collectors
def _hopper(facts: dict[str, Any]) -> tuple[list[EpisodeBuffer], dict[str, Any]]:
    env = _make("Hopper-v5")
    space = env.action_space

    def hold_pose(obs: np.ndarray) -> np.ndarray:
        # PD on the thigh/leg/foot joints (obs 2:5, velocities 8:11) towards 0: stands 1000 steps.
        return np.clip(-10.0 * obs[2:5] - 1.0 * obs[8:11], -1.0, 1.0).astype(space.dtype)

    episodes = []
    for k in range(4):  # seeds 123.. as in the script
        rng = np.random.default_rng(123 + k)
        policy = hold_pose if k == 3 else None
        episodes.append(_rollout(env, 123 + k, lambda o, p=policy, r=rng: _act(
            space, p, o, r, 0.0, 0.0)))
    env.close()
    return episodes, {}


def _antmaze_rollout(env: gym.Env, seed: int, options: dict | None, scale: float
                     ) -> EpisodeBuffer:
    """One continuing-task episode to the time limit with infos as the antmaze callback."""
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed, options=options)

    def step_infos(o: dict, i: dict) -> dict:
        return {"success": bool(i.get("success", False)),
                "qpos": np.concatenate([o["achieved_goal"], o["observation"][:13]]),
                "qvel": o["observation"][13:].copy(), "goal": o["desired_goal"].copy()}

    observations, infos = [_copy(obs)], [step_infos(obs, info)]
    actions, rewards, terms, truncs = [], [], [], []
    truncated = False
    while not truncated:
        action = (scale * rng.uniform(-1.0, 1.0, env.action_space.shape)).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        observations.append(_copy(obs))
        infos.append(step_infos(obs, info))
        actions.append(action)
        rewards.append(float(reward))
        terms.append(bool(terminated))
        truncs.append(bool(truncated))
        assert not terminated, "a continuing AntMaze task never terminates"
    return _episode(seed, observations, actions, rewards, terms, truncs, infos)


def _goal_cell(maze_map: list[list]) -> tuple[int, int]:
    return next((i, j) for i, row in enumerate(maze_map) for j, c in enumerate(row) if c == G)


def _seed_near_goal(env: gym.Env, cell: tuple[int, int], start: int) -> int:
    """First seed from ``start`` whose reset (ant and goal in ``cell``) is within 0.3 of it."""
    for seed in range(start, start + 200):
        obs, _ = env.reset(seed=seed, options={"goal_cell": cell, "reset_cell": cell})
        if np.linalg.norm(obs["achieved_goal"] - obs["desired_goal"]) <= 0.3:
            return seed
    raise RuntimeError("no reset near the goal found")


def _at_goal_and_random(env: gym.Env, cell: tuple[int, int], seed: int) -> list[EpisodeBuffer]:
    near = _seed_near_goal(env, cell, seed)
    options = {"goal_cell": cell, "reset_cell": cell}
    return [_antmaze_rollout(env, near, options, scale=0.1),
            _antmaze_rollout(env, seed + 1, None, scale=1.0)]


def _antmaze(facts: dict[str, Any]) -> tuple[list[EpisodeBuffer], dict[str, Any]]:
    eval_map = facts["eval_env"]["kwargs_update"]["maze_map"]
    env = _make(facts["env_id"], **facts["env_kwargs"])
    # The data goal: the umaze map's g cell; medium-play samples goals, use the eval one.
    data_map = env.unwrapped.maze.maze_map
    cell = _goal_cell(data_map) if any(G in row for row in data_map) else _goal_cell(eval_map)
    episodes = _at_goal_and_random(env, cell, seed=123)
    env.close()
    # Reference scores: returns of the same two behaviours in the eval env (see docstring).
    eval_env = gym.make(_eval_spec(facts))
    ref = [float(np.sum(e.rewards)) for e in _at_goal_and_random(eval_env, _goal_cell(eval_map),
                                                                 seed=1_000)]
    eval_env.close()
    return episodes, {"ref_min_score": ref[1], "ref_max_score": ref[0]}


def _adroit(facts: dict[str, Any]) -> tuple[list[EpisodeBuffer], dict[str, Any]]:
    lengths = facts["episode_lengths"]
    # Collected under a limit at least as long as the longest episode (door/hammer: 300/625
    # in the scripts); the metadata's spec says 200 (Minari #286, #303).
    env = _make(facts["env_id"], max_episode_steps=max(lengths))
    space = env.action_space
    episodes = []
    for k, length in enumerate(lengths):
        rng = np.random.default_rng(k)
        episodes.append(_rollout(
            env, k, lambda o, r=rng: _act(space, lambda _: np.zeros(space.shape), o, r, 0.0, 0.3),
            max_steps=length, record_success=True))
    env.close()
    low, high = facts["ref_scores"]
    return episodes, {"ref_min_score": low, "ref_max_score": high}


def _kitchen(facts: dict[str, Any]) -> tuple[list[EpisodeBuffer], dict[str, Any]]:
    env = _make(facts["env_id"], max_episode_steps=facts["max_episode_steps"],
                **facts["env_kwargs"])
    def ctrl() -> dict[str, np.ndarray]:  # the callback's info: the simulation's control input
        return {"ctrl": env.unwrapped.robot_env.data.ctrl.copy()}

    episodes = []
    for k, length in enumerate(facts["episode_lengths"]):
        rng = np.random.default_rng(k)
        obs, _ = env.reset(seed=k)
        observations, infos = [_copy(obs)], [ctrl()]
        actions, rewards = [], []
        for _ in range(length):
            action = (0.1 * rng.uniform(-1.0, 1.0, 9)).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            assert not (terminated or truncated)
            observations.append(_copy(obs))
            infos.append(ctrl())
            actions.append(action)
            rewards.append(float(reward))
        truncs = [False] * (length - 1) + [True]  # the demonstration ends: truncated at reset
        episodes.append(_episode(k, observations, actions, rewards, [False] * length, truncs,
                                 infos))
    env.close()
    return episodes, {}


def _atari(facts: dict[str, Any]) -> tuple[list[EpisodeBuffer], dict[str, Any]]:
    env = _make(facts["env_id"], max_episode_steps=facts["max_episode_steps"],
                **facts["env_kwargs"])
    space = env.action_space
    episodes = []
    for k in range(facts["episodes"]):
        rng = np.random.default_rng(k)
        episodes.append(_rollout(env, k, lambda o, r=rng: _act(space, None, o, r, 0.0, 0.0)))
    env.close()
    return episodes, {}


COLLECTORS: dict[str, Callable[[dict[str, Any]], tuple[list[EpisodeBuffer], dict[str, Any]]]] = {
    "mujoco": _hopper, "antmaze": _antmaze, "adroit": _adroit, "kitchen": _kitchen,
    "atari": _atari,
}
REQUIREMENTS = {"mujoco": ["mujoco==3.2.3", "gymnasium>=1.0.0"],
                "atari": ["gymnasium[atari,accept-rom-license]"]}


# --------------------------------------------------------------------------- writing
def _create_twin(facts: dict[str, Any], refs: dict[str, Any], spec: DatasetSpec,
                 episodes: list[EpisodeBuffer]) -> None:
    """Write the episodes with the real dataset's metadata into the current datasets root."""
    import minari

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            spec.dataset_id, episodes, env=_env_spec(facts), eval_env=_eval_spec(facts),
            algorithm_name="schema twin (tests/twins.py)", author="cql-calql-reference",
            author_email="none", code_permalink="tests/twins.py",
            description=spec.description, requirements=REQUIREMENTS.get(facts["family"]),
            jpeg_encoding=False, **refs,
        )
    if facts["family"] == "atari":
        _compress_hdf5(datasets_root() / spec.dataset_id / "data")


def build_twin(dataset_id: str, root: str | Path) -> str:
    """Build the twin of ``dataset_id`` into the Minari datasets folder ``root`` (no-op if built).

    Raises ``KeyError`` for an id without a twin and ``TwinUnavailable`` when the
    environment cannot be built with the installed packages.
    """
    facts = FACTS[dataset_id]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _minari_root(root):
        if is_built(dataset_id):
            return dataset_id
        episodes, refs = COLLECTORS[facts["family"]](facts)
        spec = DatasetSpec(
            dataset_id, facts["env_id"], (),
            f"Schema twin of {dataset_id}: the real dataset's structure ({facts['source']} in "
            "minari-dataset-generation-scripts), a few scripted episodes; not the real data.",
        )
        _write_atomically(spec, episodes, False, create=partial(_create_twin, facts, refs))
    return dataset_id


def cache_root(repo_root: str | Path) -> Path:
    """``<repo>/.cache/twins/<hash of this file>``: editing the builder rebuilds the twins."""
    digest = hashlib.sha256(HERE.read_bytes()).hexdigest()[:12]
    return Path(repo_root) / ".cache" / "twins" / digest


if __name__ == "__main__":
    import sys
    import time

    out = cache_root(HERE.parents[1]) if len(sys.argv) < 2 else Path(sys.argv[1])
    for ds_id in FACTS:
        start = time.perf_counter()
        try:
            build_twin(ds_id, out)
        except TwinUnavailable as err:
            print(f"skipped {ds_id}: {err}")
            continue
        print(f"{ds_id}: {time.perf_counter() - start:.1f}s", flush=True)
    print(out)
