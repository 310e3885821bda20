"""A tiny synthetic DQN Replay directory in dopamine's on-disk format, for the tests of
cql_qrdqn_atari.py's loader (moved here from benchmark/datasets.py: only tests use it).

``make_dqn_replay_dir`` writes one run's ``replay_logs`` folder; ``dqn_frame_step`` decodes the
agent step a synthetic frame encodes.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DQN_STACK_SIZE = 4
DQN_UPDATE_HORIZON = 1
DQN_NUM_ACTIONS = 6
DQN_FRAME_SHAPE = (84, 84)
DQN_REPLAY_ELEMENTS = (
    "$store$_observation", "$store$_action", "$store$_reward", "$store$_terminal",
    "add_count", "invalid_range",
)


def dqn_frame(step: int) -> np.ndarray:
    """Synthetic 84x84 frame of agent step ``step`` (1-based; padding frames are all 0).

    Bytes 0-3 of row 0 hold ``step`` little-endian; every other pixel is ``step % 251``.
    """
    frame = np.full(DQN_FRAME_SHAPE, step % 251, dtype=np.uint8)
    frame[0, :4] = np.frombuffer(int(step).to_bytes(4, "little"), dtype=np.uint8)
    return frame


def dqn_frame_step(frame: np.ndarray) -> int:
    """Inverse of ``dqn_frame``: the agent step a synthetic frame encodes (0 = padding)."""
    return int.from_bytes(np.asarray(frame, dtype=np.uint8)[0, :4].tobytes(), "little")


class _CircularReplay:
    """Minimal model of dopamine's out-of-graph circular replay buffer (adds only)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.observation = np.zeros((capacity, *DQN_FRAME_SHAPE), dtype=np.uint8)
        self.action = np.zeros(capacity, dtype=np.int32)
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.terminal = np.zeros(capacity, dtype=np.uint8)
        self.add_count = 0

    def add(self, frame: np.ndarray, action: int, reward: float, terminal: int) -> None:
        """Add a transition, first padding with stack-1 zero transitions at an episode start."""
        if self.add_count == 0 or self.terminal[(self.add_count - 1) % self.capacity] == 1:
            for _ in range(DQN_STACK_SIZE - 1):
                self._put(np.zeros(DQN_FRAME_SHAPE, np.uint8), 0, 0.0, 0)
        self._put(frame, action, reward, terminal)

    def _put(self, frame: np.ndarray, action: int, reward: float, terminal: int) -> None:
        cursor = self.add_count % self.capacity
        self.observation[cursor] = frame
        self.action[cursor], self.reward[cursor] = action, reward
        self.terminal[cursor] = terminal
        self.add_count += 1

    def invalid_range(self) -> np.ndarray:
        """Indices around the cursor with no valid transition (dopamine's definition)."""
        cursor = self.add_count % self.capacity
        offsets = range(DQN_STACK_SIZE + DQN_UPDATE_HORIZON)
        return np.array([(cursor - DQN_UPDATE_HORIZON + i) % self.capacity for i in offsets])

    def save(self, directory: Path, suffix: int) -> None:
        """Write the six gzipped ``np.save`` files of one checkpoint."""
        arrays = {
            "$store$_observation": self.observation, "$store$_action": self.action,
            "$store$_reward": self.reward, "$store$_terminal": self.terminal,
            "add_count": np.array(self.add_count), "invalid_range": self.invalid_range(),
        }
        for name, array in arrays.items():
            with gzip.open(directory / f"{name}_ckpt.{suffix}.gz", "wb") as f:
                np.save(f, array, allow_pickle=False)


def make_dqn_replay_dir(
    path: str | os.PathLike, num_checkpoints: int = 2, steps_per_checkpoint: int = 1000,
    seed: int = 0, episode_length: tuple[int, int] = (40, 160),
) -> Path:
    """Write a tiny synthetic DQN Replay directory (dopamine's on-disk format) at ``path``.

    Like one run's ``replay_logs`` folder: one agent's stream of transitions goes into a
    circular buffer of capacity ``steps_per_checkpoint``, saved as checkpoint ``K`` after
    every ``steps_per_checkpoint`` agent steps (so, as in the real data, the padding makes
    the buffer wrap and ``add_count`` exceeds the capacity). Files per checkpoint:
    ``$store$_observation_ckpt.K.gz`` (capacity, 84, 84) uint8, ``$store$_action`` int32,
    ``$store$_reward`` float32, ``$store$_terminal`` uint8 (1 on an episode's last
    transition), ``add_count`` (0-d int64), ``invalid_range`` (stack 4 + horizon 1,) int64;
    each an ``np.save`` array inside gzip. Every episode starts with 3 all-zero padding
    transitions. Agent step ``g`` (1-based, global over the stream) stores
    ``dqn_frame(g)``, action ``g % 6`` and reward ``g % 3 - 1``; episode lengths are
    drawn uniformly from ``episode_length`` with ``numpy.random.default_rng(seed)``.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    buffer = _CircularReplay(steps_per_checkpoint)
    step, left_in_episode = 0, 0
    for suffix in range(num_checkpoints):
        for _ in range(steps_per_checkpoint):
            if left_in_episode == 0:
                left_in_episode = int(rng.integers(episode_length[0], episode_length[1] + 1))
            step += 1
            left_in_episode -= 1
            terminal = int(left_in_episode == 0)
            buffer.add(dqn_frame(step), step % DQN_NUM_ACTIONS, float(step % 3 - 1), terminal)
        buffer.save(directory, suffix)
    return directory
