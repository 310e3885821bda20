"""Small offline-RL datasets built locally in Minari's own format (no download needed).

Minari cannot download here, so tests and CPU benchmarks use datasets that this module
collects from real gymnasium environments with scripted, seeded behaviour policies and
writes with ``minari.create_dataset_from_buffers``. Building is deterministic: every
episode ``k`` of a segment resets its environment with ``seed + k`` (initial states come
from ``env.reset``, so they follow the evaluation environment's distribution) and draws
its behaviour noise from ``numpy.random.default_rng(seed + k)``.

Datasets (short name -> Minari id), the behaviour that collects each episode, and sizes:

Pendulum-v1 (200-step episodes, ended by truncation only; action bound 2):
    The controller pumps energy ``E = thdot^2/2 + 15 cos(th)`` towards the upright value
    15 (``u = 0.5 (15 - E) sign(thdot)``) and switches to a PD stabilizer
    ``u = -(12 th + 2.5 thdot)`` when ``|th| < 0.6`` and ``|E - 15| < 6``; torques are
    clipped to [-2, 2]. Noise: with probability ``eps`` a uniform random action,
    otherwise controller + Gaussian noise of std ``noise * 2``.
    pendulum-random         local/pendulum/random-v0         100 ep, uniform actions
    pendulum-medium         local/pendulum/medium-v0         100 ep, eps 0.55, noise 0.3
    pendulum-expert         local/pendulum/expert-v0         100 ep, eps 0, noise 0.1
    pendulum-medium-replay  local/pendulum/medium-replay-v0  100 ep, eps 1.0 -> 0.55
                            (linearly over the episodes, noise 0.3): a learning agent's buffer
    pendulum-medium-expert  local/pendulum/medium-expert-v0  the medium and expert episodes
    ref_min_score / ref_max_score: mean return of the uniform random policy / the noise-free
    controller over 100 episodes with reset seeds 100000..100099.

CartPole-v1 (discrete, up to 500 steps; pole falls or cart leaves -> termination):
    Balancing controller: push right iff ``0.5 x + xdot + 10 th + 2 thdot > 0`` (500 steps
    from every tested start). "Tilted" controller: push right iff ``th - 0.04 + 0.5 thdot
    > 0``; it holds the pole leaning, drives the cart off the track after about 150-500
    steps, and so visits a narrow part of the state space. ``eps`` = epsilon-random.
    cartpole-random   local/cartpole/random-v0   200 ep, uniform actions
    cartpole-medium   local/cartpole/medium-v0   100 ep, tilted controller, eps 0.05
    cartpole-expert   local/cartpole/expert-v0    50 ep, balancing controller, eps 0.1
    cartpole-mixed    local/cartpole/mixed-v0    the first 100 random, 50 medium and 25
                                                 expert episodes of the three above
    ref scores: uniform random policy / noise-free balancing controller, as for Pendulum.

ALE/Pong-v5 (frame-skip 4, sticky actions 0.25, raw 210x160x3 RGB frames):
    pong-random       local/ale-pong/random-v0   uniform random actions, 2500 transitions in
                      all (random Pong episodes last about 900 steps; the last one is
                      truncated by the budget). Frames are stored exactly (``jpeg_encoding=
                      False``) and the HDF5 file is then repacked with lossless gzip, which
                      shrinks it from about 250 MB to a few MB. No reference scores.

Sparse-reward tasks with a per-step ``success`` info (for calql_finetune.py's binary
pipeline: reward ``success - 1``, success terminal, failures dropped, cut after the last
success). Episodes store ``infos["success"]`` with T+1 entries (the reset's, False, first),
as Minari's own collectors write them.

PointMaze_UMaze-v3 on a 1x4 corridor (``maze_map`` [[1]*6, [1, r, 0, 0, g, 1], [1]*6],
``continuing_task=False``: the episode terminates at the goal; 100-step limit; sparse
reward 1 at success):
    The controller drives the ball at the goal, ``a = clip(2 (goal - x) - 0.5 v, -1, 1)``
    (the shortest path needs about 65 steps). Noise as for Pendulum (bound 1).
    pointmaze-binary  local/pointmaze/sparse-v0  100 ep, eps 0.6, noise 1.0: about 50 % of
                                                 the episodes reach the goal (the data of
                                                 calql_finetune.py --env pointmaze-binary;
                                                 old name pointmaze-sparse still accepted)
PointMaze_UMaze-v3 on its own U-maze, by the recipe of Minari's D4RL/pointmaze datasets
(``continuing_task=True, reset_target=True``: a new random goal cell at each success):
    One continuing run of a waypoint controller on a QIteration cell path (gains 10 / -1)
    with N(0, 0.5^2) action noise, cut into episodes at each success (truncation; the next
    episode starts where it ended, with the new goal). Eval env: goal cell fixed at row 1,
    column 1, random resets, 300 steps (Minari's EVAL_ENV_MAPS["umaze"]).
    pointmaze-umaze-binary  local/pointmaze/umaze-v0  30000 steps, 386 episodes, all but the
                                                 last end at success (calql_finetune.py --env
                                                 pointmaze-binary --dataset-id
                                                 local/pointmaze/umaze-v0 --horizon 300)
AdroitHandPen-v1 (100-step episodes ended by truncation; dense rewards stored, as in
``D4RL/pen/cloned-v2``, whose env spec also has ``max_episode_steps=100``):
    Actions: Gaussian noise of std 0.3 around the hand's mean posture (action 0). The pen
    falls through the target orientation in about 15 % of the episodes (success for a few
    steps around step 10-45), the rest fail.
    pen-cloned-local  local/pen/cloned-v0        40 ep, noise 0.3 (a stand-in for
                                                 D4RL/pen/cloned-v2, which no --env loads
                                                 by default: calql_finetune.py --env
                                                 pen-binary --dataset-id local/pen/cloned-v0)

Each short name is the ``--env`` name of the script that trains on it (pen-cloned-local
and pointmaze-umaze-binary aside, see above); ALIASES keeps earlier names working.

Command line: ``python benchmark/datasets.py [NAME ...] [--force] [--list]`` (no names:
build all). Datasets go to Minari's datasets folder (``MINARI_DATASETS_PATH`` if set).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from minari.data_collector import EpisodeBuffer

if __package__ in (None, ""):  # `python benchmark/datasets.py`: make `benchmark` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import HelpFormatter

Policy = Callable[[np.ndarray], Any]

REF_EPISODES = 100
REF_SEED = 100_000


# --------------------------------------------------------------------------- controllers
def pendulum_controller(obs: np.ndarray) -> float:
    """Energy-based swing-up with a PD stabilizer near upright for Pendulum-v1 (torque)."""
    cos_th, sin_th, thdot = (float(x) for x in obs)
    th = np.arctan2(sin_th, cos_th)
    # Pendulum-v1: thddot = 15 sin(th) + 3 u, so E = thdot^2/2 + 15 cos(th) has dE/dt = 3 u thdot.
    energy = 0.5 * thdot**2 + 15.0 * cos_th
    if abs(th) < 0.6 and abs(energy - 15.0) < 6.0:
        torque = -(12.0 * th + 2.5 * thdot)
    else:
        torque = 0.5 * (15.0 - energy) * (1.0 if thdot >= 0.0 else -1.0)
    return float(np.clip(torque, -2.0, 2.0))


def cartpole_controller(obs: np.ndarray) -> int:
    """Linear balancing controller for CartPole-v1 that keeps the pole up for 500 steps."""
    x, xdot, th, thdot = (float(v) for v in obs)
    return int(0.5 * x + xdot + 10.0 * th + 2.0 * thdot > 0.0)


def cartpole_tilted_controller(obs: np.ndarray) -> int:
    """A mediocre CartPole controller: holds the pole tilted, so the cart drifts off the track."""
    _, _, th, thdot = (float(v) for v in obs)
    return int(th - 0.04 + 0.5 * thdot > 0.0)


def pointmaze_controller(obs: dict[str, np.ndarray]) -> np.ndarray:
    """PD controller driving the PointMaze ball straight at the goal (force in [-1, 1]^2)."""
    pos, vel = obs["observation"][:2], obs["observation"][2:4]
    return np.clip(2.0 * (obs["desired_goal"] - pos) - 0.5 * vel, -1.0, 1.0)


# PointMaze U-maze by the recipe of Minari's D4RL/pointmaze datasets (Farama-Foundation/
# minari-dataset-generation-scripts, scripts/pointmaze/): create_pointmaze_dataset.py makes
# PointMaze_UMaze-v3 a continuing task (continuing_task=True, reset_target=True: a new random
# goal cell each time the goal is reached), acts with controller.py's WaypointController
# (gains p=10, d=-1, waypoint threshold 0.1, waypoints = cell centres shifted by -U(0, 0.2)
# per axis, the last one the goal itself) on maze_solver.py's QIteration path (value
# iteration on the cell grid: reward 1 on entering the goal cell, discount 0.99, 50 sweeps),
# adds N(0, 0.5^2) noise to each action and clips it to [-1, 1], and ends an episode
# (truncation) at every success step. Its eval env (EVAL_ENV_MAPS["umaze"]) fixes the goal
# cell at row 1, column 1 and resets anywhere else, continuing_task=True, reset_target=False.
# Ours differs in size only (30,000 steps, CPU-sized; the script collects 1,000,000) and in
# storing T+1 observations per episode (the next one starts where the last one ended).
UMAZE = [[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 1, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
UMAZE_EVAL = [[1, 1, 1, 1, 1], [1, "g", 0, 0, 1], [1, 1, 1, 0, 1], [1, 0, 0, 0, 1],
              [1, 1, 1, 1, 1]]
_MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))  # the planner's four cell moves


def maze_next_cells(maze_map: list[list[Any]], goal: tuple[int, int], sweeps: int = 50,
                    gamma: float = 0.99) -> dict[tuple[int, int], tuple[int, int]]:
    """Greedy next cell towards ``goal`` from every free cell (value iteration: reward 1 for
    entering the goal cell; a move into a wall stays put and earns nothing)."""
    free = [(r, c) for r, row in enumerate(maze_map) for c, v in enumerate(row) if v != 1]

    def move(cell: tuple[int, int], d: tuple[int, int]) -> tuple[int, int] | None:
        nxt = (cell[0] + d[0], cell[1] + d[1])
        return nxt if nxt in free else None

    value = dict.fromkeys(free, 0.0)
    for _ in range(sweeps):
        value = {c: max((float(n == goal) + gamma * value[n]) if (n := move(c, d)) else 0.0
                        for d in _MOVES) for c in free}
    best = {}
    for c in free:
        scores = [(float(n == goal) + gamma * value[n]) if (n := move(c, d)) else -1.0
                  for d in _MOVES]
        best[c] = move(c, _MOVES[int(np.argmax(scores))]) or c
    return best


class WaypointController:
    """Drive the PointMaze ball along the planner's cell path to ``desired_goal``.

    Plans when the goal changes; heads for the next cell centre (jittered by -U(0, 0.2) per
    axis after the first) and switches once within 0.1 of it; in the goal cell it heads for
    the goal. Action: ``10 (target - x) - 1 v`` (unclipped; the caller adds noise, clips).
    """

    def __init__(self, maze: Any, rng: np.random.Generator):
        self.maze, self.rng = maze, rng
        self.goal_xy: np.ndarray | None = None

    def _cell(self, xy: np.ndarray) -> tuple[int, int]:
        row, col = self.maze.cell_xy_to_rowcol(xy)
        return int(row), int(col)

    def _aim(self, cell: tuple[int, int], jitter: bool) -> None:
        self.target_cell = cell
        if cell == self.goal_cell:
            self.target_xy = np.asarray(self.goal_xy, dtype=np.float64)
        else:
            centre = np.asarray(self.maze.cell_rowcol_to_xy(np.array(cell)), dtype=np.float64)
            self.target_xy = centre - (self.rng.uniform(size=2) * 0.2 if jitter else 0.0)

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        pos, vel = obs["achieved_goal"], obs["observation"][2:4]
        if self.goal_xy is None or np.linalg.norm(self.goal_xy - obs["desired_goal"]) > 1e-3:
            self.goal_xy = np.array(obs["desired_goal"], dtype=np.float64)
            self.goal_cell = self._cell(self.goal_xy)
            self.path = maze_next_cells(self.maze.maze_map, self.goal_cell)
            here = self._cell(pos)
            self._aim(self.goal_cell if here == self.goal_cell else self.path[here], False)
        if (self.target_cell != self.goal_cell
                and np.linalg.norm(self.target_xy - pos) <= 0.1):
            self._aim(self.path[self.target_cell], True)
        return 10.0 * (self.target_xy - pos) - 1.0 * vel


def adroit_rest_controller(obs: np.ndarray) -> np.ndarray:
    """The Adroit hand's mean posture (action 0 is the middle of every joint's range)."""
    del obs
    return np.zeros(24)


# --------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Segment:
    """Consecutive episodes collected by one behaviour schedule.

    Episode ``k`` resets with ``seed + k``; with probability ``eps`` (linearly from
    ``eps[0]`` at the first episode to ``eps[1]`` at the last) an action is uniform random,
    otherwise it is ``policy(obs)`` plus Gaussian noise of std ``noise * action bound``
    (continuous actions only). ``policy=None`` means uniform random actions throughout.
    """

    episodes: int
    seed: int
    policy: Policy | None = None
    eps: tuple[float, float] = (0.0, 0.0)
    noise: float = 0.0

    def eps_at(self, k: int) -> float:
        """Epsilon-random probability of episode ``k``."""
        frac = k / (self.episodes - 1) if self.episodes > 1 else 0.0
        return self.eps[0] + (self.eps[1] - self.eps[0]) * frac


@dataclass(frozen=True)
class DatasetSpec:
    """What to collect for one dataset and how to store it."""

    dataset_id: str
    env_id: str
    segments: tuple[Segment, ...]
    description: str
    ref_policy: Policy | None = None  # noise-free controller for ref_max_score; None: no refs
    max_steps: int | None = None  # total transition budget; the last episode is truncated
    image_obs: bool = False  # exact frames (no JPEG) and a gzip-repacked HDF5 file
    env_kwargs: dict[str, Any] = field(default_factory=dict)  # gym.make keyword arguments
    record_success: bool = False  # store the env's per-step ``success`` info
    eval_env_kwargs: dict[str, Any] | None = None  # the eval env's kwargs; None: the data env's
    collector: Callable[[DatasetSpec], list[EpisodeBuffer]] | None = None  # None: segments


POINTMAZE_CORRIDOR = [[1, 1, 1, 1, 1, 1], [1, "r", 0, 0, "g", 1], [1, 1, 1, 1, 1, 1]]
_PEND_RANDOM = Segment(100, seed=0)
_PEND_MEDIUM = Segment(100, seed=1_000, policy=pendulum_controller, eps=(0.55, 0.55), noise=0.3)
_PEND_EXPERT = Segment(100, seed=2_000, policy=pendulum_controller, noise=0.1)
_PEND_REPLAY = Segment(100, seed=3_000, policy=pendulum_controller, eps=(1.0, 0.55), noise=0.3)
_CP_RANDOM = Segment(200, seed=0)
_CP_MEDIUM = Segment(100, seed=1_000, policy=cartpole_tilted_controller, eps=(0.05, 0.05))
_CP_EXPERT = Segment(50, seed=2_000, policy=cartpole_controller, eps=(0.1, 0.1))


def _first(segment: Segment, episodes: int) -> Segment:
    """The first ``episodes`` episodes of a constant-epsilon segment (identical data)."""
    assert segment.eps[0] == segment.eps[1], "only constant schedules can be cut"
    return Segment(episodes, segment.seed, segment.policy, segment.eps, segment.noise)


def _pendulum(level: str, segments: tuple[Segment, ...], what: str) -> DatasetSpec:
    return DatasetSpec(
        f"local/pendulum/{level}-v0", "Pendulum-v1", segments,
        f"Pendulum-v1, {what}. Scripted energy swing-up + PD controller; see "
        "benchmark/datasets.py for noise levels.",
        ref_policy=pendulum_controller,
    )


def _cartpole(level: str, segments: tuple[Segment, ...], what: str) -> DatasetSpec:
    return DatasetSpec(
        f"local/cartpole/{level}-v0", "CartPole-v1", segments,
        f"CartPole-v1, {what}. Scripted linear controllers; see benchmark/datasets.py.",
        ref_policy=cartpole_controller,
    )


LOCAL_DATASETS: dict[str, DatasetSpec] = {
    "pendulum-random": _pendulum("random", (_PEND_RANDOM,), "uniform random actions"),
    "pendulum-medium": _pendulum(
        "medium", (_PEND_MEDIUM,), "controller with eps-random 0.55 and noise std 0.3"
    ),
    "pendulum-expert": _pendulum("expert", (_PEND_EXPERT,), "controller with noise std 0.1"),
    "pendulum-medium-replay": _pendulum(
        "medium-replay", (_PEND_REPLAY,), "eps-random annealed from 1.0 to 0.55, noise std 0.3"
    ),
    "pendulum-medium-expert": _pendulum(
        "medium-expert", (_PEND_MEDIUM, _PEND_EXPERT), "the medium and expert episodes"
    ),
    "cartpole-random": _cartpole("random", (_CP_RANDOM,), "uniform random actions"),
    "cartpole-medium": _cartpole(
        "medium", (_CP_MEDIUM,), "tilted controller with eps-random 0.05"
    ),
    "cartpole-expert": _cartpole(
        "expert", (_CP_EXPERT,), "balancing controller with eps-random 0.1"
    ),
    "cartpole-mixed": _cartpole(
        "mixed",
        (_first(_CP_RANDOM, 100), _first(_CP_MEDIUM, 50), _first(_CP_EXPERT, 25)),
        "100 random, 50 medium and 25 expert episodes",
    ),
    "pong-random": DatasetSpec(
        "local/ale-pong/random-v0", "ALE/Pong-v5", (Segment(10, seed=0),),
        "ALE/Pong-v5 (frame-skip 4, sticky actions 0.25), uniform random actions, raw RGB "
        "frames stored exactly, 2500 transitions.",
        max_steps=2500, image_obs=True,
    ),
    "pointmaze-binary": DatasetSpec(  # calql_finetune.py --env pointmaze-binary
        "local/pointmaze/sparse-v0", "PointMaze_UMaze-v3",
        (Segment(100, seed=0, policy=pointmaze_controller, eps=(0.6, 0.6), noise=1.0),),
        "PointMaze 1x4 corridor, sparse reward, episode ends at the goal (100 steps max); "
        "noisy goal-seeking controller (eps-random 0.6, noise std 1.0), about 50 % success; "
        "per-step 'success' infos.",
        env_kwargs=dict(maze_map=POINTMAZE_CORRIDOR, continuing_task=False,
                        reward_type="sparse", max_episode_steps=100),
        record_success=True,
    ),
    "pointmaze-umaze-binary": DatasetSpec(  # calql_finetune.py --dataset-id ...umaze-v0
        "local/pointmaze/umaze-v0", "PointMaze_UMaze-v3", (),
        "PointMaze U-maze by the recipe of Minari's D4RL/pointmaze datasets: one continuing "
        "run (random goal cells, a new one at each success) of a QIteration waypoint "
        "controller with Gaussian action noise std 0.5, 30000 steps split into episodes at "
        "every success (truncation); per-step 'success' infos. Eval env: goal cell fixed at "
        "row 1, column 1, random resets, 300 steps.",
        max_steps=30_000,
        env_kwargs=dict(maze_map=UMAZE, continuing_task=True, reset_target=True,
                        reward_type="sparse", max_episode_steps=1_000_000),
        eval_env_kwargs=dict(maze_map=UMAZE_EVAL, continuing_task=True, reset_target=False,
                             reward_type="sparse", max_episode_steps=300),
        record_success=True,
        collector=lambda spec: collect_continuing_maze(spec, seed=0, noise=0.5),
    ),
    "pen-cloned-local": DatasetSpec(
        "local/pen/cloned-v0", "AdroitHandPen-v1",
        (Segment(40, seed=0, policy=adroit_rest_controller, noise=0.3),),
        "AdroitHandPen-v1, the structure of D4RL/pen/cloned-v2 (100-step episodes, dense "
        "rewards, per-step 'success' infos); Gaussian actions around the rest posture, "
        "about 15 % of the episodes succeed.",
        env_kwargs=dict(max_episode_steps=100), record_success=True,
    ),
}


# Earlier short names -> the current ones (the --env names of the data).
ALIASES = {"pointmaze-sparse": "pointmaze-binary"}


def canonical(name: str) -> str:
    """The current short name of a name or alias (anything else unchanged)."""
    return ALIASES.get(name, name)


def is_local(name: str) -> bool:
    """Whether a short name, alias or ``local/`` id names a dataset built here."""
    return canonical(name) in LOCAL_DATASETS or name.startswith("local/")


def closest(name: str) -> str:
    """' (did you mean X?)' for the nearest short name or local id, else ''."""
    known = [*LOCAL_DATASETS, *ALIASES, *(spec.dataset_id for spec in LOCAL_DATASETS.values())]
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def dataset_id(name: str) -> str:
    """Map a short name (``pendulum-medium``) or alias to its Minari id; an id passes through."""
    if canonical(name) in LOCAL_DATASETS:
        return LOCAL_DATASETS[canonical(name)].dataset_id
    if "/" in name:
        return name
    raise KeyError(f"unknown dataset {name!r}{closest(name)}; known: {', '.join(LOCAL_DATASETS)}")


def _spec(name_or_id: str) -> DatasetSpec:
    """The spec of a short name or of a local dataset id."""
    wanted = dataset_id(name_or_id)
    for spec in LOCAL_DATASETS.values():
        if spec.dataset_id == wanted:
            return spec
    raise KeyError(f"{name_or_id!r} is not a locally buildable dataset{closest(name_or_id)}")


# --------------------------------------------------------------------------- collection
def make_env(env_id: str, **kwargs: Any) -> gym.Env:
    """``gym.make`` that first registers the ALE / gymnasium-robotics environments."""
    if env_id.startswith("ALE/"):
        import ale_py

        gym.register_envs(ale_py)
    if env_id.startswith(("AdroitHand", "PointMaze", "AntMaze")):
        notice = io.StringIO()  # its import warns about three Adroit envs: shown for those only
        with contextlib.redirect_stderr(notice):
            import gymnasium_robotics
        gym.register_envs(gymnasium_robotics)
        if env_id.startswith(("AdroitHandDoor", "AdroitHandHammer", "AdroitHandRelocate")):
            print(notice.getvalue().strip(), file=sys.stderr)
    return gym.make(env_id, **kwargs)


def _uniform_action(space: gym.Space, rng: np.random.Generator) -> Any:
    if isinstance(space, gym.spaces.Discrete):
        return int(space.start + rng.integers(space.n))
    assert isinstance(space, gym.spaces.Box)
    return rng.uniform(space.low, space.high).astype(space.dtype)


def _act(
    space: gym.Space, policy: Policy | None, obs: np.ndarray, rng: np.random.Generator,
    eps: float, noise: float,
) -> Any:
    """One behaviour action: epsilon-random, else the controller (+ Gaussian noise)."""
    if policy is None or rng.random() < eps:
        return _uniform_action(space, rng)
    action = policy(obs)
    if isinstance(space, gym.spaces.Discrete):
        return int(action)
    action = np.asarray(action, dtype=np.float64).reshape(space.shape)
    if noise > 0.0:
        action = action + noise * space.high * rng.standard_normal(space.shape)
    return np.clip(action, space.low, space.high).astype(space.dtype)


def _rollout(
    env: gym.Env, seed: int, choose: Callable[[np.ndarray], Any], max_steps: int | None = None,
    record_success: bool = False,
) -> EpisodeBuffer:
    """Run one episode from ``env.reset(seed=seed)``; stop early (truncate) at ``max_steps``.

    ``record_success``: store ``infos={"success": [False, s_1, ..., s_T]}`` (reset first).
    """
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards, terms, truncs = [obs], [], [], [], []
    success = [False]
    while True:
        action = choose(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        success.append(bool(info.get("success", False)))
        truncated = truncated or (max_steps is not None and len(rewards) + 1 >= max_steps)
        observations.append(obs)
        actions.append(action)
        rewards.append(float(reward))
        terms.append(bool(terminated))
        truncs.append(bool(truncated) and not terminated)
        if terminated or truncated:
            break
    if isinstance(observations[0], dict):  # dict observations: one stacked array per key
        stacked: Any = {k: np.stack([o[k] for o in observations]) for k in observations[0]}
    else:
        stacked = np.stack(observations)
    return EpisodeBuffer(
        seed=seed,
        observations=stacked,
        actions=np.stack([np.asarray(a) for a in actions]),
        rewards=np.asarray(rewards, dtype=np.float64),
        terminations=np.asarray(terms),
        truncations=np.asarray(truncs),
        infos={"success": np.asarray(success)} if record_success else None,
    )


def collect_segment(
    env: gym.Env, segment: Segment, budget: int | None = None, record_success: bool = False
) -> list[EpisodeBuffer]:
    """Collect a segment's episodes; stop once ``budget`` transitions are collected."""
    episodes: list[EpisodeBuffer] = []
    for k in range(segment.episodes):
        left = None if budget is None else budget - sum(len(e) for e in episodes)
        if left is not None and left <= 0:
            break
        rng = np.random.default_rng(segment.seed + k)
        eps = segment.eps_at(k)

        def choose(obs: np.ndarray, rng: np.random.Generator = rng, eps: float = eps) -> Any:
            return _act(env.action_space, segment.policy, obs, rng, eps, segment.noise)

        episodes.append(_rollout(env, segment.seed + k, choose, left, record_success))
    return episodes


