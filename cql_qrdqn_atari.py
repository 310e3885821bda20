"""CQL(H) on QR-DQN for discrete actions: Atari (DQN Replay, Minari) and vector envs (CartPole).

Single-file reference implementation of the discrete-action CQL of
Kumar et al., "Conservative Q-Learning for Offline Reinforcement Learning" (NeurIPS 2020), Sec. 6
and App. F, as built on QR-DQN (Dabney et al., 2018) in the official code
(github.com/aviralkumar2907/CQL, atari/batch_rl/multi_head/quantile_agent.py, on dopamine).

    # the paper's 1% DQN Replay setting (Pong), CQL weight 4.0 (--data-fraction 0.1: 10%, 1.0):
    python cql_qrdqn_atari.py --env pong --dqn-replay-dir D/Pong/1/replay_logs --data-fraction 0.01
    # offline on CPU, a local CartPole dataset (build it with benchmark/datasets.py):
    python cql_qrdqn_atari.py --env cartpole-expert
    # any discrete Minari dataset: the preset follows its observations (frames: Atari)
    python cql_qrdqn_atari.py --dataset-id atari/breakout/expert-v0
    # the values that will run for a setting, and every preset with its source:
    python cql_qrdqn_atari.py --env pong --dqn-replay-dir D/Pong/1/replay_logs --help
    python cql_qrdqn_atari.py --presets

Evaluation (config.json `eval_env`): DQN Replay data as dopamine evaluates it (ALE v5, sticky
actions 0.25, frame-skip 4 with max-pooling, 84x84 gray, 4 frames), epsilon 0.001, <= 27k agent
steps; Minari Atari data in its env spec's setting (no sticky actions); no no-op starts.

The file reads in three parts:
  Part I, the algorithm, lines 67-658: Args, the quantile network, the losses (QR-DQN,
    CQL(H)), the training step, the replay buffer, evaluation and the main loop.
  Part II, datasets and presets, lines 659-1480: Minari loading and the generic path
    (vector observations, local datasets), the Atari family block (Minari Atari and DQN
    Replay: data, evaluation env, score; registered in FAMILIES), the presets with their
    sources, the command line.
  Part III, run plumbing, lines 1481-2556: run directory, checkpoints, resume, signals.
To use the file on your own discrete-action data, delete the family block (ale-py and OpenCV
go with it): the generic path loads any Minari dataset of vector observations (--dataset-id)
and evaluates it in the dataset's own env.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import importlib
import io
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, NoReturn

STARTUP_SIGNALS: list[int] = []  # Ctrl-C while the imports below load: cli() stops after them
if __name__ == "__main__":  # (an exception raised inside torch's import can abort the process)
    signal.signal(signal.SIGINT, lambda signum, _: STARTUP_SIGNALS.append(signum))

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from tqdm import tqdm

# ======================================================================================
# Part I: the algorithm
# ======================================================================================

@dataclass
class Args:
    """Defaults are the paper's Atari setting (1% of DQN Replay); `preset_args(env)` fills the
    preset of the env's groups (PRESETS), so `--env X --help` shows the values that run for X."""

    env: str = "pong"
    """The task: pong|breakout|qbert|seaquest|asterix (or any ALE game id), or a local dataset
    such as cartpole-expert (= local/cartpole/expert-v0) or pong-random
    (= local/ale-pong/random-v0); with only --dataset-id, a label derived from the id
    (atari/pong/expert-v0 -> pong-expert-v0)."""
    dataset_id: str | None = None
    """Any Minari dataset id with a discrete action space; None: the env's dataset (a game:
    atari/<game>/expert-v0). Alone it picks the preset by its observations (frames: Atari)."""
    dqn_replay_dir: str | None = None
    """DQN Replay directory (dopamine's format) of the --env game, e.g. /data/Pong/1/replay_logs."""
    data_fraction: float = 0.01
    """Share of each DQN Replay checkpoint to load (its first transitions): 0.01 = the paper's 1%
    setting (500k of 50M transitions), 0.1 = 10%; it also picks the CQL weight preset."""
    checkpoints: str = "all"
    """Which DQN Replay checkpoints to draw from: 'all' or a list such as '0-9,20'."""
    seed: int = 0
    """Random seed (torch, batch sampling); evaluation seeds derive from it."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Training device; auto picks cuda when available."""
    buffer_device: Literal["device", "cpu"] = "device"
    """Where the replay buffer lives: the training device, or host memory ('cpu': pinned with
    CUDA, only sampled batches move; 10% of a game is 5M frames = 35 GB, beyond most GPUs)."""
    threads: int | None = None
    """CPU threads of torch; None keeps torch's default."""
    total_steps: int = 62_500_000
    """Number of gradient steps (Atari: 1000 dopamine iterations of 62.5k gradient steps)."""
    eval_every: int = 62_500
    """Gradient steps between evaluations (and checkpoints)."""
    eval_episodes: int = 10
    """Episodes per evaluation."""
    batch_size: int = 32
    """Minibatch size."""
    run_dir: str | None = None
    """Run directory; None: runs/cql_qrdqn_atari__{env}__s{seed}__{YYYYmmdd-HHMMSS}."""

    # ---- networks --------------------------------------------------------------------
    hidden_dims: tuple[int, ...] = (512,)
    """MLP torso for vector observations (frames: the Nature DQN conv torso, dense layer 512)."""
    torso_padding: Literal["same", "valid"] = "same"
    """Conv padding: 'same' as the official dopamine network, 'valid' as the Nature DQN paper."""

    # ---- QR-DQN ----------------------------------------------------------------------
    qf_lr: float = 5e-5
    """Adam learning rate of the quantile network."""
    adam_eps: float = 3.125e-4
    """Adam epsilon (0.01/32)."""
    gamma: float = 0.99
    """Discount factor."""
    num_quantiles: int = 200
    """Quantiles per action."""
    kappa: float = 1.0
    """Quantile Huber loss threshold."""
    target_update_every: int = 2000
    """Gradient steps between hard target-network updates (2000 = 8000 agent steps)."""

    # ---- CQL -------------------------------------------------------------------------
    cql_weight: float = 4.0
    """CQL weight alpha (paper: 4.0 for 1% data, 1.0 for 10%); 0 gives plain offline QR-DQN."""

    # ---- Lagrange --------------------------------------------------------------------
    lagrange: bool = False
    """Tune alpha' by dual gradient descent so that the CQL gap approaches --cql-tau."""
    cql_tau: float = 1.0
    """Lagrange threshold tau on E[logsumexp Q] - E_D[Q] (only with --lagrange)."""
    alpha_prime_lr: float = 3e-4
    """Adam learning rate of log alpha' (only with --lagrange)."""
    log_alpha_prime_init: float = 0.0
    """Initial log alpha' (only with --lagrange; the official Atari code has no Lagrange form)."""

    # ---- Atari -----------------------------------------------------------------------
    clip_reward: bool = True
    """Clip training rewards to [-1, 1] (Atari; the DQN Replay data is already clipped)."""
    eval_epsilon: float = 0.001
    """Epsilon of the epsilon-greedy evaluation."""
    sticky_prob: float | None = 0.25
    """Atari evaluation: sticky-action probability, the data's own setting by preset: DQN Replay
    0.25 (dopamine's evaluation), Minari data its env spec's (atari/<game>/expert-v0: 0); None:
    read from the Minari data when loaded. config.json's eval_env is the env evaluated."""
    noop_max: int = 0
    """Atari evaluation: at most this many no-op actions at reset (dopamine's and Minari's: 0)."""
    max_episode_steps: int = 27_000
    """Atari evaluation: agent steps per episode at most (27k = 108k frames)."""

    # ---- logging and run -------------------------------------------------------------
    log_every: int = 1000
    """Gradient steps between host syncs for logging and divergence checks."""
    max_abs_q: float = 1e6
    """Stop as diverged when a logged |Q| exceeds this."""
    compile: bool = False
    """`torch.compile` the whole update step (losses, backward, Adam, target copy)."""
    cudagraphs: bool = False
    """With --compile on CUDA: replay the compiled update as one CUDA graph."""
    tf32: bool = False
    """TF32 matmuls and convolutions on CUDA (off: float32; speed and loss effect to be
    measured on a GPU)."""
    resume: str | None = None
    """RUN_DIR to resume from (same other arguments); None: a new run."""
    track: bool = False
    """Log to Weights & Biases."""
    wandb_project: str = "cql-calql"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity; None: your default entity."""
    progress: bool = True
    """Show a tqdm progress bar."""
    capture_video: bool = False
    """Render the final evaluation's episodes to RUN_DIR/videos."""


# --- Networks --------------------------------------------------------------------------------

class QRNetwork(nn.Module):
    """obs -> (B, A, N) quantiles. Nature DQN torso (conv 32x8x8/4, 64x4x4/2, 64x3x3/1, dense 512)
    for (stack, 84, 84) uint8 frames, an MLP torso for vector observations."""

    def __init__(self, obs_shape: tuple[int, ...], n_actions: int, n_quantiles: int,
                 hidden_dims: tuple[int, ...], padding: str = "same"):
        super().__init__()
        self.n_actions, self.n_quantiles = n_actions, n_quantiles
        self.frames = len(obs_shape) == 3
        if self.frames:
            layers, c, size = [], obs_shape[0], obs_shape[1]
            for out_c, k, s in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
                if padding == "same":  # official dopamine network (Keras padding='same')
                    lo, hi, size = _tf_same_pad(size, k, s)
                    layers.append(nn.ZeroPad2d((lo, hi, lo, hi)))
                else:
                    size = (size - k) // s + 1
                layers += [nn.Conv2d(c, out_c, k, s), nn.ReLU()]
                c = out_c
            layers += [nn.Flatten(), nn.Linear(c * size * size, 512), nn.ReLU()]
            width = 512
        else:
            layers, width = [], obs_shape[0]
            for h in hidden_dims:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
        self.torso = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_actions * n_quantiles)
        variance_scaling_(self)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float() / 255.0 if self.frames else obs.float()
        return self.head(self.torso(x)).view(-1, self.n_actions, self.n_quantiles)


def variance_scaling_(module: nn.Module):
    """dopamine's init: VarianceScaling(scale=1/sqrt(3), mode='fan_in', 'uniform'), zero bias."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            bound = math.sqrt(3.0 * (1.0 / math.sqrt(3.0)) / fan_in)
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


def _tf_same_pad(size: int, k: int, s: int) -> tuple[int, int, int]:
    """TensorFlow 'same' padding (before, after) and the output size."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2, out


class Agent(nn.Module):
    """All trainable state: the quantile network, its target copy and log alpha'."""

    def __init__(self, obs_shape: tuple[int, ...], n_actions: int, args: Args):
        super().__init__()
        shape = (obs_shape, n_actions, args.num_quantiles, args.hidden_dims, args.torso_padding)
        self.q, self.target_q = QRNetwork(*shape), QRNetwork(*shape)
        self.target_q.load_state_dict(self.q.state_dict())
        self.target_q.requires_grad_(False)
        self.log_alpha_prime = nn.Parameter(torch.tensor(float(args.log_alpha_prime_init)))


# --- Losses ----------------------------------------------------------------------------------

def quantile_huber_loss(pred: torch.Tensor, target: torch.Tensor, kappa: float = 1.0):
    """QR-DQN loss per sample. pred (B, N) quantiles of Q(s, a_D); target (B, N') (no gradient).
    Returns (B,): sum over the N predicted quantiles of the mean over the N' targets."""
    n = pred.shape[1]
    u = target[:, None, :] - pred[:, :, None]  # (B, N, N'): input u of Eq. 9 (Dabney et al.)
    abs_u = u.abs()
    # Huber loss L_kappa(u) (Eq. 9), as written in quantile_agent.py (no division by kappa)
    huber = torch.where(abs_u <= kappa, 0.5 * u.pow(2), kappa * (abs_u - 0.5 * kappa))
    tau_hat = (torch.arange(n, device=pred.device, dtype=pred.dtype) + 0.5) / n  # midpoints
    # rho^kappa_tau(u) = |tau - 1{u < 0}| * L_kappa(u)  (Eq. 10)
    rho = (tau_hat[None, :, None] - (u.detach() < 0).to(pred.dtype)).abs() * huber
    # official: tf.reduce_sum(tf.reduce_mean(quantile_huber_loss, 2), 1)
    return rho.mean(dim=2).sum(dim=1)


def qr_target(next_quantiles_target: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor,
              gamma: float) -> torch.Tensor:
    """Target quantiles r + gamma (1 - d) theta_j(s', a*), a* = argmax_a mean_j theta_j(s', a)
    from the target network (quantile_agent.py _build_target_distribution). (B, N)."""
    q_next = next_quantiles_target.mean(dim=2)  # (B, A)
    a_star = q_next.argmax(dim=1)
    theta = next_quantiles_target[torch.arange(len(a_star), device=a_star.device), a_star]
    return rewards[:, None] + gamma * (1.0 - dones[:, None]) * theta


