"""Every environment the presets name builds, steps and resets with the installed versions.

A dependency release that breaks one (mujoco 4.0.0 and FrankaKitchen-v1, a renamed Adroit
env) fails here, in CI, before a user meets it. The env of each real dataset is the one its
Minari generation script records (tests/twins.py FACTS, extended to every maze, robot and
game of the family); local datasets name theirs in benchmark/datasets.py.
"""

from __future__ import annotations

import re

import ale_py
import gymnasium as gym
import gymnasium_robotics
import numpy as np
import pytest
import twins

import calql_finetune
import cql_qrdqn_atari
import cql_sac_continuous
from benchmark import datasets

ROBOTS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5",
          "ant": "Ant-v5"}  # Minari scripts/mujoco: the v5 envs
MAZES = {"umaze": "AntMaze_UMaze-v4", "medium": "AntMaze_Medium-v4",
         "large": "AntMaze_Large-v4"}  # Minari scripts/antmaze (v1 datasets)
ADROIT = {"pen": "AdroitHandPen-v1", "door": "AdroitHandDoor-v1",
          "relocate": "AdroitHandRelocate-v1", "hammer": "AdroitHandHammer-v1"}


def env_of_dataset(dataset_id: str) -> tuple[str, dict]:
    """The environment (id, kwargs) a dataset was collected in."""
    if dataset_id in twins.FACTS:
        facts = twins.FACTS[dataset_id]
        return facts["env_id"], dict(facts["env_kwargs"])
    if dataset_id.startswith("local/"):
        spec = datasets._spec(dataset_id)
        return spec.env_id, dict(spec.env_kwargs)
    family, name = dataset_id.split("/")[:2]
    if family == "mujoco":
        return ROBOTS[name], {}
    if name == "antmaze":
        maze = re.match(r"D4RL/antmaze/(umaze|medium|large)", dataset_id).group(1)
        return MAZES[maze], dict(continuing_task=True, reset_target=False)
    if name in ADROIT:
        return ADROIT[name], {}
    if name == "kitchen":
        return twins.FACTS["D4RL/kitchen/mixed-v2"]["env_id"], {}
    raise KeyError(f"no environment known for {dataset_id}")


def preset_envs() -> list[tuple[str, str, dict]]:
    """(label, env id, kwargs) for every --env of the three scripts."""
    out = []
    for module in (cql_sac_continuous, calql_finetune):
        for name in module.ENV_PRESETS:
            dataset_id = module.preset_args(name).dataset_id
            out.append((f"{module.__name__}:{name}", *env_of_dataset(dataset_id)))
    atari = cql_qrdqn_atari
    for name in atari.PAPER_GAMES:
        out.append((f"cql_qrdqn_atari:{name}", atari.ale_env_id(atari.atari_game(name)), {}))
    for name, dataset_id in atari.LOCAL_ENVS.items():
        out.append((f"cql_qrdqn_atari:{name}", *env_of_dataset(dataset_id)))
    return out


gym.register_envs(ale_py)
gym.register_envs(gymnasium_robotics)
ENVS = preset_envs()


def test_every_family_is_covered():
    ids = {env_id for _, env_id, _ in ENVS}
    for needed in ("FrankaKitchen-v1", "AdroitHandPen-v1", "AdroitHandHammer-v1",
                   "AntMaze_Large-v4", "Hopper-v5", "Ant-v5", "ALE/Breakout-v5"):
        assert needed in ids, needed


@pytest.mark.parametrize("env_id,kwargs", sorted({(e, repr(k)): (e, k) for _, e, k in ENVS}
                                                 .values(), key=lambda x: (x[0], repr(x[1]))),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_env_builds_resets_and_steps(env_id, kwargs):
    env = gym.make(env_id, **kwargs)
    try:
        obs, _ = env.reset(seed=0)
        env.action_space.seed(0)
        for _ in range(3):
            obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            assert np.isfinite(reward)
            if terminated or truncated:
                obs, _ = env.reset()
        assert env.observation_space.contains(obs) or isinstance(obs, dict)
    finally:
        env.close()


@pytest.mark.parametrize("module", ["cql_sac_continuous", "calql_finetune"])
def test_the_adroit_reward_notice_shows_only_for_the_envs_it_concerns(module):
    """gymnasium-robotics prints, when imported, that AdroitHand{Door,Hammer,Relocate}-v1
    changed their reward (Gymnasium-Robotics #220): shown for those envs, not for others."""
    import subprocess
    import sys

    def stderr(env_id: str) -> str:
        code = f"import {module} as m; m.register_robotics_envs({env_id!r})"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=calql_finetune.__file__.rsplit("/", 1)[0], timeout=120).stderr

    assert "pull/220" in stderr("AdroitHandDoor-v1")
    assert "pull/220" not in stderr("PointMaze_UMaze-v3")
    assert "pull/220" not in stderr("Pendulum-v1")