def collect_continuing_maze(spec: DatasetSpec, seed: int, noise: float) -> list[EpisodeBuffer]:
    """``spec.max_steps`` steps of one continuing PointMaze run (a single reset with
    ``seed``), cut into episodes at each success step (truncation, not termination, as
    Minari's PointMazeStepDataCallback). The next episode starts from the same state with
    the new goal that the env drew (it is in the next step's observation; the env's own
    observation at the success step still shows the old one). Actions: WaypointController
    + N(0, noise^2) per axis, clipped to the action bounds; controller jitter and noise
    come from ``numpy.random.default_rng(seed)``. The last episode ends at the budget."""
    assert spec.max_steps is not None, "a continuing run needs a step budget"
    env = make_env(spec.env_id, **spec.env_kwargs)
    rng = np.random.default_rng(seed)
    controller = WaypointController(env.unwrapped.maze, rng)  # type: ignore[attr-defined]
    space = env.action_space
    obs, _ = env.reset(seed=seed)
    episodes: list[EpisodeBuffer] = []
    observations, actions, rewards, success = [obs], [], [], [False]
    try:
        for step in range(spec.max_steps):
            action = controller(obs) + noise * space.high * rng.standard_normal(space.shape)
            action = np.clip(action, space.low, space.high).astype(space.dtype)
            obs, reward, _, _, info = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(float(reward))
            success.append(bool(info["success"]))
            if not (success[-1] or step + 1 == spec.max_steps):
                continue
            n = len(actions)
            episodes.append(EpisodeBuffer(
                seed=seed if not episodes else None,
                observations={k: np.stack([o[k] for o in observations]) for k in obs},
                actions=np.stack(actions), rewards=np.asarray(rewards, dtype=np.float64),
                terminations=np.zeros(n, dtype=bool),
                truncations=np.arange(n) == n - 1,
                infos={"success": np.asarray(success)} if spec.record_success else None))
            obs = dict(obs, desired_goal=env.unwrapped.goal.copy())  # type: ignore[attr-defined]
            observations, actions, rewards, success = [obs], [], [], [False]
    finally:
        env.close()
    return episodes