def cql_gap(q: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """CQL(H) regularizer (paper Eq. 4) with the exact logsumexp over the discrete actions:
    E_s[log sum_a exp Q(s,a)] - E_D[Q(s,a)] on Q = mean over quantiles (quantile_agent.py:
    negative_sampling - dataset_expec). Lowers Q of all actions, raises Q of the data action."""
    logsumexp = torch.logsumexp(q, dim=1).mean()
    data_q = q.gather(1, actions[:, None]).mean()
    return logsumexp - data_q


def lagrange_terms(gap: torch.Tensor, log_alpha_prime: torch.Tensor, weight: float, tau: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paper Eq. 30 dual descent, Cal-QL / CORL form alpha' w (gap - tau): (CQL penalty, alpha'
    loss, alpha'), alpha' = clamp(exp(log alpha'), 0, 1e6). The penalty sees alpha' as a constant,
    the alpha' loss the gap, so alpha' grows while gap > tau and shrinks below it."""
    alpha_prime = log_alpha_prime.exp().clamp(0.0, 1e6)
    penalty = alpha_prime.detach() * weight * (gap - tau)
    alpha_prime_loss = -(alpha_prime * weight * (gap.detach() - tau))
    return penalty, alpha_prime_loss, alpha_prime.detach()


def compute_losses(agent: Agent, batch: dict[str, torch.Tensor], args: Args
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """QR-DQN loss + CQL(H) penalty (+ the alpha' loss with --lagrange), summed for one
    backward pass; metrics as device tensors. Which loss trains which parameters:
      qr_loss   -> agent.q          target quantiles from agent.target_q under no_grad
      cql_loss  -> agent.q          alpha' detached (lagrange_terms)
      alpha' loss -> log_alpha_prime  gap detached (lagrange_terms)
    agent.target_q is never trained (requires_grad off; copied by the Trainer). Checked by
    tests/test_cql_qrdqn_losses.py::test_each_loss_trains_only_its_parameters."""
    obs, actions = batch["obs"], batch["actions"]
    quantiles = agent.q(obs)  # (B, A, N)
    with torch.no_grad():
        target = qr_target(agent.target_q(batch["next_obs"]), batch["rewards"], batch["dones"],
                           args.gamma)
    chosen = quantiles[torch.arange(len(actions), device=actions.device), actions]
    qr_loss = quantile_huber_loss(chosen, target, args.kappa).mean()  # batch mean
    q = quantiles.mean(dim=2)  # Q(s, a) = mean over quantiles
    gap = cql_gap(q, actions)
    if args.lagrange:
        cql_loss, alpha_prime_loss, alpha_prime = lagrange_terms(
            gap, agent.log_alpha_prime, args.cql_weight, args.cql_tau)
    else:  # official: min_q_loss * minq_weight
        cql_loss, alpha_prime_loss = args.cql_weight * gap, None
        alpha_prime = gap.new_tensor(args.cql_weight)  # the weight on the gap
    loss = qr_loss + cql_loss
    metrics = dict(loss=loss, qr_loss=qr_loss, cql_loss=cql_loss, cql_gap=gap,
                   q_data=q.gather(1, actions[:, None]).mean(), q_abs_max=q.abs().max(),
                   alpha_prime=alpha_prime)
    # no `loss + 0`: torch.compile then returns a total without gradient (torch 2.x)
    total = loss if alpha_prime_loss is None else loss + alpha_prime_loss
    return total, {k: v.detach() for k, v in metrics.items()}


# --- Training step ---------------------------------------------------------------------------

class Trainer:
    """Optimizers and one gradient step with no host sync (metrics stay on the device). The
    target network is refreshed every target_update_every updates, counted here (resumable)."""

    def __init__(self, agent: Agent, args: Args, device: torch.device):
        self.agent, self.args, self.updates = agent, args, 0
        if device.type == "cuda":  # --tf32: TF32 matmuls and convolutions; default float32
            torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
            torch.backends.cudnn.allow_tf32 = args.tf32
        capturable = args.compile and device.type == "cuda"  # step counters on the device
        self.optimizers = dict(
            q=torch.optim.Adam(agent.q.parameters(), lr=args.qf_lr, eps=args.adam_eps,
                               capturable=capturable),
            alpha_prime=torch.optim.Adam([agent.log_alpha_prime], lr=args.alpha_prime_lr,
                                         capturable=capturable))
        # compiled: the update count on the device, the target copy a mask (qrdqn_update)
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.online, self.target = list(agent.q.parameters()), list(agent.target_q.parameters())
        self.compiled = CompiledStep(partial(qrdqn_update, self), self.optimizers.values(),
                                     args.cudagraphs and device.type == "cuda") \
            if args.compile else None

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.compiled is not None:  # --compile: this update, compiled (qrdqn_update)
            self.updates += 1
            return self.compiled(batch)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        total, metrics = compute_losses(self.agent, batch, self.args)
        total.backward()
        for opt in self.optimizers.values():
            opt.step()
        self.updates += 1
        if self.updates % self.args.target_update_every == 0:  # hard update (dopamine)
            self.agent.target_q.load_state_dict(self.agent.q.state_dict())
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return dict(updates=self.updates, **{k: o.state_dict() for k, o in self.optimizers.items()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state[k])
        self.count.fill_(self.updates)


# ---- compiled step (--compile / --cudagraphs): not needed to read the algorithm ---------
# Trainer.step's update as one function, compiled (and CUDA-graphed) by CompiledStep (Part
# III); the periodic target copy a mask: lerp by 1.0 (an exact copy) when due, else by 0.0


def qrdqn_update(t: Trainer, batch: dict[str, torch.Tensor], _: None = None
                 ) -> dict[str, torch.Tensor]:
    total, metrics = compute_losses(t.agent, batch, t.args)
    total.backward()
    for opt in t.optimizers.values():
        opt.step()
    with torch.no_grad():  # hard update (dopamine) every target_update_every updates
        t.count.add_(1)
        due = (t.count % t.args.target_update_every == 0).float()
        torch._foreach_lerp_(t.target, t.online, due)
    return metrics


# --- Data and replay buffer ------------------------------------------------------------------
# Frames in one flat array, STACK-1 zero frames before each episode, so that a frame stack
# [t-3..t] never reaches into the previous episode; `valid` lists the indices i whose transition
# (stack at i, a_i, r_i, d_i, stack at i+1) may be sampled.


@dataclass
class Data:
    frames: np.ndarray  # (N, 84, 84) uint8 or (N, obs_dim) float32
    actions: np.ndarray  # (N,) int64
    rewards: np.ndarray  # (N,) float32
    dones: np.ndarray  # (N,) float32: 1 where the transition at i ended the episode (terminal)
    valid: np.ndarray  # (M,) int64
    stack: int  # frames per state (4 for Atari, 1 for vector observations)
    n_actions: int
    ref_scores: tuple[float, float] | None  # the dataset's (min, max) reference returns
    env_spec: object = None  # Minari env spec for evaluation (None for DQN Replay)
    atari_internal_frameskip: bool = False  # Minari Atari: ALE v5 frameskip, no max-pooling
    sticky_prob: float | None = None  # Minari Atari: the env spec's repeat_action_probability
    game: str | None = None  # ALE ROM id of Atari data
    eval_env: dict[str, Any] = field(default_factory=dict)  # by load_data: make_eval_env's spec
    info: dict[str, Any] = field(default_factory=dict)  # dataset facts for config.json
    score_range: tuple[float, float] | None = None  # 0 and 100 of the normalized score


class ReplayBuffer:
    """Data's tensors in `storage` (default: the training device), sampled with a generator
    there. With --buffer-device cpu and CUDA, the frames are pinned host memory and each batch
    is copied to the device asynchronously, so the buffer needs no device memory."""

    def __init__(self, data: Data, device: torch.device, seed: int, clip_reward: bool,
                 storage: torch.device | None = None):
        self.device = device
        self.storage = device if storage is None else storage
        self.pin = self.storage.type == "cpu" and device.type == "cuda"
        frames = torch.as_tensor(data.frames)
        if self.pin and not frames.is_pinned():
            frames = frames.pin_memory()
        self.frames = frames.to(self.storage)
        self.actions = torch.as_tensor(data.actions).to(self.storage)
        rewards = torch.as_tensor(data.rewards)
        self.rewards = (rewards.clamp(-1.0, 1.0) if clip_reward else rewards).to(self.storage)
        self.dones = torch.as_tensor(data.dones).to(self.storage)
        self.valid = torch.as_tensor(data.valid).to(self.storage)
        self.stack = data.stack
        self.offsets = torch.arange(-data.stack + 1, 1, device=self.storage)
        self.obs_shape = tuple(self.stacked(self.valid[:1]).shape[1:])
        self.generator = torch.Generator(device=self.storage)
        self.generator.manual_seed(seed)

    def nbytes(self) -> int:
        """Bytes of the buffer's tensors (where they live: `storage`)."""
        return sum(t.numel() * t.element_size() for t in
                   (self.frames, self.actions, self.rewards, self.dones, self.valid))

    def __len__(self) -> int:
        return len(self.valid)

    def stacked(self, idx: torch.Tensor) -> torch.Tensor:
        """Observation at indices idx: (B, stack, 84, 84) frames [i-3..i] or (B, obs_dim)."""
        if self.stack == 1:
            return self.frames[idx]
        return self.frames[idx[:, None] + self.offsets]

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        j = torch.randint(len(self.valid), (batch_size,), device=self.storage,
                          generator=self.generator)
        idx = self.valid[j]
        batch = dict(obs=self.stacked(idx), actions=self.actions[idx], rewards=self.rewards[idx],
                     next_obs=self.stacked(idx + 1), dones=self.dones[idx])
        if self.storage == self.device:
            return batch  # else to the device; from page-locked memory (pin) asynchronously
        return {k: (t.pin_memory() if self.pin else t).to(self.device, non_blocking=self.pin)
                for k, t in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return dict(generator=self.generator.get_state())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


# --- Evaluation ------------------------------------------------------------------------------

def make_eval_env(spec: dict, max_episode_steps: int | None = None,
                  render_mode: str | None = None) -> gym.Env:
    """Build the env a JSON spec (config.json `eval_env`) describes: gym.make(id, **kwargs), then
    each of its `wrappers` (gymnasium.wrappers name -> kwargs) in order. With wrappers (Atari:
    `atari_eval_env`) the agent-step limit is evaluate's (a TimeLimit would count ALE frames);
    max_episode_steps: a longer TimeLimit than the spec's (the value_gap rollout)."""
    frames = {"render_mode": render_mode} if render_mode else {}  # envs without the argument
    if "wrappers" not in spec:
        return gym.make(spec["id"], max_episode_steps=max_episode_steps or
                        spec["max_episode_steps"], **frames, **spec["kwargs"])
    env = gym.make(spec["id"], **frames, **spec["kwargs"])
    for name, kwargs in spec["wrappers"].items():
        env = getattr(gym.wrappers, name)(env, **kwargs)
    return env


GAP_TAIL = 0.01  # value_gap neglects a tail below 1% of the return scale (issue 17 item 3)


def gap_horizon(gamma: float) -> int | None:
    """The value_gap rollout length: the first T with gamma^T <= GAP_TAIL (0.99 -> 459); 1 for
    gamma 0; None for gamma >= 1 (no finite horizon: the score horizon, an unbounded tail)."""
    if gamma >= 1.0:
        return None
    if gamma <= 0.0:
        return 1
    return math.ceil(math.log(GAP_TAIL) / math.log(gamma))


def gap_tail_bound(gamma: float, steps: int, r_absmax: float, terminated: bool) -> float | None:
    """Bound on the discounted return a rollout of `steps` steps leaves out: 0 if it ended by a
    true termination, else gamma^steps r_absmax / (1 - gamma) (|V| <= r_absmax / (1 - gamma));
    None (unbounded) for gamma >= 1."""
    if terminated:
        return 0.0
    if gamma >= 1.0:
        return None
    return gamma**steps * r_absmax / (1.0 - gamma)


def value_gap_spec(gamma: float, score_steps: int | None, r_absmax: float,
                   note: str | None = None) -> dict[str, Any]:
    """config.json eval_env.value_gap: the rollout that value_gap sums (score_steps: the score's
    step limit, None: none) and the bound on the tail it leaves out."""
    horizon = gap_horizon(gamma)
    rollout = None if score_steps is None else max(score_steps, horizon or 0)
    return dict(horizon=horizon, rule=f"ceil(log({GAP_TAIL})/log(gamma))", tail_fraction=GAP_TAIL,
                score_max_steps=score_steps, rollout_max_steps=rollout,
                runs_past_time_limit=rollout is not None and rollout > score_steps,
                reward_abs_max=r_absmax, tail_bound=None if rollout is None else
                gap_tail_bound(gamma, rollout, r_absmax, False), note=note)


def eval_seed(seed: int, eval_index: int) -> int:
    """Evaluation env seed from (seed, eval index) only: evaluation never depends on history."""
    return int(np.random.SeedSequence([seed, eval_index, 0xE7A1]).generate_state(1)[0]) % 2**30


@torch.no_grad()
def evaluate(q: QRNetwork, envs: list[gym.Env], epsilon: float, seed: int, device,
             max_steps: int, gamma: float = 0.99, clip_reward: bool = False,
             score_range: tuple[float, float] | None = None, rollout_steps: int | None = None,
             r_absmax: float = 1.0) -> dict[str, Any]:
    """One epsilon-greedy episode on mean-over-quantiles Q in each env, side by side (env e reset
    with seed + e, its own epsilon RNG; equal to one after the other), one batch per step. The
    score (return, score = 100 (R - lo) / (hi - lo), score_range = (lo, hi); None without;
    episode_length) counts the first max_steps steps; no success rate. value_gap, the
    lower-bound check (paper Table 4): max_a Q(s_0, a) minus the discounted return of the
    training rewards (clipped for Atari) from s_0, summed until a true termination or
    rollout_steps (>= max_steps; a time limit is not an end); value_gap_return: the same (the
    rewards are not scaled)."""
    episodes, limit = len(envs), max(max_steps, rollout_steps or 0)
    rngs = [np.random.default_rng([seed, e]) for e in range(episodes)]
    obs = [np.asarray(env.reset(seed=seed + e)[0]) for e, env in enumerate(envs)]
    returns, disc, steps = np.zeros(episodes), np.zeros(episodes), np.zeros(episodes, np.int64)
    terminated = np.zeros(episodes, bool)
    q_s0, active = None, list(range(episodes))
    while active:
        x = torch.as_tensor(np.stack([obs[e] for e in active]), device=device)
        q_mean = q(x).mean(dim=2)
        if q_s0 is None:
            q_s0 = q_mean.max(dim=1).values.cpu().numpy()
        greedy = q_mean.argmax(dim=1).tolist()
        still = []
        for e, a in zip(active, greedy, strict=True):
            if rngs[e].random() < epsilon:
                a = int(rngs[e].integers(envs[e].action_space.n))
            o, r, term, trunc, _ = envs[e].step(a)
            obs[e] = np.asarray(o)
            if steps[e] < max_steps:  # the score's steps
                returns[e] += float(r)
            disc[e] += gamma ** steps[e] * (float(np.clip(r, -1, 1)) if clip_reward else float(r))
            steps[e], terminated[e] = steps[e] + 1, term
            if not (term or trunc or steps[e] >= limit):
                still.append(e)
        active = still
    ret = float(returns.mean())
    lo, hi = score_range or (0.0, 0.0)
    tails = [gap_tail_bound(gamma, int(t), r_absmax, bool(d))
             for t, d in zip(steps, terminated, strict=True)]
    gap = float((q_s0 - disc).mean())
    return dict(return_mean=ret, return_std=float(returns.std()),
                score=100.0 * (ret - lo) / (hi - lo) if score_range else None,
                success_rate=None, episode_length=float(np.minimum(steps, max_steps).mean()),
                value_gap=gap, value_gap_return=gap, value_gap_steps=float(steps.mean()),
                value_gap_tail_bound=None if None in tails else float(np.mean(tails)),
                q_pred_s0=float(q_s0.mean()), episode_returns=returns.tolist())


# --- Main loop -------------------------------------------------------------------------------

def main(args: Args) -> dict[str, Any]:
    """Train with a complete Args (parse_args, or replace() on preset_args(env))."""
    check_args(args)
    device = pick_device(args.device)
    args = replace(args, run_dir=args.resume or args.run_dir or default_run_dir(args))
    torch.manual_seed(args.seed)
    data = load_data(args)
    buffer = ReplayBuffer(data, device, args.seed, args.clip_reward,
                          torch.device("cpu") if args.buffer_device == "cpu" else None)
    data.frames = data.actions = data.rewards = data.dones = data.valid = None  # in the buffer
    agent = Agent(buffer.obs_shape, data.n_actions, args).to(device)
    trainer = Trainer(agent, args, device)
    gap = data.eval_env["value_gap"]
    envs = [make_eval_env(data.eval_env, gap["rollout_max_steps"], render_mode(args))
            for _ in range(args.eval_episodes)]
    max_steps = data.eval_env["max_episode_steps"] or 10**9
    run = Run(args, dict(agent=agent, trainer=trainer, buffer=buffer), data.info,
              data.eval_env, device)
    envs = [run.recorded(env, f"env{e}") for e, env in enumerate(envs)]  # --capture-video
    evaluation = lambda step: partial(
        evaluate, agent.q, envs, args.eval_epsilon, eval_seed(args.seed, step), device,
        max_steps, args.gamma, args.clip_reward, data.score_range, gap["rollout_max_steps"],
        gap["reward_abs_max"])
    if run.after:  # --evaluate / --export-policy RUN_DIR (Part III)
        return run.after_training(evaluation(run.step), lambda: GreedyPolicy(agent.q, envs[0]))
    bar = progress_bar(args, run.step, args.total_steps, "cql-qrdqn")
    for step in range(run.step + 1, args.total_steps + 1):
        metrics = trainer.step(buffer.sample(args.batch_size))
        advance(bar, 1, last=step == args.total_steps)
        if run.due(step, args.log_every, args.eval_every, last=args.total_steps):
            run.log(step, metrics)
        if run.due(step, args.eval_every, last=args.total_steps):
            run.evaluate_and_checkpoint(step, evaluation(step))
        run.stop_if_signalled(step)
    return run.finish(final_summary(run.history, args, data))


class GreedyPolicy(nn.Module):
    """The greedy policy (--export-policy): argmax over actions of the mean over quantiles,
    on observations as the evaluation env gives them (Atari: the last 4 preprocessed 84x84
    uint8 frames, stacked by the env's FrameStackObservation); evaluate's epsilon is not in it."""

    def __init__(self, q: QRNetwork, env: gym.Env):
        super().__init__()
        self.q = copy.deepcopy(q).cpu()
        space = env.observation_space
        self.register_buffer("example", torch.as_tensor(np.stack([space.sample()] * 2)))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q(obs).mean(dim=2).argmax(dim=1)

    def example_input(self) -> torch.Tensor:
        return self.example.clone()


def final_summary(history: list[dict[str, Any]], args: Args, data: Data) -> dict[str, Any]:
    """summary.json's numbers: the last evaluation, and how its score is computed."""
    last, (lo, hi) = history[-1], data.score_range or (None, None)
    definition = None if lo is None else f"100 * (return - {lo}) / ({hi} - {lo})"
    return dict(final_score=last["score"], final_return=last["return_mean"],
                final_success_rate=last["success_rate"], value_gap=last["value_gap"],
                value_gap_return=last["value_gap_return"], score_definition=definition,
                total_steps=args.total_steps, dataset=data.info["source"],
                transitions=data.info["transitions"])


# ======================================================================================
# Part II: datasets and presets
# ======================================================================================
# The generic path: a Minari dataset with a discrete action space and vector observations
# (CartPole; the local datasets of benchmark/datasets.py), evaluated in the dataset's own env.
# A family block hooks into it through FAMILIES; deleting the block removes the family.


def optional_import(module: str, package: str, what: str):
    """An optional package, imported where a family needs it; a one-line error without it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        fail(f"{what} needs the {package} package: pip install {package}")


# Local datasets (built by benchmark/datasets.py into $MINARI_DATASETS_PATH).
LOCAL_ENVS = {
    "cartpole-random": "local/cartpole/random-v0", "cartpole-medium": "local/cartpole/medium-v0",
    "cartpole-expert": "local/cartpole/expert-v0", "cartpole-mixed": "local/cartpole/mixed-v0",
    "pong-random": "local/ale-pong/random-v0",
}


@dataclass
class DataSource:
    kind: Literal["dqn_replay", "minari"]
    game: str | None  # ALE ROM id, from the names (Minari data: its env spec may add it)
    dataset_id: str | None
    description: str


@dataclass
class Family:
    """A family block's hooks, asked in FAMILIES order; each gives None for others' data."""

    source: Callable[..., DataSource | None]  # (env, dataset_id, dqn_replay_dir, fraction, ckpts)
    preset: Callable[..., tuple[list[str], dict] | None]  # (source, fraction, spec): groups, values
    load: Callable[..., Data | None]  # (args, source, pin): data not in Minari's format
    eval_env: Callable[..., dict | None]  # (args, source, data): eval env of its Minari data
    frames: Callable[..., Data] | None = None  # (ds, progress, pin): Minari frames -> Data
    names: tuple[str, ...] = ()  # --env names and the tail of the unknown-env error
    hint: str = ""
    dataset_ids: Callable[[], list[str]] = list  # the Minari ids of its data a bad id is checked on


FAMILIES: dict[str, Family] = {}  # each family block adds itself


def resolve_source(env: str, dataset_id: str | None = None, dqn_replay_dir: str | None = None,
                   data_fraction: float = 0.01, checkpoints: str = "all") -> DataSource:
    """Which data the run uses, from --env, --dataset-id and --dqn-replay-dir: the first family
    that claims it, else the Minari dataset of --dataset-id or of a local name."""
    for family in FAMILIES.values():
        if (source := family.source(env, dataset_id, dqn_replay_dir, data_fraction,
                                    checkpoints)) is not None:
            return source
    if dqn_replay_dir is not None:
        fail("--dqn-replay-dir needs the DQN Replay block of cql_qrdqn_atari.py")
    if dataset_id is not None:  # any Minari id; --env is then only a label
        return DataSource("minari", None, dataset_id, dataset_id)
    if env.lower() in LOCAL_ENVS:
        return DataSource("minari", None, LOCAL_ENVS[env.lower()], LOCAL_ENVS[env.lower()])
    valid = [n for family in FAMILIES.values() for n in family.names] + list(LOCAL_ENVS)
    import difflib

    close = difflib.get_close_matches(env.lower(), valid, n=3)
    maybe = f" (did you mean {' or '.join(close)}?)" if close else ""
    fail(f"unknown --env '{env}'{maybe}; valid: {', '.join(valid)}"
         + "".join(family.hint for family in FAMILIES.values()))


def load_minari_dataset(dataset_id: str):
    """The raw Minari dataset: the local copy, else a download; one-line errors."""
    minari = optional_import("minari", "minari", "Minari data")
    check_datasets_root()
    with contextlib.suppress(Exception):  # any failure: not there locally
        return minari.load_dataset(dataset_id)
    # the ids this script names: its local datasets and its families' (Atari: the games')
    known = [*LOCAL_ENVS.values(), *(i for f in FAMILIES.values() for i in f.dataset_ids())]
    if dataset_id.startswith("local/"):  # built by benchmark/datasets.py, never downloaded
        fail(missing_dataset(dataset_id, known))
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as exc:  # noqa: BLE001 - no network, unknown id, ...
        fail(missing_dataset(dataset_id, known, exc))


def datasets_root() -> str:
    """The datasets folder Minari reads, as the user would type it: MINARI_DATASETS_PATH,
    else Minari's default ~/.minari/datasets."""
    return os.environ.get("MINARI_DATASETS_PATH") or "~/.minari/datasets"


def missing_dataset(dataset_id: str, known: list[str], exc: Exception | None = None) -> str:
    """The one-line error for a dataset not under datasets_root(): the download's error
    (`exc`), then how to get the dataset, or for an id that no preset names (`known`: the ids
    they name) the closest one that is: a typo's own download or build command cannot work."""
    where = f"dataset {dataset_id} is not under {datasets_root()}"
    if exc is not None:
        where += f" and could not be downloaded ({error_line(exc)})"
    if dataset_id in known:
        return f"{where}; {how_to_get(dataset_id)}"
    import difflib

    close = difflib.get_close_matches(dataset_id, known, n=1)
    if close:
        return (f"{where}; no preset names it: did you mean {close[0]}? "
                f"({how_to_get(close[0])}; {how_to_list(dataset_id)})")
    return f"{where}; no preset names it or an id close to it; {how_to_list(dataset_id)}"


def error_line(exc: Exception) -> str:
    """'Type: first line of the message' (an httpx or Hugging Face message runs on)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def how_to_get(dataset_id: str) -> str:
    """The command that puts `dataset_id` under datasets_root(): a local/ id is built by
    benchmark/datasets.py (which takes the id), any other is downloaded where there is network
    (into that machine's ~/.minari/datasets) and copied here."""
    if dataset_id.startswith("local/"):
        return f"build it with: python benchmark/datasets.py {dataset_id}"
    return (f"get it with `minari download {dataset_id}` on a machine with network and copy "
            f"its ~/.minari/datasets/{dataset_id} to {datasets_root()}/{dataset_id} here")


def how_to_list(dataset_id: str) -> str:
    """Where the ids that exist are listed: the local datasets benchmark/datasets.py builds
    (some that no preset names), or Minari's remote ones."""
    if dataset_id.startswith("local/"):
        return "`python benchmark/datasets.py --list` lists the local datasets it builds"
    return "`minari list remote` (with network) lists Minari's ids"


def check_datasets_root() -> None:
    """MINARI_DATASETS_PATH (else ~/.minari/datasets) must exist or be creatable: Minari
    creates it and would fail with an OSError traceback."""
    root = Path(datasets_root()).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"MINARI_DATASETS_PATH {root} cannot be created ({exc.strerror}); set "
             "MINARI_DATASETS_PATH to a writable folder")


def host_zeros(shape: tuple[int, ...], dtype, pin: bool) -> np.ndarray:
    """A zero numpy array, in page-locked (pinned) host memory when `pin` (--buffer-device cpu
    with CUDA): the replay buffer then uses it in place, without a second host copy."""
    if not pin:
        return np.zeros(shape, dtype)
    return torch.zeros(shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype,
                       pin_memory=True).numpy()


def _ref_scores(ds) -> tuple[float, float] | None:
    lo, hi = (ds.storage.metadata.get(k) for k in ("ref_min_score", "ref_max_score"))
    return None if lo is None or hi is None or hi == lo else (float(lo), float(hi))


def episodes_layout(episodes, n_total: int, stack: int, pin: bool = False,
                    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
                    what: str = "the dataset"):
    """Episodes (observations (T+1, ...), actions (T,), rewards (T,), terminations (T,)) -> the
    flat layout: per episode STACK-1 zero frames, then its T+1 observations (each through
    `preprocess` if given: RGB frames). The last observation is stored for the bootstrap of a
    truncated episode but starts no transition; an episode with no step is skipped. n_total: an
    upper bound on the number of rows."""
    pad = stack - 1
    frames = actions = rewards = dones = None
    valid, cur = [], 0
    for obs, act, rew, term in episodes:
        T = len(act)
        if T == 0:  # no transition (issue 19: it used to end in a sampling error)
            continue
        if frames is None:
            fshape = preprocess(obs[0]).shape if preprocess else obs.shape[1:]
            frames = host_zeros((n_total, *fshape), np.uint8 if stack > 1 else np.float32, pin)
            actions, rewards, dones = (np.zeros(n_total, t)
                                       for t in (np.int64, np.float32, np.float32))
        start = cur + pad
        if preprocess:
            for t in range(T + 1):
                frames[start + t] = preprocess(obs[t])
        else:
            frames[start:start + T + 1] = obs
        actions[start:start + T] = act.reshape(T)
        rewards[start:start + T] = rew.reshape(T)
        dones[start:start + T] = term.reshape(T)
        valid.append(np.arange(start, start + T))
        cur = start + T + 1
    if frames is None:
        fail(f"{what} has no episode with at least one step")
    return (frames[:cur], actions[:cur], rewards[:cur], dones[:cur],
            np.concatenate(valid).astype(np.int64))


def minari_layout(ds, stack: int, preprocess=None, progress: bool = True, pin: bool = False):
    """A Minari dataset's episodes in the layout above (episodes_layout), checked finite, and the
    spec of its evaluation env (its data-collection env unless it names another)."""
    dataset_id = ds.spec.dataset_id
    n_total = ds.total_steps + ds.total_episodes * stack  # + each episode's last obs, padding
    episodes = (
        (np.asarray(ep.observations), np.asarray(ep.actions), np.asarray(ep.rewards),
         np.asarray(ep.terminations))
        for ep in tqdm(ds.iterate_episodes(), total=ds.total_episodes,
                       desc=f"loading {dataset_id}", disable=not progress, leave=False))
    frames, actions, rewards, dones, valid = episodes_layout(episodes, n_total, stack, pin,
                                                             preprocess, f"dataset {dataset_id}")
    if not (np.isfinite(rewards).all() and (stack > 1 or np.isfinite(frames).all())):
        fail(f"dataset {dataset_id} contains NaN or inf in its observations or rewards; "
             f"clean or rebuild it")
    n, act = int(ds.action_space.n), actions[valid]  # a bad action would index Q out of range
    if bad := int(((act < 0) | (act >= n)).sum()):
        fail(f"dataset {dataset_id}: {bad} of {len(act)} actions outside [0, {n}) of its action "
             f"space Discrete({n}); fix or rebuild it")
    try:
        probe = ds.recover_environment(eval_env=True)
        spec = probe.spec
        probe.close()
    except Exception as e:  # noqa: BLE001 - unregistered id, missing entry-point module, ...
        fail(f"dataset {dataset_id}: cannot create its environment {env_id_of(ds)} "
             f"({one_line(e)}); install the package that registers it")
    return frames, actions, rewards, dones, valid, spec


def minari_data(ds, progress: bool = True, pin: bool = False) -> Data:
    """A raw Minari dataset (load_minari_dataset) in the layout above, with its env spec: vector
    observations here, frames by the family that reads them (Family.frames: Minari Atari)."""
    dataset_id = ds.spec.dataset_id
    act_space, obs_space = ds.action_space, ds.observation_space
    if isinstance(act_space, gym.spaces.Box):
        fail(f"dataset {dataset_id} has a continuous action space {act_space.shape}; "
             f"use cql_sac_continuous.py")
    if not isinstance(act_space, gym.spaces.Discrete):
        fail(f"dataset {dataset_id}: action space {act_space} is not Discrete")
    if not isinstance(obs_space, gym.spaces.Box):
        fail(f"dataset {dataset_id}: observation space {obs_space} is not a Box")
    if len(obs_space.shape) != 1:
        read = next((family.frames for family in FAMILIES.values() if family.frames), None)
        if read is None:
            fail(f"dataset {dataset_id}: observation shape {obs_space.shape} is not a vector")
        return read(ds, progress, pin)
    layout = minari_layout(ds, 1, None, progress, pin)
    return Data(*layout[:5], 1, int(act_space.n), _ref_scores(ds), layout[5])


def one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def env_id_of(ds) -> str:
    spec = getattr(ds.spec, "eval_env_spec", None) or getattr(ds.spec, "env_spec", None)
    return getattr(spec, "id", "(no env spec)")


def env_action_count(spec: dict) -> int:
    try:
        return int(make_eval_env(spec).action_space.n)
    except Exception as e:  # noqa: BLE001 - an env that cannot be created: name it
        fail(f"cannot create the evaluation env {spec['id']} ({one_line(e)})")


def load_data(args: Args) -> Data:
    """The run's data (a family's, else the Minari dataset of --dataset-id / --env), the env that
    evaluates it (JSON spec), its score range and the dataset facts for config.json."""
    source = resolve_source(args.env, args.dataset_id, args.dqn_replay_dir, args.data_fraction,
                            args.checkpoints)
    # --buffer-device cpu with CUDA: frames are loaded into pinned memory, used in place
    pin = args.buffer_device == "cpu" and pick_device(args.device).type == "cuda"
    data = next((d for family in FAMILIES.values()
                 if (d := family.load(args, source, pin)) is not None), None)
    if data is None:  # Minari data
        data = minari_data(load_minari_dataset(source.dataset_id), args.progress, pin)
        eval_env = next((e for family in FAMILIES.values()
                         if (e := family.eval_env(args, source, data)) is not None), None)
        if eval_env is None:  # vectors: the dataset's (eval) env; arrays as lists, else str
            spec = data.env_spec
            kwargs = json.dumps(spec.kwargs, default=lambda v: getattr(v, "tolist", v.__str__)())
            eval_env = {"id": spec.id, "max_episode_steps": spec.max_episode_steps,
                        "kwargs": json.loads(kwargs)}
        n_actions = env_action_count(eval_env)
        if n_actions != data.n_actions:
            fail(f"evaluation env has {n_actions} actions, the data {data.n_actions}")
        data.n_actions, data.eval_env = n_actions, eval_env
    data.score_range = data.score_range or data.ref_scores
    rewards = data.rewards[data.valid]  # as trained (clipped): the value_gap tail's scale
    r_absmax = float(np.abs(np.clip(rewards, -1, 1) if args.clip_reward else rewards).max())
    data.eval_env["value_gap"] = value_gap_spec(args.gamma, data.eval_env["max_episode_steps"],
                                                r_absmax, data.eval_env.pop("gap_note", None))
    data.info = dict(source=source.description, dataset_id=source.dataset_id, game=data.game,
                     transitions=len(data.valid), n_actions=data.n_actions, stack=data.stack,
                     score_range=data.score_range, reward_abs_max=r_absmax)
    return data


# --- Family: Atari (Minari atari/<game>/expert-v0, local pong-random; DQN Replay) -------------
# Frames of an ALE game, evaluated in ALE, scored human-normalized (ATARI_RANDOM_HUMAN); needs
# ale-py (and OpenCV for RGB). Minari data keeps its env spec's sticky-action and frame-skip
# settings; DQN Replay, the paper's data, is evaluated as dopamine does.


def import_ale():
    """ale_py, with gymnasium's ALE/<Game>-v5 ids registered."""
    ale_py = optional_import("ale_py", "ale-py", "Atari")
    gym.register_envs(ale_py)
    return ale_py


PAPER_GAMES = ("pong", "breakout", "qbert", "seaquest", "asterix")  # CQL paper, Table 3


def atari_game(name: str) -> str | None:
    """ALE ROM id of an env name (pong, Pong, space-invaders, SpaceInvaders...), else None (also
    without ale-py)."""
    try:
        import ale_py
    except ImportError:
        return None
    rom = name.lower().replace("-", "_")
    roms = set(ale_py.roms.get_all_rom_ids())
    if rom in roms:
        return rom
    squashed = {r.replace("_", ""): r for r in roms}
    return squashed.get(rom.replace("_", ""))


def ale_env_id(rom: str) -> str:
    return "ALE/" + "".join(w.capitalize() for w in rom.split("_")) + "-v5"


def data_sticky_prob(spec) -> float | None:
    """The repeat_action_probability a Minari dataset (spec) is evaluated with: its eval env
    spec's, else its data-collection env spec's (as recover_environment(eval_env=True)), else the
    id's registered default (ALE v5: 0.25); None for a non-ALE env."""
    env_spec = getattr(spec, "eval_env_spec", None) or getattr(spec, "env_spec", None)
    if env_spec is None or not env_spec.id.startswith("ALE/"):
        return None
    import_ale()  # the ALE ids' registered defaults
    kwargs = {**gym.spec(env_spec.id).kwargs, **env_spec.kwargs}
    return float(kwargs.get("repeat_action_probability", 0.25))


def preprocess_rgb(rgb: np.ndarray) -> np.ndarray:
    """Raw ALE RGB frame (210, 160, 3) -> 84x84 gray as the evaluation env does it: ALE grayscale
    (= OpenCV's RGB2GRAY), cv2.resize INTER_AREA (gymnasium AtariPreprocessing, dopamine)."""
    cv2 = optional_import("cv2", "opencv-python", "Atari RGB frames")
    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (84, 84), interpolation=cv2.INTER_AREA)


def minari_atari_frames(ds, progress: bool = True, pin: bool = False) -> Data:
    """Minari frames (Atari RGB or 84x84 gray) in the layout, 4 frames a state, with the data's
    ALE settings: ALE's internal frame-skip (RGB data), sticky actions, game."""
    dataset_id, obs_space = ds.spec.dataset_id, ds.observation_space
    shape = obs_space.shape
    rgb = len(shape) == 3 and shape[-1] == 3 and obs_space.dtype == np.uint8
    gray = shape == (84, 84) and obs_space.dtype == np.uint8
    if not (rgb or gray):
        fail(f"dataset {dataset_id}: observation shape {shape} is neither a vector, "
             f"Atari RGB frames nor 84x84 gray frames")
    import_ale()  # the data's env
    *layout, spec = minari_layout(ds, 4, preprocess_rgb if rgb else None, progress, pin)
    internal_skip = rgb and spec.kwargs.get("frameskip", 4) != 1
    ale = re.fullmatch(r"ALE/(\w+)-v\d+", spec.id)
    return Data(*layout, 4, int(ds.action_space.n), _ref_scores(ds), spec, bool(internal_skip),
                data_sticky_prob(ds.spec), atari_game(ale.group(1)) if ale else None)


def atari_eval_env(game: str, internal_frameskip: bool = False, sticky_prob: float = 0.25,
                   noop_max: int = 0, max_episode_steps: int = 27_000,
                   full_action_space: bool = False, stack: int = 4) -> dict:
    """The Atari evaluation env as JSON: gym.make id and kwargs, and the preprocessing wrappers.
    Default: dopamine's (module docstring: frameskip=1, AtariPreprocessing's 4-frame skip and
    max-pooling); internal_frameskip: the Minari Atari convention (ALE's own frameskip=4,
    observation = the last frame, no max-pooling)."""
    import_ale()  # make_eval_env builds an ALE env
    return {
        "id": ale_env_id(game), "max_episode_steps": max_episode_steps,
        "kwargs": {"frameskip": 4 if internal_frameskip else 1,
                   "repeat_action_probability": sticky_prob,
                   "full_action_space": full_action_space,
                   "max_num_frames_per_episode": max_episode_steps * 4},
        "wrappers": {"AtariPreprocessing": {"noop_max": noop_max,
                                            "frame_skip": 1 if internal_frameskip else 4,
                                            "screen_size": 84, "grayscale_obs": True},
                     "FrameStackObservation": {"stack_size": stack, "padding_type": "zero"}},
        "gap_note": "episodes end at game over or ALE's frame cap (max_num_frames_per_episode, "
                    "4 x max_episode_steps agent steps), far beyond the value_gap horizon",
    }


# Atari random and human scores (no-op starts) of the human-normalized score of DQN (Mnih et al.
# 2015), Rainbow and dopamine; values as in DeepMind's dqn_zoo/atari_data.py; keys: ALE ROM ids.
ATARI_RANDOM_HUMAN = {
    "alien": (227.8, 7127.7), "amidar": (5.8, 1719.5), "assault": (222.4, 742.0),
    "asterix": (210.0, 8503.3), "asteroids": (719.1, 47388.7), "atlantis": (12850.0, 29028.1),
    "bank_heist": (14.2, 753.1), "battle_zone": (2360.0, 37187.5),
    "beam_rider": (363.9, 16926.5), "berzerk": (123.7, 2630.4), "bowling": (23.1, 160.7),
    "boxing": (0.1, 12.1), "breakout": (1.7, 30.5), "centipede": (2090.9, 12017.0),
    "chopper_command": (811.0, 7387.8), "crazy_climber": (10780.5, 35829.4),
    "defender": (2874.5, 18688.9), "demon_attack": (152.1, 1971.0),
    "double_dunk": (-18.6, -16.4), "enduro": (0.0, 860.5), "fishing_derby": (-91.7, -38.7),
    "freeway": (0.0, 29.6), "frostbite": (65.2, 4334.7), "gopher": (257.6, 2412.5),
    "gravitar": (173.0, 3351.4), "hero": (1027.0, 30826.4), "ice_hockey": (-11.2, 0.9),
    "jamesbond": (29.0, 302.8), "kangaroo": (52.0, 3035.0), "krull": (1598.0, 2665.5),
    "kung_fu_master": (258.5, 22736.3), "montezuma_revenge": (0.0, 4753.3),
    "ms_pacman": (307.3, 6951.6), "name_this_game": (2292.3, 8049.0),
    "phoenix": (761.4, 7242.6), "pitfall": (-229.4, 6463.7), "pong": (-20.7, 14.6),
    "private_eye": (24.9, 69571.3), "qbert": (163.9, 13455.0), "riverraid": (1338.5, 17118.0),
    "road_runner": (11.5, 7845.0), "robotank": (2.2, 11.9), "seaquest": (68.4, 42054.7),
    "skiing": (-17098.1, -4336.9), "solaris": (1236.3, 12326.7),
    "space_invaders": (148.0, 1668.7), "star_gunner": (664.0, 10250.0),
    "surround": (-10.0, 6.5), "tennis": (-23.8, -8.3), "time_pilot": (3568.0, 5229.2),
    "tutankham": (11.4, 167.6), "up_n_down": (533.4, 11693.2), "venture": (0.0, 1187.5),
    "video_pinball": (16256.9, 17667.9), "wizard_of_wor": (563.5, 4756.5),
    "yars_revenge": (3092.9, 54576.9), "zaxxon": (32.5, 9173.3),
}

# DQN Replay files per checkpoint K: $store$_{observation,action,reward,terminal}_ckpt.K.gz
# (np.save'd arrays, gzipped; observation (capacity, 84, 84) uint8 single frames),
# add_count_ckpt.K.gz, invalid_range_ckpt.K.gz. Dopamine already wrote STACK-1 zero "padding"
# transitions before each episode, and its rewards are already clipped to [-1, 1].
DQN_STORE = "$store$_{}_ckpt.{}.gz"


def _read_npy_gz(path: Path, rows: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Read (the first `rows` rows of) a gzipped .npy without decompressing the rest."""
    with gzip.open(path, "rb") as f:
        fmt = np.lib.format
        read_header = (fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0)
                       else fmt.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if fortran and len(shape) > 1:
            raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
        if len(shape) == 0:
            return np.frombuffer(f.read(dtype.itemsize), dtype).reshape(())
        n = shape[0] if rows is None else min(rows, shape[0])
        if out is None:
            out = np.empty((n, *shape[1:]), dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        while got < view.nbytes:
            k = f.readinto(view[got:])
            if not k:
                raise ValueError(f"{path}: truncated file")
            got += k
        return out


def parse_checkpoint_list(spec: str, available: list[int]) -> list[int]:
    """--checkpoints 'all' or a list such as '0-9,20' -> the checkpoint numbers."""
    if spec == "all":
        return available
    chosen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        chosen.update(range(int(lo), int(hi or lo) + 1))
    if missing := sorted(chosen - set(available)):
        fail(f"DQN Replay checkpoints {missing} not found; available: {available}")
    return sorted(chosen)


def dqn_replay_game(path: str) -> str | None:
    """The game of a DQN Replay directory (gs://atari-replay-datasets/dqn layout
    <Game>/<run>/replay_logs): the last path component that names an ALE game."""
    for part in reversed(Path(path).parts):
        if part != "replay_logs" and not part.isdigit() and (game := atari_game(part)):
            return game
    return None


def dqn_replay_download(game: str | None) -> str:
    """How to get run 1 of `game`'s DQN Replay logs (Pong's without a game) into a path that
    dqn_replay_game reads the game from: gsutil's `cp -R SRC DEST` into an existing folder
    DEST adds SRC's last name, so <Game>/1 copied into DIR/<Game> is DIR/<Game>/1."""
    name = "".join(w.capitalize() for w in (game or "pong").split("_"))  # the bucket's names
    return (f"download run 1 of {name}'s logs with `mkdir -p DIR/{name} && gsutil -m cp -R "
            f"gs://atari-replay-datasets/dqn/{name}/1 DIR/{name}` and pass "
            f"DIR/{name}/1/replay_logs")


def load_dqn_replay(path: str, fraction: float, checkpoints: str = "all",
                    progress: bool = True, game: str | None = None, game_actions: int | None = None,
                    pin: bool = False) -> Data:
    """The first round(fraction x filled rows) transitions of each chosen checkpoint (all 50 by
    default): 0.01 = 10k rows of each 1M checkpoint, 500k transitions, 1% of 50M. The official
    code loads 10k-row buffers (fixed_replay_buffer.py lines 51-53, 'For 1% experiments, we load
    10000 sized buffers') from 10 random checkpoints (line 69 num_buffers=10, 'For 1%
    experiments, set num_buffers=50'); its README says args[2] = 1000 for 1%, 10000 for 10%.
    Only 10k x 50 is the paper's 1%: this loader follows the 1%/10% definitions."""
    root = Path(path)
    if not root.is_dir():
        fail(f"--dqn-replay-dir {path} does not exist; {dqn_replay_download(game)}")
    found = sorted(int(m.group(1)) for p in root.iterdir()
                   if (m := re.fullmatch(r"\$store\$_observation_ckpt\.(\d+)\.gz", p.name)))
    if not found:
        fail(f"--dqn-replay-dir {path} has no $store$_observation_ckpt.K.gz files "
             f"(pass the replay_logs folder of one run, e.g. .../Pong/1/replay_logs)")
    chosen = parse_checkpoint_list(checkpoints, found)
    stack, plan = 4, []
    for k in chosen:
        for name in ("action", "reward", "terminal"):
            if not (root / DQN_STORE.format(name, k)).exists():
                fail(f"checkpoint {k} in {path} lacks {DQN_STORE.format(name, k)}")
        # the data must be --env's game: Pong data with --env breakout would index Q out of
        # range (6 actions vs 4), a game with more actions would train on the wrong game
        acts = _read_npy_gz(root / DQN_STORE.format("action", k))
        if game_actions is not None and (acts.min() < 0 or acts.max() >= game_actions):
            bad = int(((acts < 0) | (acts >= game_actions)).sum())
            fail(f"--dqn-replay-dir {path}: checkpoint {k} has action {int(acts.max())}, but "
                 f"{game} has {game_actions} actions ({bad} actions outside [0, {game_actions})):"
                 f" this is not {game}'s data; pass the replay_logs of the --env game")
        add_count = int(_read_npy_gz(root / f"add_count_ckpt.{k}.gz"))
        terminal = _read_npy_gz(root / DQN_STORE.format("terminal", k))
        filled = min(add_count, len(terminal))
        n = int(round(fraction * filled))
        if n < stack + 1:
            fail(f"--data-fraction {fraction} leaves {n} transitions of checkpoint {k}")
        plan.append((k, n))
    total = sum(n for _, n in plan)
    frames = host_zeros((total, 84, 84), np.uint8, pin)
    actions, rewards, dones = (np.empty(total, t) for t in (np.int64, np.float32, np.float32))
    valid, cur = [], 0
    for k, n in tqdm(plan, desc=f"loading DQN Replay {root}", disable=not progress):
        _read_npy_gz(root / DQN_STORE.format("observation", k), n, out=frames[cur:cur + n])
        actions[cur:cur + n] = _read_npy_gz(root / DQN_STORE.format("action", k), n)
        rewards[cur:cur + n] = _read_npy_gz(root / DQN_STORE.format("reward", k), n)
        term = _read_npy_gz(root / DQN_STORE.format("terminal", k), n).astype(np.float32)
        dones[cur:cur + n] = term
        ok = np.zeros(n, bool)
        ok[stack - 1:n - 1] = True  # the whole stack and the next frame lie inside the chunk
        # dopamine's is_valid_transition: no terminal among the first STACK-1 frames of the stack
        # (the stack would cross an episode end; this also rejects the padding transitions)
        term_before = np.convolve(term, np.ones(stack - 1), mode="full")[:n]  # term[i-3..i-1]
        term_before = np.concatenate([[0.0], term_before[:-1]])
        ok &= term_before == 0
        inv_path = root / f"invalid_range_ckpt.{k}.gz"
        if inv_path.exists():  # the transitions that straddle the buffer's write cursor
            inv = np.asarray(_read_npy_gz(inv_path)).reshape(-1).astype(np.int64)
            ok[inv[(inv >= 0) & (inv < n)]] = False
        valid.append(cur + np.flatnonzero(ok))
        cur += n
    if not np.isfinite(rewards).all():
        fail(f"DQN Replay data in {path} contains NaN or inf rewards")
    return Data(frames, actions, rewards, dones, np.concatenate(valid).astype(np.int64), stack,
                int(actions.max()) + 1, None, game=game)


def atari_source(env: str, dataset_id: str | None = None, dqn_replay_dir: str | None = None,
                 data_fraction: float = 0.01, checkpoints: str = "all") -> DataSource | None:
    """A game's data: --dqn-replay-dir (DQN Replay of the --env game), --env GAME (Minari
    atari/<game>/expert-v0) or a --dataset-id of a game."""
    name = env.lower()
    local = name in LOCAL_ENVS
    if dqn_replay_dir is not None or (dataset_id is None and not local):
        import_ale()  # a game name: without ale-py, that is the error
    game = None if local else atari_game(name)
    if dqn_replay_dir is not None:
        if game is None:
            what = "is a local dataset, not an Atari game" if local else "unknown"
            fail(f"--dqn-replay-dir needs an Atari game as --env: '{env}' {what}; valid: "
                 f"{', '.join(PAPER_GAMES)} or any ALE game id")
        path_game = dqn_replay_game(dqn_replay_dir)
        if path_game is not None and path_game != game:
            fail(f"--dqn-replay-dir {dqn_replay_dir} holds {path_game} data, but --env is "
                 f"{env} ({game}); pass the same game to both")
        return DataSource("dqn_replay", game, None,
                          f"dqn_replay:{dqn_replay_dir}:fraction={data_fraction}"
                          f":checkpoints={checkpoints}")
    if dataset_id is not None:
        m = re.match(r"atari/([a-z0-9_]+)/", dataset_id)
        game = (atari_game(m.group(1)) if m else None) or game
    elif game is not None:
        dataset_id = f"atari/{game.replace('_', '')}/expert-v0"
    return DataSource("minari", game, dataset_id, dataset_id) if game else None


def atari_preset(source: DataSource, data_fraction: float = 0.01, spec=None):
    """The atari group, then DQN Replay's 1% or 10% setting by --data-fraction, or for Minari
    data of a game or of frames (spec: the local dataset's, when known) minari-atari and the
    data's own sticky-action setting when it is local."""
    if source.kind == "dqn_replay":
        return ["atari", "dqn-replay-1pct" if data_fraction <= ONE_PCT_MAX
                else "dqn-replay-10pct"], {}
    frames = spec is not None and len(spec.observation_space.shape or ()) >= 2
    if source.game is None and not frames:
        return None
    sticky = data_sticky_prob(spec)
    return ["atari", "minari-atari"], {} if sticky is None else {"sticky_prob": sticky}


def dqn_replay_data(args: Args, source: DataSource, pin: bool) -> Data | None:
    """DQN Replay data, evaluated as dopamine does (sticky actions 0.25, the data's; no no-op
    starts: presets), scored human-normalized."""
    if source.kind != "dqn_replay":
        return None
    sticky = 0.25 if args.sticky_prob is None else args.sticky_prob
    eval_env = atari_eval_env(source.game, False, sticky, args.noop_max, args.max_episode_steps)
    n_actions = env_action_count(eval_env)
    data = load_dqn_replay(args.dqn_replay_dir, args.data_fraction, args.checkpoints,
                           args.progress, source.game, n_actions, pin)
    data.n_actions, data.eval_env = n_actions, eval_env
    data.score_range = ATARI_RANDOM_HUMAN.get(data.game)
    return data


def minari_atari_eval_env(args: Args, source: DataSource, data: Data) -> dict | None:
    """Minari frames: evaluated in ALE with the data's own sticky actions and frame-skip
    convention (--sticky-prob overrides, with a note), scored human-normalized."""
    if data.stack == 1:
        return None
    spec, data.game = data.env_spec, data.game or source.game
    if data.game is None:
        fail(f"dataset {source.dataset_id} holds Atari frames but its game is unknown; "
             f"pass --env GAME")
    data.score_range = ATARI_RANDOM_HUMAN.get(data.game)
    sticky = data.sticky_prob if args.sticky_prob is None else args.sticky_prob
    if data.sticky_prob is not None and sticky != data.sticky_prob:
        tqdm.write(f"note: evaluating with sticky actions {sticky}; the data was collected with "
                   f"{data.sticky_prob} ({spec.id})")
    full = bool(spec.kwargs.get("full_action_space", False))
    return atari_eval_env(data.game, data.atari_internal_frameskip,
                          0.25 if sticky is None else sticky, args.noop_max,
                          args.max_episode_steps, full)


def atari_dataset_ids() -> list[str]:
    """The Minari ids that --env GAME loads (atari_source): atari/<game>/expert-v0 of every ALE
    game, or of the paper's games without ale-py."""
    try:
        import ale_py
    except ImportError:
        games: Iterable[str] = PAPER_GAMES
    else:
        games = ale_py.roms.get_all_rom_ids()
    return [f"atari/{game.replace('_', '')}/expert-v0" for game in games]


FAMILIES["atari"] = Family(
    atari_source, atari_preset, dqn_replay_data, minari_atari_eval_env, minari_atari_frames,
    names=PAPER_GAMES,
    hint=", or any ALE game id (python -c 'import ale_py; print(ale_py.roms.get_all_rom_ids())')",
    dataset_ids=atari_dataset_ids)


# --- Presets: every value with its source ----------------------------------------------------
# CQL = github.com/aviralkumar2907/CQL (atari/, on batch_rl and dopamine); GIN = its atari/
# batch_rl/fixed_replay/configs/quantile.gin (Pong; the other games' .gin differ only in the
# game). A dopamine iteration (FixedReplayRunner._run_train_phase) is training_steps = 250k agent
# steps (GIN line 30), a gradient step every update_period = 4 (line 14): 62.5k gradient steps.
Preset = dict[str, tuple[Any, str]]
_GIN = "CQL atari/batch_rl/fixed_replay/configs/quantile.gin"
_DQN_STICKY = (0.25, f"{_GIN} line 28 sticky_actions=True (dopamine: 0.25); the data was "
                     "collected with them")
PRESETS: dict[str, Preset] = {
    "atari": {  # every Atari source
        # the README's num_iterations=1000 overrides GIN line 29's 200 (= --total-steps 12.5M);
        # paper Table 3 "after 5X gradient steps" = REM's 1000 iterations (Agarwal et al. 2020)
        "total_steps": (62_500_000, "CQL README line 31 num_iterations=1000 x 62.5k gradient steps "
                                    "(paper App. F: Table 3 after 5X gradient steps)"),
        "eval_every": (62_500, "one dopamine iteration: GIN line 30 training_steps=250000 / "
                               "update_period=4 (line 14)"),
        # a fixed number of episodes, so that every evaluation averages the same count
        "eval_episodes": (10, "project choice (official: episodes filling 125k agent steps, "
                              "GIN line 31)"),
        "batch_size": (32, f"{_GIN} line 35 WrappedFixedReplayBuffer.batch_size"),
        "qf_lr": (5e-5, f"{_GIN} line 24 AdamOptimizer.learning_rate"),
        "adam_eps": (3.125e-4, f"{_GIN} line 25 AdamOptimizer.epsilon"),
        "gamma": (0.99, f"{_GIN} line 11"),
        "num_quantiles": (200, f"{_GIN} line 10 num_atoms"),
        "kappa": (1.0, "CQL atari/batch_rl/multi_head/quantile_agent.py line 40 kappa=1.0"),
        "target_update_every": (2000, f"{_GIN} line 15 target_update_period=8000 agent steps / "
                                      "update_period 4"),
        "clip_reward": (True, "dopamine DQN Replay data is stored clipped to [-1, 1] "
                              "(dqn_agent.py: np.clip(reward, -1, 1))"),
        "eval_epsilon": (0.001, f"{_GIN} line 17 epsilon_eval"),
        "max_episode_steps": (27_000, f"{_GIN} line 32 max_steps_per_episode"),
        "noop_max": (0, "dopamine atari_lib.create_atari_environment: no no-op starts"),
        "torso_padding": ("same", "dopamine atari_lib.NatureDQNNetwork (Keras padding='same')"),
    },
    # DQN Replay: the paper's two data settings; the weight is chosen from --data-fraction
    # (<= 5% -> the 1% weight, else the 10% weight; the paper's 20% curves used 0.5)
    "dqn-replay-1pct": {
        "cql_weight": (4.0, "CQL README line 35 'For 1% data, use minq_weight=4.0'; paper App. F"),
        "sticky_prob": _DQN_STICKY},
    "dqn-replay-10pct": {
        "cql_weight": (1.0, "CQL README line 35 'for 10% data, use minq_weight=1.0'; paper App. F"),
        "sticky_prob": _DQN_STICKY},
    # Minari atari/<game>/expert-v0: 10 expert episodes, not the paper's data
    "minari-atari": {
        "cql_weight": (4.0, "project choice: the paper's weight for its smallest (1%) data"),
        "sticky_prob": (0.0, "the dataset's env spec: Minari atari/<game>/expert-v0 was collected "
                             "with repeat_action_probability=0 (read from the data when local)"),
    },
    # small vector problems (CartPole) on a CPU: no paper setting exists
    "vector": {
        "total_steps": (20_000, "project choice: CPU-sized"),
        "eval_every": (2000, "project choice"),
        "batch_size": (64, "project choice"),
        "qf_lr": (1e-3, "project choice: small MLP"),
        "num_quantiles": (50, "project choice"),
        "target_update_every": (500, "project choice"),
        "cql_weight": (1.0, "project choice (tests/test_cql_qrdqn_learning.py)"),
        "clip_reward": (False, "project choice: CartPole rewards are 1"),
        "eval_epsilon": (0.0, "project choice: greedy"),
        "hidden_dims": ((128, 128), "project choice"),
        "threads": (1, "project choice: one thread is fastest for small MLPs"),
    },
}
ONE_PCT_MAX = 0.05  # --data-fraction up to this uses the 1% weight, above it the 10% weight
# Which groups apply (preset_groups, by the data; later ones override earlier ones)
GROUP_RULE = ("atari: every Atari source; dqn-replay-1pct: --dqn-replay-dir with --data-fraction "
              f"<= {ONE_PCT_MAX}; dqn-replay-10pct: above; minari-atari: a Minari dataset of "
              "frames (atari/<game>/expert-v0); vector: vector observations (CartPole)")
# --env name -> its groups by GROUP_RULE (tests/test_cql_qrdqn_presets.py checks them)
ENV_GROUPS: dict[str, list[str]] = {
    **{game: ["atari", "minari-atari"] for game in ("pong", "breakout", "qbert", "seaquest",
                                                     "asterix")},  # PAPER_GAMES
    **{f"cartpole-{kind}": ["vector"] for kind in ("random", "medium", "expert", "mixed")},
    "pong-random": ["atari", "minari-atari"],  # local frames
}


def preset_claim(source: DataSource, data_fraction: float = 0.01, spec=None
                 ) -> tuple[list[str], dict[str, Any]]:
    """The PRESETS groups of the data by GROUP_RULE (the first family's that claims it, else
    vector) and the values read from the local data (spec: the local dataset's, when known)."""
    return next((claim for family in FAMILIES.values()
                 if (claim := family.preset(source, data_fraction, spec)) is not None),
                (["vector"], {}))


def preset_groups(source: DataSource, data_fraction: float = 0.01, spec=None) -> list[str]:
    return preset_claim(source, data_fraction, spec)[0]


def preset_args(env: str, dataset_id: str | None = None, dqn_replay_dir: str | None = None,
                data_fraction: float = 0.01) -> Args:
    """Args() with the values of the env's preset groups filled in (literal values)."""
    source = resolve_source(env, dataset_id, dqn_replay_dir, data_fraction)
    spec = None
    if source.kind == "minari":  # the local dataset's spec, if any (missing: load_data says so)
        with contextlib.suppress(Exception):
            spec = importlib.import_module("minari").load_dataset(source.dataset_id).spec
    groups, from_data = preset_claim(source, data_fraction, spec)
    values = {k: v for group in groups for k, (v, _) in PRESETS[group].items()}
    return replace(Args(), env=env, dataset_id=dataset_id, dqn_replay_dir=dqn_replay_dir,
                   data_fraction=data_fraction, **{**values, **from_data})


def presets_markdown() -> str:
    """Every preset value with its source, as a markdown table (`--presets`)."""
    lines = ["| preset | field | value | source |", "|---|---|---|---|"]
    for group, preset in PRESETS.items():
        for name, (value, source) in preset.items():
            lines.append(f"| {group} | `{name}` | `{value!r}` | {source} |")
    return "\n".join(lines) + f"\n\nGroups: {GROUP_RULE}. Unlisted fields: `Args` defaults.\n"


def env_from_dataset(dataset_id: str) -> str:
    """--env label of a run given only --dataset-id: atari/pong/expert-v0 -> pong-expert-v0."""
    return "-".join(dataset_id.split("/")[1:]) or dataset_id


POSITIVE = ("total_steps", "eval_every", "eval_episodes", "batch_size", "num_quantiles",
            "target_update_every", "log_every", "max_episode_steps", "qf_lr", "adam_eps",
            "alpha_prime_lr", "kappa", "max_abs_q")


def check_args(args: Args) -> None:
    """Every argument checked once, up front: one-line errors, never a traceback or a NaN."""
    rules = [(name, "positive", getattr(args, name) > 0) for name in POSITIVE] + [
        ("data_fraction", "in (0, 1]", 0.0 < args.data_fraction <= 1.0),
        ("gamma", "in [0, 1)", 0.0 <= args.gamma < 1.0),
        ("cql_weight", ">= 0", args.cql_weight >= 0),
        ("sticky_prob", "in [0, 1]", args.sticky_prob is None or 0.0 <= args.sticky_prob <= 1.0),
        ("eval_epsilon", "in [0, 1]", 0.0 <= args.eval_epsilon <= 1.0),
        ("noop_max", ">= 0", args.noop_max >= 0),
        ("hidden_dims", "positive widths", all(h > 0 for h in args.hidden_dims)),
        ("threads", "positive", args.threads is None or args.threads > 0),
        ("checkpoints", "'all' or a list such as 0-9,20",
         re.fullmatch(r"all|\d+(-\d+)?(,\d+(-\d+)?)*", args.checkpoints.replace(" ", "")))]
    if not 0 <= args.seed < SEED_END:  # the rule of check_run_args, before any data loads
        fail(f"--seed {args.seed} is outside [0, 2**31); pick a seed in that range")
    for name, rule, ok in rules:
        if not ok:
            fail(f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}")


def parse_args(argv: list[str] | None = None) -> Args:
    """Command line -> complete Args: --env (or --dataset-id alone) and the data flags pick the
    preset, which tyro shows in --help and the other flags override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--presets" in argv:
        print(presets_markdown(), end="")
        raise SystemExit(0)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--env", "--dataset-id", "--dqn-replay-dir"):
        pre.add_argument(flag)
    pre.add_argument("--data-fraction", type=float, default=0.01)
    known, _ = pre.parse_known_args(argv)
    env = known.env or (env_from_dataset(known.dataset_id) if known.dataset_id else None)
    if env is None and not {"-h", "--help"} & set(argv):
        fail("--env is required (e.g. --env pong, --env cartpole-expert) unless --dataset-id "
             "names the data; see --help")
    preset = preset_args(env or Args.env, known.dataset_id, known.dqn_replay_dir,
                         known.data_fraction)
    args = args_from_argv(preset, argv, env or Args.env)
    check_args(args)
    return args


LENGTH_FIELD = "total_steps"  # the run length a resume may grow (Part III)


def planned_updates(args: Args) -> int:
    """Gradient updates of the whole run (Part III's start line)."""
    return args.total_steps


# ======================================================================================
# Part III: run plumbing (not part of the algorithm)
# ======================================================================================
# The run directory contract, the same block under the same names in all three scripts:
#   config.json    resolved arguments, dataset facts, eval env, versions (written at the
#                  start; a resume that grows the length records the new length)
#   metrics.jsonl  one row per evaluation; rebuilt from the checkpoint on resume
#   checkpoint.pt  everything needed to continue bit-identically on CPU, with the script and
#                  the arguments that made it (atomic, fsync'd)
#   summary.json   final numbers, speed, wall time over all sessions (atomic, fsync'd)
#   run.lock       flock'ed by the process that runs the directory (it holds its PID)
# SIGINT/SIGTERM checkpoint and exit 128+signal (the first one; later ones are ignored);
# `--resume RUN_DIR` continues; a resume whose arguments differ from config.json (but for
# RESUME_FREE) is refused, and the length may grow but not shrink. A new run needs a
# directory without run files. Everything that can be checked before the data is loaded is
# checked then (check_run_args, from the command line); Run checks it again.
#
# Per script, above this banner, only: LENGTH_FIELD (the length that a finished run may
# grow by), planned_updates(args), and the `parts` passed to Run (objects with
# state_dict() / load_state_dict(): agent, trainer, buffers, loop counters).

RESUME_FREE = {"resume", "run_dir", "track", "wandb_project", "wandb_entity", "progress",
               "capture_video", "log_every", LENGTH_FIELD}  # a resume may change these
# (the length: grow only)
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json")
LOCK_FILE = "run.lock"
DEVICES = ("auto", "cpu", "cuda")
SEED_END = 2**31  # seeds in [0, 2**31): torch, numpy and gymnasium accept all of them
WANDB_REFUSED = ":;,#?/'"  # not allowed in a W&B run id (wandb/sdk/wandb_settings.py)
CPU_WARN_UPDATES = 100_000  # more updates than this on a CPU: a warning and a time estimate
REPORT_KEYS = ("step", "phase", "env_steps", "return_mean", "score", "success_rate",
               "value_gap")  # printed after each evaluation, when present
_LOCKS: dict[str, int] = {}  # run directory -> descriptor of its lock, held by this process


def default_run_dir(args: Args) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"runs/{Path(__file__).stem}__{args.env}__s{args.seed}__{stamp}"


def help_header(env: str) -> str:
    """--help's first lines: what the values shown are, and where the others are."""
    return (f"{__doc__.splitlines()[0].removesuffix('.')}. The values shown are the ones "
            f"`--env {env}` runs: its preset over the defaults (`--env X --help`: task X's). "
            "`--presets` prints every preset value with its source, the papers' defaults "
            "included. Switches take no value: `--compile` / `--no-compile`.")

def args_from_argv(default: Args, argv: list[str], env: str) -> Args:
    """`argv` parsed by tyro over `default` (the preset); `-h`/`--help` prints grouped_help."""
    if {"-h", "--help"} & set(argv):
        print(grouped_help(default, env))
        raise SystemExit(0)
    return tyro.cli(Args, default=default, args=argv, description=help_header(env))


def arg_groups() -> list[tuple[str, list[tuple[str, str]]]]:
    """Args' fields with their docstrings, grouped by the `# ---- group ----` banners of its
    source (the order of the class; fields above the first banner: 'run and data')."""
    import ast
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(Args))
    body = ast.parse(source).body[0].body
    docs = {a.target.id: inspect.cleandoc(d.value.value)
            for a, d in zip(body[:-1], body[1:], strict=True)
            if isinstance(a, ast.AnnAssign) and isinstance(d, ast.Expr)}
    groups: list[tuple[str, list[tuple[str, str]]]] = [("run and data", [])]
    for line in source.splitlines():
        if line.strip().startswith("# ----"):
            groups.append((line.strip(" #-"), []))
        elif (name := line.split(":")[0].strip()) in docs and line.startswith(f"    {name}:"):
            groups[-1][1].append((name, docs[name]))
    return [g for g in groups if g[1]]


def flag_usage(name: str, hint: Any) -> str:
    """`--policy-lr FLOAT`, `--compile | --no-compile`, `--init {rlkit,orthogonal,pytorch}`."""
    import typing

    flag = "--" + name.replace("_", "-")
    args = typing.get_args(hint)
    if hint is bool:
        return f"{flag} | --no-{flag[2:]}"
    if typing.get_origin(hint) is Literal:
        return f"{flag} {{{','.join(map(str, args))}}}"
    if typing.get_origin(hint) is tuple:
        return f"{flag} {args[0].__name__.upper()} [{args[0].__name__.upper()} ...]"
    if type(None) in args:  # `X | None`
        inner = next(a for a in args if a is not type(None))
        return f"{flag_usage(name, inner)}|None"
    return f"{flag} {hint.__name__.upper()}"


def grouped_help(default: Args, env: str) -> str:
    """--help: the header, then each group's flags with their docstrings and the values that
    `--env env` runs (`default`)."""
    import textwrap
    import typing

    hints = typing.get_type_hints(Args)
    shown = lambda v: " ".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
    out = [f"usage: {Path(sys.argv[0]).name} [--env ENV] [FLAGS]", "",
           *textwrap.wrap(help_header(env), 96), "", "  -h, --help", "      Show this message.",
           "  --presets", "      Print every preset value with its source, then exit."]
    for group, fields in arg_groups():
        out += ["", f"{group}:"]
        for name, doc in fields:
            text = f"{' '.join(doc.split())} (default: {shown(getattr(default, name))})"
            out += [f"  {flag_usage(name, hints[name])}",
                    *textwrap.wrap(text, 96, initial_indent="      ",
                                   subsequent_indent="      ", break_on_hyphens=False)]
    return "\n".join(out)


def fail(message: str) -> NoReturn:
    """Stop with a one-line error (exit code 1, no traceback)."""
    raise SystemExit(f"error: {message}")


def check_device(name: str) -> None:
    if name not in DEVICES:
        hint = (f"--device cuda with CUDA_VISIBLE_DEVICES={name[5:]}" if name.startswith("cuda:")
                else "--device auto (CUDA when visible), cpu or cuda")
        fail(f"--device {name!r} is not one of {', '.join(DEVICES)}; use {hint}")


def pick_device(name: str) -> torch.device:
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


def check_run_args(args: Args) -> Args:
    """The run's own arguments, before any data is loaded: device, seed and the run
    directory (writable, not in use; a new run's without run files, a resume's config.json
    whole, of this script, with the same arguments). Takes the directory's lock."""
    check_device(args.device)
    if not 0 <= args.seed < SEED_END:
        fail(f"--seed {args.seed} is outside [0, 2**31); pick a seed in that range")
    run_dir = Path(args.resume or args.run_dir or default_run_dir(args))
    if args.resume and not ((run_dir / "checkpoint.pt").exists()
                            and (run_dir / "config.json").exists()):
        fail(f"--resume {run_dir}: no checkpoint.pt and config.json there; "
             "start a new run instead")
    check_writable(run_dir)
    if run_dir.is_dir():
        lock_run_dir(run_dir)
    if args.resume:
        check_resume_config(run_dir, args)
    else:
        check_new_run_dir(run_dir, args)
    return args


def check_writable(path: Path) -> None:
    """The run directory, or the nearest folder above it that exists, takes a file."""
    if path.exists() and not path.is_dir():
        fail(f"--run-dir {path} is a file, not a directory; pick another --run-dir")
    there = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not there.is_dir():
        fail(f"--run-dir {path} cannot be created: {there} is a file; pick another --run-dir")
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=there)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        fail(f"--run-dir {path} cannot be written ({there}: {exc.strerror}); pick another "
             "--run-dir or make it writable")


def lock_run_dir(path: Path) -> None:
    """An exclusive flock on RUN_DIR/run.lock, held until close() or the process ends: a
    second process on the directory refuses, naming the first one's PID."""
    key = str(path.resolve())
    if key in _LOCKS:
        return
    try:
        import fcntl
    except ImportError:  # no flock on this system: no lock
        return
    lock = path / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        fail(f"--run-dir {path}: cannot open {lock} ({exc.strerror}); make it writable")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        fail(f"{path} is in use by another process (PID {pid}, holding {lock}); wait for it "
             "to end, or pick another --run-dir")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS[key] = fd


def unlock_run_dir(path: Path) -> None:
    fd = _LOCKS.pop(str(path.resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def arg_values(args: Args) -> dict[str, Any]:
    """Args as config.json holds them (JSON round trip, NaN/inf -> None)."""
    return json_safe(json.loads(json.dumps(config_dict(args))))


def arg_changes(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """'key: saved -> now, ...' for the arguments a resume may not change ('' if none)."""
    diff = sorted(k for k in now if k not in RESUME_FREE and saved.get(k) != now[k])
    shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff[:6])
    return shown + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")


def check_length(where: str, saved: dict[str, Any], now: dict[str, Any]) -> None:
    flag = "--" + LENGTH_FIELD.replace("_", "-")
    if now[LENGTH_FIELD] < saved.get(LENGTH_FIELD, now[LENGTH_FIELD]):
        fail(f"{where}: {flag} {now[LENGTH_FIELD]} is shorter than the run's "
             f"{saved[LENGTH_FIELD]}; a resume may grow it, not shrink it; rerun with "
             f"{flag} {saved[LENGTH_FIELD]} or more")


def read_config(path: Path) -> dict[str, Any]:
    """config.json, or a one-line error naming it (the other run files are kept)."""
    try:
        config = json.loads(path.read_bytes().decode())
        problem = ("it holds no 'args'" if not isinstance(config, dict) or not isinstance(
            config.get("args"), dict) else "")
    except (OSError, ValueError) as exc:  # unreadable, binary, empty, truncated
        config, problem = {}, f"{type(exc).__name__}: not readable JSON"
    if problem:
        fail(f"{path} is damaged ({problem}); checkpoint.pt and metrics.jsonl beside it are "
             "kept as they are; put back a copy of config.json, or start a new run in "
             "another --run-dir")
    return config


def check_resume_config(path: Path, args: Args) -> None:
    """Refuse a resume of another script's run, or with arguments other than config.json's."""
    config, this = read_config(path / "config.json"), Path(__file__).name
    script = config.get("script", this)
    if script != this:
        fail(f"--resume {path} is a run of {script}, not of {this}; continue it with "
             f"python {script} ... --resume {path}")
    saved, now = config["args"], arg_values(args)
    detail = arg_changes(saved, now)
    if detail:
        fail(f"--resume {path} does not match its config.json ({detail}); rerun with the "
             "original arguments or start a new run")
    check_length(f"--resume {path}", saved, now)


def check_new_run_dir(path: Path, args: Args) -> None:
    """A new run needs a directory without run files; one exception loses nothing: a start
    of the same command that stopped before its first checkpoint and row."""
    found = [name for name in RUN_FILES if (path / name).exists()]
    if not found:
        return
    if "checkpoint.pt" in found:
        fail(f"{path} already holds a run ({', '.join(found)}); continue it with --resume "
             f"{path} or pick another --run-dir")
    if set(found) <= {"config.json", "metrics.jsonl"} and "config.json" in found:
        rows = path / "metrics.jsonl"
        config = read_config(path / "config.json")
        if (config.get("script") == Path(__file__).name and not arg_changes(
                config["args"], arg_values(args)) and not (rows.exists() and rows.stat().st_size)):
            return
    fail(f"{path} holds files of another run ({', '.join(found)}) and no checkpoint to "
         "resume; pick another --run-dir, or move them away first")


def wandb_run_id(name: str) -> str:
    """The W&B run id of a run directory: its name, the characters W&B refuses replaced."""
    return "".join("-" if c in WANDB_REFUSED or c.isspace() else c for c in name)[-64:]


def config_dict(args: Args) -> dict[str, Any]:
    """Args as JSON-ready values (tuples -> lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(args).items()}


def json_safe(value: Any) -> Any:
    """NaN/inf -> None, recursively: config, metrics and summary stay valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename: the file is whole or untouched, and
    a failed write (a full disk) leaves no temp file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        quietly(os.unlink, tmp)
        raise


def quietly(action: Callable[..., Any], *args: Any) -> None:
    """action(*args), an OSError ignored: clean-up after a failed write."""
    try:
        action(*args)
    except OSError:
        return


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(json_safe(obj), indent=2).encode())


def host_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """The one host sync: all training metrics in a single transfer."""
    keys = sorted(metrics)
    values = torch.stack([metrics[k].detach().float() for k in keys]).tolist()
    return dict(zip(keys, values, strict=True))


VERSIONED = ("python", "torch", "numpy", "gymnasium", "tyro", "minari", "gymnasium-robotics",
             "mujoco", "ale-py", "opencv-python-headless")


def package_versions() -> dict[str, str]:
    """Versions of Python and the installed packages a run may use (config.json)."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in VERSIONED[1:]:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def git_commit() -> str | None:
    """The checkout's commit (with '+changes' when the tree differs), or None outside git."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def check_switches(argv: list[str]) -> None:
    """A boolean flag given a value (`--compile True`, `--track=false`): a one-line answer
    that it is a switch, instead of the parser's error about an extra argument."""
    from dataclasses import fields

    switches = {f.name.replace("_", "-") for f in fields(Args) if f.type in (bool, "bool")}
    for i, word in enumerate(argv):
        name, _, value = word.removeprefix("--").partition("=")
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        if word.startswith("--") and name in switches and value.lower() in ("true", "false"):
            fail(f"--{name} is a switch: use --{name} or --no-{name} (no value)")


class StartupSignal(BaseException):
    """SIGINT/SIGTERM before Run took the signals over (the command line's start-up)."""


def _startup_signal(signum: int, _frame: Any) -> None:
    raise StartupSignal(signum)


class Run:
    """One run directory: config, evaluation rows, checkpoints of `parts`, resume, stop
    signals, the divergence guard, W&B and the summary. The main loop calls `log`,
    `evaluate_and_checkpoint` and `stop_if_signalled`; nothing here touches the algorithm."""

    restore_signals = True  # cli(): False, the process ends with the run
    command: str | None = None  # cli(): the command line, for config.json
    after: dict[str, Any] | None = None  # --evaluate / --export-policy: kind, video
    last_dir: Path | None = None  # the directory of the last run started in this process

    def __init__(self, args: Args, parts: dict[str, Any], info: dict[str, Any],
                 eval_env: dict[str, Any], device: torch.device):
        self.args, self.parts = args, parts
        if args.threads is not None:  # --threads: before the first update
            torch.set_num_threads(args.threads)
        self.dir = Path(args.run_dir)
        self.ckpt = self.dir / "checkpoint.pt"
        self.step, self.history, self.saved = 0, [], None  # saved: the checkpoint's step
        self.timing = dict(train_s=0.0, wall_s=0.0)
        self.train_values: dict[str, float] = {}
        self.signal: int | None = None
        self.wandb, self.videos = None, []
        Run.last_dir = self.dir
        # first: a stop signal from here on is honoured at the first step boundary
        self._handlers = {} if Run.after else {s: signal.signal(s, self._on_signal)
                                               for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if Run.after:  # after training: the checkpoint's parts, nothing written
                self.load(check=False)
            else:
                self.start(info, eval_env, device)
        except BaseException:
            self.close()
            raise
        now = time.perf_counter()
        self._wall0, self._train0 = now - self.timing["wall_s"], now

    def start(self, info: dict[str, Any], eval_env: dict[str, Any],
              device: torch.device) -> None:
        args = self.args
        check_run_args(args)  # again: main() may be called without the command line
        if args.resume:
            self.load()
            config = read_config(self.dir / "config.json")
            if getattr(args, LENGTH_FIELD) != config["args"].get(LENGTH_FIELD):
                config["args"][LENGTH_FIELD] = getattr(args, LENGTH_FIELD)  # grown
                self.write(self.dir / "config.json", config)
        else:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                fail(f"--run-dir {self.dir} cannot be created ({exc.strerror}); pick another "
                     "--run-dir")
            lock_run_dir(self.dir)
            check_new_run_dir(self.dir, args)  # again, under the lock
            self.write(self.dir / "config.json", dict(
                args=config_dict(args), dataset=info, eval_env=eval_env,
                script=Path(__file__).name, torch=torch.__version__, device=str(device),
                command=Run.command, git_commit=git_commit(), versions=package_versions()))
        # metrics.jsonl = the checkpoint's history: rows written after the last checkpoint
        # (a hard kill between the two writes) are dropped, never duplicated.
        self.write(self.dir / "metrics.jsonl",
                   "".join(json.dumps(json_safe(r)) + "\n" for r in self.history).encode())
        self.wandb = self.init_wandb() if args.track else None
        self.announce(info, device)

    def announce(self, info: dict[str, Any], device: torch.device) -> None:
        """The start line: run directory, data, device, updates; a warning for a long run
        on a CPU, whose duration log() estimates from the first updates."""
        updates, args = planned_updates(self.args), self.args
        data = info.get("dataset_id") or info.get("source") or args.dataset_id
        print(f"{Path(__file__).name}: {'resuming' if args.resume else 'new'} run {self.dir} "
              f"| data {data} | device {device} | {updates:,} updates", file=sys.stderr)
        self.estimate_at = None
        if device.type == "cpu" and updates > CPU_WARN_UPDATES:
            self.estimate_at = self.step + args.log_every  # the first log after the start
            self.estimate_from = (self.step, time.perf_counter())
            print(f"warning: {updates:,} updates is a paper-size run, slow on a CPU (a GPU: "
                  "--device cuda); its duration is estimated after the first updates",
                  file=sys.stderr)

    def estimate_duration(self, step: int) -> None:
        first, t0 = self.estimate_from
        rate = (step - first) / max(time.perf_counter() - t0, 1e-9)
        hours = (planned_updates(self.args) - step) / max(rate, 1e-9) / 3600
        print(f"estimate: {rate:.1f} updates/s, about {hours:.1f} hours to go", file=sys.stderr)
        self.estimate_at = None

    # ---- called by the main loop -----------------------------------------------------
    def due(self, step: int, *every: int, last: int | None = None) -> bool:
        """True at multiples of any `every` and at the last step."""
        return any(step % e == 0 for e in every) or step == last

    def log(self, step: int, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        """Read the training metrics (the only host sync), guard against divergence."""
        self.train_values = host_metrics(metrics)
        if self.estimate_at is not None and step >= self.estimate_at:
            self.estimate_duration(step)
        bad = sorted(k for k, v in self.train_values.items() if not math.isfinite(v))
        q_max = max(abs(self.train_values.get(k, 0.0)) for k in ("q_data", "q_abs_max"))
        if bad or q_max > self.args.max_abs_q:
            what = ", ".join(bad) + " non-finite" if bad else f"|Q| {q_max:.3g} > --max-abs-q"
            kept = (f"the last good checkpoint is {self.ckpt} (step {self.history[-1]['step']})"
                    if self.history else "no checkpoint was written")
            self.close()  # the stop handlers go back before the error leaves the run
            fail(f"training diverged at step {step} ({what}); {kept}; lower the learning "
                 "rates or raise --cql-weight")
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in self.train_values.items()}, step=step)
        return self.train_values

    def evaluate_and_checkpoint(self, step: int, evaluate: Callable[[], dict[str, Any]],
                                **fields: Any) -> dict[str, Any]:
        """One metrics row: `fields`, the wall time so far (all sessions, the evaluation
        included), the evaluation, the last training metrics; then the checkpoint.
        Evaluation time is not training time (updates_per_sec)."""
        self.timing["train_s"] += time.perf_counter() - self._train0
        result = evaluate()
        row = dict(step=step, **fields, wall_time_s=time.perf_counter() - self._wall0,
                   **result, **self.train_values)
        self.history.append(row)
        metrics = target = self.dir / "metrics.jsonl"
        size = metrics.stat().st_size if metrics.exists() else 0
        try:
            with open(metrics, "a") as fh:
                fh.write(json.dumps(json_safe(row)) + "\n")
            self.step, target = step, self.ckpt
            self.save()
        except OSError as exc:  # the row goes with its checkpoint: both, or neither
            quietly(os.truncate, metrics, size)  # else dropped on resume anyway
            self.write_failed(target, exc)
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in row.items()
                            if isinstance(v, (int, float))}, step=step)
        tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in row.items() if k in REPORT_KEYS and v is not None))
        self._train0 = time.perf_counter()
        return row

    def stop_if_signalled(self, step: int) -> None:
        """After SIGINT/SIGTERM: checkpoint here and exit 128+signal (the first signal)."""
        if self.signal is None:
            return
        self.timing["train_s"] += time.perf_counter() - self._train0
        self.step = step
        try:
            self.save()
        except OSError as exc:
            self.write_failed(self.ckpt, exc)
        print(f"stopped by signal {self.signal} at step {step}; continue with the same "
              f"arguments plus --resume {self.dir}", file=sys.stderr)
        self.close()
        raise SystemExit(128 + self.signal)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """summary.json: the script's final numbers plus speed and wall time."""
        self.timing["train_s"] += time.perf_counter() - self._train0
        self.timing["wall_s"] = time.perf_counter() - self._wall0
        summary = json_safe(dict(summary, updates_per_sec=self.step / max(
            self.timing["train_s"], 1e-9), wall_time_s=self.timing["wall_s"]))
        self.write(self.dir / "summary.json", summary)
        if self.wandb is not None:
            self.wandb.summary.update(summary)
            self.wandb.finish()
        self.close()
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
        score, gap = summary.get("final_score"), summary.get("value_gap")
        print(f"done: final score {fmt(score)} | value gap {fmt(gap)} "
              f"| wall time {summary['wall_time_s']:.0f} s | {self.dir / 'summary.json'}",
              file=sys.stderr)
        return summary

    def recorded(self, env: gym.Env, tag: str = "") -> gym.Env:
        """--evaluate --capture-video: the env's episodes to RUN_DIR/videos; else env."""
        if not (Run.after and Run.after["video"]):
            return env
        self.videos.append(record_video(env, self.dir / "videos" / evaluation_name(
            self.args, self.step), tag or "eval"))
        return self.videos[-1]

    def after_training(self, evaluation: Callable[[], dict[str, Any]],
                       policy: Callable[[], nn.Module]) -> dict[str, Any]:
        """--export-policy: RUN_DIR/policy.pt2. --evaluate: one evaluation of the
        checkpoint to RUN_DIR/evaluations/<name>.json and one line; no training file
        changes."""
        self.close()
        if Run.after["kind"] == "export":
            path = export_policy(policy(), self.dir / POLICY_FILE)
            print(f"wrote {path} (the policy of step {self.step}): torch.export.load(path)"
                  ".module()(obs) gives the action", file=sys.stderr)
            return dict(policy=str(path))
        row, name = evaluation(), evaluation_name(self.args, self.step)
        for env in self.videos:
            env.close()  # writes the last video
        path = self.dir / "evaluations" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        write_json(path, json_safe(dict(step=self.step, seed=self.args.seed,
                                        eval_episodes=self.args.eval_episodes,
                                        command=Run.command, **row)))
        score = row["return_mean"] if row.get("score") is None else row["score"]
        success = "" if row.get("success_rate") is None else \
            f" | success rate {row['success_rate']:.2f}"
        videos = f" | videos in {self.dir / 'videos' / name}" if self.videos else ""
        print(f"evaluated {self.dir} at step {self.step} ({self.args.eval_episodes} episodes, "
              f"seed {self.args.seed}): score {score:.4g}{success} | value gap "
              f"{row.get('value_gap', float('nan')):.4g}{videos} | {path}", file=sys.stderr)
        return row

    def close(self) -> None:
        """The directory's lock goes; the signal handlers go back. On the command line the
        process ends here: signals are ignored (Python's exit would otherwise put back the
        default handler, and a late signal would kill the process)."""
        unlock_run_dir(self.dir)
        for s, handler in self._handlers.items():
            signal.signal(s, handler if self.restore_signals else signal.SIG_IGN)

    # ---- files, checkpoints and resume -------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signal is None:  # the first signal decides; a stop is under way after it
            self.signal = signum  # acted on at the next step boundary

    def kept(self) -> str:
        if self.saved is None:
            return "no checkpoint was written; start the run again"
        return (f"the checkpoint of step {self.saved} ({self.ckpt}) is intact; continue with "
                f"the same arguments plus --resume {self.dir}")

    def write_failed(self, path: Path, exc: OSError) -> NoReturn:
        self.close()
        fail(f"could not write {path} ({exc.strerror or exc}); {self.kept()} once the disk "
             "has room (or the directory is writable)")

    def write(self, path: Path, obj: Any) -> None:
        """write_json (bytes: atomic_write), or a one-line error saying what is intact."""
        try:
            if isinstance(obj, bytes):
                atomic_write(path, obj)
            else:
                write_json(path, obj)
        except OSError as exc:
            self.write_failed(path, exc)

    def save(self) -> None:
        self.timing["wall_s"] = time.perf_counter() - self._wall0
        state = dict(step=self.step, history=self.history, timing=self.timing,
                     script=Path(__file__).name, args=arg_values(self.args),
                     parts={k: p.state_dict() for k, p in self.parts.items()},
                     torch_rng=torch.get_rng_state(),
                     cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                     else None)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(self.ckpt, buffer.getvalue())
        self.saved = self.step

    def load(self, check: bool = True) -> None:
        """The checkpoint into the parts; `check`: refuse other arguments (a resume)."""
        try:
            state = torch.load(self.ckpt, map_location="cpu", weights_only=False)
            problem = "" if isinstance(state, dict) and {"parts", "step", "history"} <= \
                state.keys() else "not a checkpoint"
        except Exception as exc:  # truncated or overwritten file: many error types
            problem = type(exc).__name__
        if problem:
            fail(f"{self.ckpt} is damaged ({problem}) and cannot be resumed; checkpoints "
                 "are replaced atomically, so it was damaged after it was written and no "
                 "earlier state is kept; start a new run")
        this, now = Path(__file__).name, arg_values(self.args)
        unchanged = f"nothing was changed; put back this run's own {self.ckpt.name}, or " \
                    "start a new run"
        if state.get("script", this) != this:
            fail(f"{self.ckpt} was written by {state['script']}, not {this}: it belongs to "
                 f"another run; {unchanged}")
        detail = arg_changes(state.get("args", now), now) if check else ""
        if detail:
            fail(f"{self.ckpt} was made by another run of {this} ({detail}); {unchanged}")
        if check:
            check_length(f"--resume {self.dir}", state.get("args", now), now)
        try:
            for k, part in self.parts.items():
                part.load_state_dict(state["parts"][k])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            fail(f"{self.ckpt} does not fit this run ({type(exc).__name__}): written by "
                 f"another script or version; {unchanged}")
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.history, self.timing = state["step"], state["history"], state["timing"]
        self.saved = self.step

    def init_wandb(self):
        import wandb

        return wandb.init(project=self.args.wandb_project, entity=self.args.wandb_entity,
                          config=config_dict(self.args), name=self.dir.name,
                          dir=str(self.dir), id=wandb_run_id(self.dir.name), resume="allow")


class CompiledStep:
    """--compile / --cudagraphs: `update(batch, switch)`, one whole training update (losses,
    backward, optimizer steps, target update), through torch.compile; Dynamo splits it at
    `backward` into the loss graph (its backward compiled with it) and the optimizer
    graphs. `switch`: a Python value that selects a graph (the BC warm start): a new value
    compiles once more; values that change more often go in as tensors. With `graphed`
    (CUDA), after WARMUP compiled steps on a side stream, the update is recorded once as one
    CUDA graph (capturable Adam) and replayed, the batch copied into its static inputs; the
    metrics it returns are rewritten by the next step (Run.log reads them at once)."""

    WARMUP = 3

    def __init__(self, update: Callable[..., dict[str, torch.Tensor]],
                 optimizers: Iterable[torch.optim.Optimizer], graphed: bool):
        self.update, self.optimizers = torch.compile(update), list(optimizers)
        self.graphed, self.graph, self.switch, self.warm = graphed, None, None, 0
        self.static_batch: dict[str, torch.Tensor] = {}
        self.static_metrics: dict[str, torch.Tensor] = {}

    def __call__(self, batch: dict[str, torch.Tensor], switch: Any = None
                 ) -> dict[str, torch.Tensor]:
        if switch != self.switch:  # a new graph: compile (and capture) anew
            self.switch, self.warm, self.graph = switch, 0, None
        if not self.graphed:
            return self.zero_grad_and_update(batch)
        if self.warm < self.WARMUP:  # compile, and CUDA's lazy init, off the capture
            self.warm += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                metrics = self.zero_grad_and_update(batch)
            torch.cuda.current_stream().wait_stream(side)
            return metrics
        if self.graph is None:  # record (nothing runs); grads None: backward allocates them
            self.static_batch = {k: v.clone() for k, v in batch.items()}  # in graph memory
            self.graph = torch.cuda.CUDAGraph()
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(self.graph):
                self.static_metrics = self.update(self.static_batch, self.switch)
        for k, v in batch.items():
            self.static_batch[k].copy_(v)
        self.graph.replay()  # each replay overwrites the grads: no zero_grad
        return self.static_metrics

    def zero_grad_and_update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return self.update(batch, self.switch)


# ---- after training: --evaluate, --export-policy, --push-to-hub RUN_DIR -------------------
AFTER_USAGE = ("after training: --evaluate RUN_DIR|hf://REPO_ID [--seed S] [--eval-episodes N] "
               "[--device D] [--capture-video]; --export-policy RUN_DIR; --push-to-hub REPO_ID "
               "RUN_DIR [--hub-folder DIR]")
AFTER_FLAGS = ("--evaluate", "--export-policy", "--push-to-hub")
POLICY_FILE = "policy.pt2"  # torch.export: torch.export.load(path).module()(obs) -> action
HUB_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", POLICY_FILE)


def after_training_args(argv: list[str]) -> argparse.Namespace | None:
    """The after-training command of argv (None: argv trains)."""
    if not any(word.split("=")[0] in AFTER_FLAGS for word in argv):
        return None
    p = argparse.ArgumentParser(prog=Path(__file__).name, add_help=False)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--evaluate", metavar="RUN_DIR")
    what.add_argument("--export-policy", metavar="RUN_DIR")
    what.add_argument("--push-to-hub", nargs=2, metavar=("REPO_ID", "RUN_DIR"))
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-episodes", type=int)
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--capture-video", action="store_true")
    p.add_argument("--hub-folder", type=Path)
    p.error = lambda message: fail(f"{message}; {AFTER_USAGE}")  # one line, not argparse's two
    return p.parse_args(argv)


def run_config(run_dir: Path) -> dict[str, Any]:
    """config.json of a run of this script with a checkpoint, or a one-line error."""
    if not ((run_dir / "config.json").is_file() and (run_dir / "checkpoint.pt").is_file()):
        fail(f"{run_dir} is not a run directory (no config.json and checkpoint.pt); pass the "
             "--run-dir of a run that wrote its first checkpoint")
    config, this = read_config(run_dir / "config.json"), Path(__file__).name
    if config.get("script", this) != this:
        fail(f"{run_dir} is a run of {config['script']}, not of {this}; use python "
             f"{config['script']} with the same flags")
    return config


def saved_args(config: dict[str, Any], run_dir: Path, **changes: Any) -> Args:
    """The run's Args from config.json, for a run that only evaluates (nothing compiled,
    tracked or resumed), with `changes` (None: keep the run's)."""
    from dataclasses import fields

    defaults = {f.name: getattr(Args, f.name, None) for f in fields(Args)}
    # JSON has no inf: json_safe wrote None where the default is +-inf (the clip bounds)
    unsaved = lambda k, v: v is None and isinstance(defaults[k], float) and not math.isfinite(
        defaults[k])
    values = {k: defaults[k] if unsaved(k, v) else tuple(v) if isinstance(v, list) else v
              for k, v in config["args"].items() if k in defaults}
    quiet = dict(resume=None, run_dir=str(run_dir), track=False, progress=False,
                 compile=False, cudagraphs=False)
    return replace(Args(**values), **quiet, **{k: v for k, v in changes.items() if v is not None})


def hub_download(source: str) -> Path:
    """hf://REPO_ID -> a local copy of the repo (runs/hf/REPO_ID), a run directory."""
    repo_id = source.removeprefix("hf://")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        fail("hf:// runs need the package huggingface_hub (pip install huggingface_hub)")
    local = Path("runs") / "hf" / repo_id
    try:
        snapshot_download(repo_id, local_dir=local)
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: many error types
        fail(f"could not download {repo_id} from the Hugging Face Hub ({type(exc).__name__}: "
             f"{str(exc).splitlines()[0] if str(exc) else ''}); check the id and the network")
    return local


def after_training(ns: argparse.Namespace) -> None:
    """Run the after-training command: evaluate, export the policy, or push to the Hub."""
    if ns.push_to_hub:
        push_to_hub(ns.push_to_hub[0], Path(ns.push_to_hub[1]), ns.hub_folder)
        return
    source = ns.evaluate or ns.export_policy
    run_dir = hub_download(source) if source.startswith("hf://") else Path(source)
    config = run_config(run_dir)
    Run.after = dict(kind="evaluate" if ns.evaluate else "export", video=ns.capture_video)
    try:
        main(saved_args(config, run_dir, seed=ns.seed, eval_episodes=ns.eval_episodes,
                        device=ns.device, capture_video=ns.capture_video or None))
    finally:
        Run.after = None  # the next main() in this process trains


def evaluation_name(args: Args, step: int) -> str:
    return f"step{step}-seed{args.seed}-episodes{args.eval_episodes}"


class VideoRecorder(gym.Wrapper):
    """Every episode of env to folder/<prefix>-episode-<k>.mp4, k = 0, 1, ... by reset: the
    reset frame and one frame per step (steps + 1 frames), H.264 at the env's render_fps
    (default 30) through imageio's ffmpeg writer, streamed as the episode runs. An episode's
    file is complete at its termination or truncation, the next reset, or close."""

    def __init__(self, env: gym.Env, folder: Path, prefix: str):
        super().__init__(env)
        self.folder, self.prefix, self.episode, self.writer = folder, prefix, -1, None

    def reset(self, **kwargs):
        self.stop()
        out = self.env.reset(**kwargs)
        self.episode += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = imageio_writer(self.folder / f"{self.prefix}-episode-{self.episode}.mp4",
                                     self.metadata.get("render_fps") or 30)
        self.writer.append_data(self.env.render())
        return out

    def step(self, action):
        out = self.env.step(action)
        if self.writer is not None:  # after the episode's end: no frames until the reset
            self.writer.append_data(self.env.render())
            if out[2] or out[3]:  # terminated, truncated
                self.stop()
        return out

    def stop(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def close(self) -> None:
        self.stop()
        super().close()


def imageio_writer(path: Path, fps: float):
    """imageio's ffmpeg writer (the binary comes with imageio-ffmpeg); macro block 2: frames
    keep their size (an odd side is scaled up by one pixel, as H.264's yuv420p needs)."""
    import imageio.v2 as imageio

    return imageio.get_writer(path, format="FFMPEG", fps=fps, macro_block_size=2)


def record_video(env: gym.Env, folder: Path, prefix: str) -> gym.Env:
    """Every episode of env to folder/<prefix>-episode-<k>.mp4 (VideoRecorder)."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame (classic control): no display
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    if env.render_mode != "rgb_array":
        fail(f"the evaluation env {env.spec.id if env.spec else env} renders no frames "
             f"(render_mode {env.render_mode!r}); --capture-video needs rgb_array rendering")
    try:
        import imageio  # noqa: F401 - now, not at the first frame
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()  # the bundled binary (or IMAGEIO_FFMPEG_EXE)
    except (ImportError, RuntimeError) as exc:
        fail(f"--capture-video needs imageio and imageio-ffmpeg ({type(exc).__name__}: "
             f"{str(exc).splitlines()[0] if str(exc) else ''}); pip install -r requirements.txt")
    try:
        env.reset(seed=0)
        env.render()  # now, not in the middle of the evaluation (evaluate reseeds its resets)
    except gym.error.DependencyNotInstalled as exc:
        fail(f"--capture-video: {exc}")
    except Exception as exc:  # noqa: BLE001 - OpenGL back ends fail in many ways
        fail(f"--capture-video: the evaluation env cannot render ({type(exc).__name__}: "
             f"{str(exc).splitlines()[0] if str(exc) else ''}); MuJoCo without a display needs "
             "MUJOCO_GL=egl (libEGL) or MUJOCO_GL=osmesa (libOSMesa)")
    return VideoRecorder(env, folder, prefix)


def export_policy(policy: nn.Module, path: Path) -> Path:
    """The deterministic policy, observation in and env action out, as a torch.export file
    that needs neither this script nor its classes (only torch)."""
    example = policy.example_input()
    batch = torch.export.Dim("batch")
    program = torch.export.export(policy.eval().requires_grad_(False), (example,),
                                  dynamic_shapes=({0: batch},))  # actions, no autograd graph
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write(path, buffer.getvalue())
    return path


def model_card(run_dir: Path, config: dict[str, Any], summary: dict[str, Any],
               repo_id: str) -> str:
    """The Hub README: metadata (library, tags, the Minari dataset, a model-index entry with
    the score), the command that made the run, machine, versions and the curve."""
    args, dataset = config["args"], config.get("dataset", {})
    data_id = dataset.get("dataset_id") or dataset.get("source") or args.get("dataset_id")
    score_key = next((k for k in ("final_score", "final_return") if summary.get(k) is not None),
                     None)
    score = summary.get(score_key) if score_key else None
    name = Path(__file__).stem
    meta = ["---", "library_name: pytorch", "tags:", "- reinforcement-learning",
            "- offline-reinforcement-learning", f"- {name}", "- minari", "model-index:",
            f"- name: {name}", "  results:", "  - task:", "      type: reinforcement-learning",
            "      name: reinforcement-learning", "    dataset:", f"      name: {data_id}",
            f"      type: {data_id}", "    metrics:",
            f"    - type: {(score_key or 'score').removeprefix('final_')}",
            f"      value: {'null' if score is None else round(float(score), 2)}",
            f"      name: {(score_key or 'score').removeprefix('final_').replace('_', ' ')}",
            "---", ""]
    versions = config.get("versions", {})
    body = [f"# {name} on {data_id}", "",
            f"Trained with `{Path(__file__).name}` (github: cql-calql reference implementations); "
            f"`{repo_id}` holds the run directory as the script wrote it.", "",
            "## Result", "", f"- final {(score_key or 'score').removeprefix('final_')}: "
            f"{score}", f"- value gap: {summary.get('value_gap')} (return units: "
            f"{summary.get('value_gap_return')})",
            f"- wall time: {summary.get('wall_time_s', 0):.0f} s on {config.get('device')}", "",
            "## Reproduce", "", "```bash", config.get("command") or "(command not recorded)",
            f"python {Path(__file__).name} --evaluate hf://{repo_id}", "```", "",
            f"git commit: {config.get('git_commit')}", "",
            "## Versions", "", *(f"- {k} {v}" for k, v in versions.items()), "",
            "## Use the policy without the script", "", "```python", "import torch",
            f"policy = torch.export.load(\"{POLICY_FILE}\").module()",
            "action = policy(torch.as_tensor(obs, dtype=torch.float32)[None])[0]", "```", "",
            "![learning curve](curve.png)", ""]
    return "\n".join(meta + body)


def curve_png(rows: list[dict[str, Any]], path: Path) -> None:
    """The evaluation curve of metrics.jsonl (score or return by step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = next((k for k in ("score", "return_mean")
                if any(r.get(k) is not None for r in rows)), "return_mean")
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in rows], [r.get(key) for r in rows], marker=".")
    ax.set_xlabel("gradient steps")
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def hub_folder(run_dir: Path, repo_id: str, folder: Path) -> Path:
    """What --push-to-hub uploads: the run files, the policy, videos, curve and model card."""
    import shutil

    config = run_config(run_dir)
    if not (run_dir / "summary.json").is_file():
        fail(f"{run_dir} has no summary.json: the run has not finished; finish it with "
             f"--resume {run_dir} first")
    if not (run_dir / POLICY_FILE).is_file():
        after_training(argparse.Namespace(push_to_hub=None, evaluate=None,
                                          export_policy=str(run_dir), capture_video=False,
                                          seed=None, eval_episodes=None, device="cpu"))
    folder.mkdir(parents=True, exist_ok=True)
    for name in HUB_FILES:
        shutil.copy2(run_dir / name, folder / name)
    for sub in ("videos", "evaluations"):
        if (run_dir / sub).is_dir():
            shutil.copytree(run_dir / sub, folder / sub, dirs_exist_ok=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    curve_png(rows, folder / "curve.png")
    summary = json.loads((run_dir / "summary.json").read_text())
    (folder / "README.md").write_text(model_card(run_dir, config, summary, repo_id))
    return folder


def push_to_hub(repo_id: str, run_dir: Path, folder: Path | None) -> None:
    """Upload a finished run (hub_folder) to the Hugging Face Hub; with --hub-folder only
    write the folder."""
    import tempfile

    if folder is not None:
        hub_folder(run_dir, repo_id, folder)
        print(f"wrote {folder} (not uploaded; without --hub-folder it goes to {repo_id})",
              file=sys.stderr)
        return
    try:
        from huggingface_hub import HfApi
    except ImportError:
        fail("--push-to-hub needs the package huggingface_hub (pip install huggingface_hub)")
    with tempfile.TemporaryDirectory() as tmp:
        hub_folder(run_dir, repo_id, Path(tmp))
        try:
            api = HfApi()
            api.create_repo(repo_id, exist_ok=True)
            api.upload_folder(folder_path=tmp, repo_id=repo_id,
                              commit_message=f"{Path(__file__).name} run {run_dir.name}")
        except Exception as exc:  # noqa: BLE001 - network, auth: many error types
            fail(f"could not upload to {repo_id} ({type(exc).__name__}: "
                 f"{str(exc).splitlines()[0] if str(exc) else ''}); log in with `hf auth "
                 "login` (or set HF_TOKEN) and check the network")
    print(f"pushed {run_dir} to https://huggingface.co/{repo_id}", file=sys.stderr)


def progress_bar(args: Args, done: int, total: int, desc: str) -> tqdm:
    """A main loop's progress bar at `done` of `total` (none with --no-progress or when
    nothing is left); advance() moves it."""
    return tqdm(total=total, initial=done, desc=desc, dynamic_ncols=True,
                disable=not args.progress or done >= total)


def advance(bar: tqdm, n: int, last: bool) -> None:
    """The bar `n` steps on; at the last step it closes without drawing first (closing
    draws it), so that its last line prints once, above the last evaluation's row."""
    if last:
        bar.n += n
        bar.close()
    else:
        bar.update(n)


def render_mode(args: Args) -> str | None:
    """The evaluation env's render mode: frames for --capture-video only."""
    return "rgb_array" if args.capture_video else None


def cli() -> None:
    """The command line: run checks before the data loads; a stop signal before Run takes
    the signals over exits 128+signal with one line (Ctrl-C: 130)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _startup_signal)
    import shlex

    Run.restore_signals = False
    Run.command = shlex.join(["python", Path(sys.argv[0]).name, *sys.argv[1:]])
    try:
        if STARTUP_SIGNALS:  # a Ctrl-C that came while the imports loaded
            _startup_signal(STARTUP_SIGNALS[0], None)
        if (command := after_training_args(sys.argv[1:])) is not None:
            return after_training(command)
        check_switches(sys.argv[1:])
        args = check_run_args(parse_args())
        main(args)
        if args.capture_video:  # the final evaluation again, rendered (the same episodes)
            after_training(argparse.Namespace(push_to_hub=None, export_policy=None, seed=None,
                                              evaluate=str(Run.last_dir), capture_video=True,
                                              eval_episodes=None, device=None))
    except StartupSignal as stop:
        signum = stop.args[0]
        print(f"error: stopped by signal {signum} during start-up, before training began; "
              "nothing was written; run the command again", file=sys.stderr)
        raise SystemExit(128 + signum) from None


if __name__ == "__main__":
    cli()