def collect(spec: DatasetSpec) -> list[EpisodeBuffer]:
    """All episodes of a dataset, in order."""
    if spec.collector is not None:
        return spec.collector(spec)
    env = make_env(spec.env_id, **spec.env_kwargs)
    try:
        episodes: list[EpisodeBuffer] = []
        for segment in spec.segments:
            left = None if spec.max_steps is None else spec.max_steps - _steps(episodes)
            episodes += collect_segment(env, segment, left, spec.record_success)
        return episodes
    finally:
        env.close()


def _steps(episodes: Sequence[EpisodeBuffer]) -> int:
    return sum(len(e) for e in episodes)


def _returns(episodes: Sequence[EpisodeBuffer]) -> np.ndarray:
    return np.array([float(np.sum(e.rewards)) for e in episodes])


@cache
def ref_scores(env_id: str, policy: Policy) -> tuple[float, float]:
    """(mean return of uniform random actions, mean return of the noise-free controller).

    Both over ``REF_EPISODES`` episodes with reset seeds ``REF_SEED + k``.
    """
    env = make_env(env_id)
    try:
        random = collect_segment(env, Segment(REF_EPISODES, REF_SEED))
        expert = collect_segment(env, Segment(REF_EPISODES, REF_SEED, policy=policy))
    finally:
        env.close()
    return float(_returns(random).mean()), float(_returns(expert).mean())


# --------------------------------------------------------------------------- writing
def datasets_root() -> Path:
    """Minari's datasets folder (``MINARI_DATASETS_PATH`` if set)."""
    from minari.storage.datasets_root_dir import get_dataset_path

    return Path(get_dataset_path())


def is_built(name_or_id: str) -> bool:
    """Whether a complete dataset (metadata written after all episodes) exists locally."""
    meta = datasets_root() / dataset_id(name_or_id) / "data" / "metadata.json"
    try:
        return json.loads(meta.read_text()).get("total_episodes", 0) > 0
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _minari_root(path: Path) -> Iterator[None]:
    """Temporarily point ``MINARI_DATASETS_PATH`` at ``path``."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _create(spec: DatasetSpec, episodes: list[EpisodeBuffer]) -> None:
    """Write ``episodes`` with Minari into the current datasets root."""
    import minari

    refs: dict[str, float] = {}
    if spec.ref_policy is not None:
        low, high = ref_scores(spec.env_id, spec.ref_policy)
        refs = {"ref_min_score": low, "ref_max_score": high}
    env = make_env(spec.env_id, **spec.env_kwargs)
    eval_env = env if spec.eval_env_kwargs is None else make_env(spec.env_id,
                                                                 **spec.eval_env_kwargs)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*author_email")
            minari.create_dataset_from_buffers(
                spec.dataset_id, episodes, env=env.spec, eval_env=eval_env.spec,
                algorithm_name="scripted controller with noise (benchmark/datasets.py)",
                author="cql-calql-reference", code_permalink="benchmark/datasets.py",
                description=spec.description, jpeg_encoding=not spec.image_obs, **refs,
            )
    finally:
        env.close()
        eval_env.close()
    if spec.image_obs:
        _compress_hdf5(datasets_root() / spec.dataset_id / "data")


def _copy_h5(src: Any, dst: Any) -> None:
    """Copy an HDF5 group recursively, gzip-compressing datasets larger than 1 MB."""
    import h5py

    dst.attrs.update(src.attrs)
    for key, item in src.items():
        if isinstance(item, h5py.Group):
            _copy_h5(item, dst.create_group(key, track_order=True))
            continue
        big = item.nbytes > 2**20
        chunks = (1, *item.shape[1:]) if big and item.ndim >= 3 else (True if big else item.chunks)
        out = dst.create_dataset(
            key, data=item[()], chunks=chunks, maxshape=item.maxshape if chunks else None,
            compression="gzip" if big else None, compression_opts=1 if big else None,
        )
        out.attrs.update(item.attrs)


def _compress_hdf5(data_dir: Path) -> None:
    """Repack Minari's HDF5 file with lossless gzip (exact frames, a fraction of the size)."""
    import h5py
    from minari.dataset.minari_storage import MinariStorage

    main, tmp = data_dir / "main_data.hdf5", data_dir / "main_data.hdf5.tmp"
    with h5py.File(main, "r") as src, h5py.File(tmp, "w", track_order=True) as dst:
        _copy_h5(src, dst)
    os.replace(tmp, main)
    storage = MinariStorage.read(data_dir)
    storage.update_metadata({"dataset_size": storage.get_size()})


def _ensure_namespace(ds_id: str) -> None:
    """Create the dataset's namespace metadata in the datasets root if missing."""
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.namespace import create_namespace, list_local_namespaces

    namespace = parse_dataset_id(ds_id)[0]
    if namespace is not None and namespace not in list_local_namespaces():
        with contextlib.suppress(ValueError):  # created concurrently
            create_namespace(namespace, description="Datasets built by benchmark/datasets.py")


def _write_atomically(
    spec: DatasetSpec, episodes: list[EpisodeBuffer], force: bool,
    create: Callable[[DatasetSpec, list[EpisodeBuffer]], None] = _create,
) -> None:
    """Create the dataset in a hidden staging root, then move it into place in one rename.

    A failure half-way leaves nothing behind (the staging folder is always removed), so a
    later build never meets a half-written folder that Minari would refuse to overwrite.
    ``create`` writes the dataset into the current datasets root (tests/twins.py passes its
    own, with the real datasets' metadata).
    """
    root = datasets_root()
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        with _minari_root(staging):
            create(spec, episodes)
        final = root / spec.dataset_id
        if final.exists() and (force or not is_built(spec.dataset_id)):
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging / spec.dataset_id, final)
        except OSError:
            if not is_built(spec.dataset_id):  # not a concurrent build of the same data
                raise
        _ensure_namespace(spec.dataset_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def summary(spec: DatasetSpec, episodes: Sequence[EpisodeBuffer]) -> str:
    """One line: id, episodes, transitions, mean return (and normalized score if defined)."""
    mean = float(_returns(episodes).mean())
    line = f"{spec.dataset_id}: {len(episodes)} episodes, {_steps(episodes)} transitions, "
    line += f"mean return {mean:.1f}"
    if spec.ref_policy is not None:
        low, high = ref_scores(spec.env_id, spec.ref_policy)
        line += f" (normalized {100.0 * (mean - low) / (high - low):.1f})"
    return line


def build(name: str, *, force: bool = False) -> str:
    """Build a dataset into Minari's datasets folder and return its id.

    A no-op when the dataset already exists, unless ``force``.
    """
    spec = _spec(name)
    if is_built(spec.dataset_id) and not force:
        return spec.dataset_id
    start = time.perf_counter()
    episodes = collect(spec)
    _write_atomically(spec, episodes, force)
    print(f"built {summary(spec, episodes)} in {time.perf_counter() - start:.1f}s", flush=True)
    return spec.dataset_id


def ensure(name_or_id: str) -> str:
    """Return the dataset id, building the dataset first if it is missing."""
    ds_id = dataset_id(name_or_id)
    if is_built(ds_id):
        return ds_id
    return build(name_or_id)


# --------------------------------------------------------------------------- CLI
def _list() -> None:
    """Print every dataset with its id and whether it is built."""
    print(f"datasets root: {datasets_root()}")
    for name, spec in LOCAL_DATASETS.items():
        state = "built" if is_built(spec.dataset_id) else "missing"
        old = [alias for alias, new in ALIASES.items() if new == name]
        print(f"{name:24s} {spec.dataset_id:34s} {state}"
              + (f"  (also: {', '.join(old)})" if old else ""))


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: build the named datasets (all when none is named), or ``--list`` them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="short names (= --env names) or ids (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    parser.add_argument("--list", action="store_true", help="list datasets and exit")
    args = parser.parse_args(argv)
    if args.list:
        _list()
        return
    unknown = [n for n in args.names if canonical(n) not in LOCAL_DATASETS
               and n not in {spec.dataset_id for spec in LOCAL_DATASETS.values()}]
    if unknown:
        parser.exit(2, f"error: unknown dataset {', '.join(n + closest(n) for n in unknown)}; "
                       f"buildable here: {', '.join(LOCAL_DATASETS)} (or their ids, see "
                       "--list)\n")
    for name in args.names or list(LOCAL_DATASETS):
        if not args.force and is_built(name):
            print(f"present {dataset_id(name)} (use --force to rebuild)", flush=True)
            continue
        build(name, force=args.force)


if __name__ == "__main__":
    main()
