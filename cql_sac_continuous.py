"""Conservative Q-Learning (CQL) on top of Soft Actor-Critic, continuous actions, offline.

Kumar, Zhou, Tucker, Levine. "Conservative Q-Learning for Offline Reinforcement Learning."
NeurIPS 2020. https://arxiv.org/abs/2006.04779. Official code: github.com/aviralkumar2907/CQL
(rlkit `cql.py`); points where the Cal-QL code (github.com/nakamotoo/Cal-QL) is followed are
named where they appear. `--env X --help` shows the values that run for X; `--presets` lists
their sources. `diff cql_sac_continuous.py calql_finetune.py` shows what Cal-QL changes.

    python cql_sac_continuous.py --env pendulum-medium          # local dataset (see README)
    python cql_sac_continuous.py --dataset-id mujoco/hopper/expert-v0 --device cuda

- Part I, the algorithm (lines 51-649): Args, networks, losses, the training step, the replay
  buffer, generic evaluation, main.
- Part II, datasets and presets (lines 650-1559): Minari loading, one block per dataset family
  (its data, evaluation env and score), the presets with their sources, argument parsing.
  Copying the file for your own data: delete the family blocks and the presets and pass
  `--dataset-id`; the generic path (any Minari dataset with Box actions) still runs.
- Part III, run plumbing (lines 1560-2635): run directory, checkpoints, resume, signals, W&B.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, NoReturn

STARTUP_SIGNALS: list[int] = []  # Ctrl-C while the imports below load: cli() stops after them
if __name__ == "__main__":  # (an exception raised inside torch's import can abort the process)
    signal.signal(signal.SIGINT, lambda signum, _: STARTUP_SIGNALS.append(signum))

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

# ======================================================================================
# Part I: the algorithm
# ======================================================================================


@dataclass
class Args:
    """CQL-SAC, defaults the CQL paper's, App. F (`--env X --help`: X's values; `--presets`)."""

    env: str = "pendulum-medium"
    """Task name with a preset (see `--presets`), e.g. hopper-medium, antmaze-umaze, pen-human,
    kitchen-mixed, pendulum-expert; with only `--dataset-id`, a name derived from the id."""
    dataset_id: str | None = None
    """Minari dataset id (filled from `--env`); another id keeps the `--env` preset, or, with an
    unknown or no `--env`, takes the preset of its family (mujoco/, D4RL/antmaze/, ...), else
    the defaults (the paper's, for any continuous-action dataset)."""
    seed: int = 0
    """Random seed (networks, sampling, evaluation episodes; Cal-QL: online ones too)."""
    device: str = "auto"
    """Device: auto, cpu or cuda (auto picks CUDA when available)."""
    threads: int | None = None
    """CPU threads of torch; None keeps torch's default."""
    total_steps: int = 1_000_000
    """Number of gradient steps."""
    eval_every: int = 10_000
    """Evaluate (and checkpoint) every this many gradient steps."""
    eval_episodes: int = 10
    """Episodes per evaluation, deterministic policy."""
    batch_size: int = 256
    """Transitions per gradient step."""
    run_dir: str | None = None
    """Run directory; None: runs/<script>__<env>__s<seed>__<time> (script: this file's name)."""
    # ---- networks --------------------------------------------------------------------
    actor_hidden_dims: tuple[int, ...] = (256, 256, 256)
    """Actor hidden widths."""
    critic_hidden_dims: tuple[int, ...] = (256, 256, 256)
    """Critic hidden widths (each of the twin critics)."""
    init: Literal["rlkit", "orthogonal", "pytorch"] = "rlkit"
    """Network init: `rlkit` (CQL code), `orthogonal` (Cal-QL code), `pytorch` (its default)."""
    log_std_min: float = -5.0
    """Lower clamp of the actor's log-std (CQL code -5, Cal-QL -20)."""
    log_std_max: float = 2.0
    """Upper clamp of the actor's log-std (both official codes: 2)."""
    mean_clamp: float | None = 9.0
    """Clamp of |mean| in the BC log-likelihood only (CQL code: 9; None, Cal-QL: none)."""
    log_std_affine: bool = False
    """Learnable log-std m * log_std + b (m 1, b -1 at init) before the clamp (Cal-QL model.py)."""

    # ---- SAC -------------------------------------------------------------------------
    gamma: float = 0.99
    """Discount factor."""
    policy_lr: float = 3e-5
    """Actor (and entropy alpha) learning rate."""
    qf_lr: float = 3e-4
    """Critic learning rate."""
    soft_target_update: float = 5e-3
    """Polyak rate of the target critics."""
    target_entropy: float | None = None
    """Entropy target of the automatic temperature; None: -|A| (SAC)."""
    bc_steps: int = 0
    """Behaviour cloning of the actor for the first N (offline) steps (CQL `policy_eval_start`)."""
    backup_entropy: bool = False
    """Keep -alpha*log pi in the Bellman target (off: the official `deterministic_backup=True`)."""
    max_backup: bool = False
    """Max backup over N actions from pi(.|s'), in the form --max-backup-form."""
    max_backup_form: Literal["cql", "calql"] = "cql"
    """`cql`: min over critics of each one's max (rlkit); `calql`: max of the twin-min (Cal-QL)."""

    # ---- CQL -------------------------------------------------------------------------
    cql_weight: float = 5.0
    """Weight w of the conservative penalty (official `min_q_weight`; 0: naive offline SAC)."""
    cql_importance_sample: bool = True
    """Importance-sampled logsumexp, CQL(H) (`min_q_version 3`); --no-...: plain, with Q_data."""
    cql_data_term: bool = True
    """Subtract E_D[Q(s,a)] (Eq. 2/4); --no-cql-data-term gives the Eq. 1 variant (Table 5)."""
    cql_n_actions: int = 10
    """N actions per state from each proposal (uniform, pi(.|s), pi(.|s'))."""
    cql_temp: float = 1.0
    """Temperature T of T*logsumexp(Q/T)."""
    cql_clip_diff_min: float = -math.inf
    """Lower clip of the penalty (pushed-down minus data Q), per critic (Cal-QL code)."""
    cql_clip_diff_max: float = math.inf
    """Upper clip of the penalty, per critic (Cal-QL code)."""
    # ---- Lagrange --------------------------------------------------------------------
    lagrange: bool = False
    """Tune alpha' by dual gradient descent towards a target gap (Eq. 30); see --cql-tau."""
    cql_tau: float = 10.0
    """Threshold tau of the Lagrange form: cql form alpha'*(w*gap - tau) (CQL code) drives the
    gap to tau/w, so the paper's tau (10 gym, 5 Adroit/kitchen) is the target gap only with
    w = 1, the official default with Lagrange (`cql_mujoco_new.py`); calql form
    alpha'*w*(gap - tau) (Cal-QL, CORL) drives the gap to tau whatever w (antmaze: 0.8, w 5)."""
    lagrange_form: Literal["cql", "calql"] = "cql"
    """`cql`: alpha'*(w*gap - tau) (rlkit `cql.py`); `calql`: alpha'*w*(gap - tau) (Cal-QL
    `conservative_sac.py`, CORL `cql.py`). See --cql-tau."""
    log_alpha_prime_init: float = 0.0
    """Initial log alpha' (Lagrange only): rlkit `cql.py` 0.0 (`ptu.zeros(1)`), Cal-QL/CORL 1.0."""
    alpha_prime_lr: float = 3e-4
    """Learning rate of log alpha' (Lagrange only)."""

    # ---- data transforms -------------------------------------------------------------
    reward_mode: Literal["none", "locomotion", "scale_bias"] = "none"
    """`none`; `locomotion`: r*1000/(max_return - min_return); `scale_bias`: r*scale + bias."""
    reward_scale: float = 1.0
    """Rewards become r * scale + bias (CQL-SAC: with --reward-mode scale_bias)."""
    reward_bias: float = 0.0
    """Rewards become r * scale + bias (CQL-SAC: with --reward-mode scale_bias)."""
    normalize_states: bool = False
    """Normalize observations with the dataset mean/std (eps 1e-3), at evaluation too."""

    # ---- logging and run -------------------------------------------------------------
    log_every: int = 1000
    """Read training metrics to the host (the only sync; Cal-QL: offline) every N updates."""
    max_abs_q: float = 1e6
    """Stop the run when |Q| exceeds this (divergence guard), checked when metrics are read."""
    compile: bool = False
    """Compile the whole update (losses, backward, Adam, Polyak) with torch.compile."""
    cudagraphs: bool = False
    """With --compile on CUDA: replay the compiled update as one CUDA graph."""
    tf32: bool = False
    """TF32 matmuls on CUDA (off: float32; speed and loss effect to be measured on a GPU)."""
    resume: str | None = None
    """Resume the run in this directory (same arguments; refused if the config differs)."""
    track: bool = False
    """Log to Weights & Biases."""
    wandb_project: str = "cql-calql"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity."""
    progress: bool = True
    """Show a tqdm progress bar."""
    capture_video: bool = False
    """Render the final evaluation's episodes to RUN_DIR/videos (MuJoCo: MUJOCO_GL=egl)."""


# ---- networks: tanh-Gaussian actor, twin critics fused into one batched ensemble ---------


class EnsembleLinear(nn.Module):
    """E independent linear layers evaluated by one batched matmul: [E, B, in] -> [E, B, out]."""

    def __init__(self, ensemble: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(ensemble, 1, out_features))
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default init, per member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, detach: bool = False) -> torch.Tensor:
        w, b = (self.weight.detach(), self.bias.detach()) if detach else (self.weight, self.bias)
        return torch.baddbmm(b, x, w)


def rlkit_init_(layers: list[nn.Module], last_bound: float, transposed: bool) -> None:
    """rlkit init (rlkit/torch/networks.py L27-31, L49-64; pytorch_util.py fanin_init L17-26):
    hidden weights +-1/sqrt(size[0]) of the [out, in] weight (out_features: rlkit's quirk),
    biases 0.1; last layer +-last_bound (Q 3e-3; policy 1e-3, sac/policies.py L45, L61-63)."""
    for k, layer in enumerate(layers):
        if k == len(layers) - 1:
            nn.init.uniform_(layer.weight, -last_bound, last_bound)
            nn.init.uniform_(layer.bias, -last_bound, last_bound)
        else:
            bound = 1 / math.sqrt(layer.weight.shape[-1 if transposed else 0])
            nn.init.uniform_(layer.weight, -bound, bound)
            nn.init.constant_(layer.bias, 0.1)


def init_(layers: list[nn.Module], init: str, last_bound: float, transposed: bool) -> None:
    """Args.init: rlkit_init_ (CQL code), orthogonal_ (Cal-QL code) or `pytorch` (as built)."""
    if init == "orthogonal":
        orthogonal_(layers, transposed)
    elif init == "rlkit":
        rlkit_init_(layers, last_bound, transposed)


def orthogonal_(layers: list[nn.Module], transposed: bool) -> None:
    """Orthogonal init (Cal-QL code): gain sqrt(2), last layer 1e-2, zero biases. Weights are
    nn.Linear's [out, in] or, `transposed`, EnsembleLinear's [E, in, out] (as nn.init would)."""
    for k, layer in enumerate(layers):
        gain = 1e-2 if k == len(layers) - 1 else math.sqrt(2)
        for mat in (layer.weight.data if transposed else layer.weight.data.T[None]):
            mat.copy_(nn.init.orthogonal_(torch.empty(mat.shape[1], mat.shape[0]), gain).T)
        nn.init.zeros_(layer.bias)


class FusedCritic(nn.Module):
    """Twin Q-networks as ONE ensemble: each layer is one baddbmm for both critics."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...], init: str,
                 ensemble: int = 2):
        super().__init__()
        dims = (obs_dim + action_dim, *hidden, 1)
        self.layers = nn.ModuleList(EnsembleLinear(ensemble, i, o) for i, o in pairwise(dims))
        self.ensemble = ensemble
        init_(list(self.layers), init, 3e-3, transposed=True)  # rlkit Q: init_w 3e-3

    def forward(self, obs: torch.Tensor, action: torch.Tensor,
                detach: bool = False) -> torch.Tensor:
        """obs [..., d], action [..., a] -> Q [E, ...]; detach=True gives no critic gradients."""
        x = torch.cat([obs, action], -1)
        lead = x.shape[:-1]
        h = x.reshape(1, -1, x.shape[-1]).expand(self.ensemble, -1, -1)
        for layer in self.layers[:-1]:
            h = F.relu(layer(h, detach))
        return self.layers[-1](h, detach).reshape(self.ensemble, *lead)


def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int) -> nn.Sequential:
    dims = (in_dim, *hidden, out_dim)
    layers = [m for i, o in pairwise(dims) for m in (nn.Linear(i, o), nn.ReLU())]
    return nn.Sequential(*layers[:-1])  # no ReLU after the output layer


class TanhGaussianActor(nn.Module):
    """pi(a|s) = tanh(N(mu(s), sigma(s))), log-std clamped to `log_std_range`, the mean to
    +-mean_clamp in log_prob (BC) only (rlkit `policies.py` L81; sampling uses the raw mean);
    log_std_affine: log-std = m * log_std + b before the clamp, learnable m, b from 1, -1
    (Cal-QL `model.py`, CORL). rlkit's log(1 - a^2 + 1e-6): ours is the exact form."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...], init: str,
                 log_std_affine: bool = False, log_std_range: tuple[float, float] = (-5.0, 2.0),
                 mean_clamp: float | None = None):
        super().__init__()
        self.net = mlp(obs_dim, hidden, 2 * action_dim)
        # rlkit policy: init_w 1e-3 for the mean and log-std heads (policies.py L45, L61-63)
        init_([m for m in self.net if isinstance(m, nn.Linear)], init, 1e-3, transposed=False)
        self.log_std_affine, self.log_std_range = log_std_affine, log_std_range
        self.mean_clamp = mean_clamp
        if log_std_affine:
            self.log_std_multiplier = nn.Parameter(torch.tensor(1.0))
            self.log_std_offset = nn.Parameter(torch.tensor(-1.0))

    def dist(self, obs: torch.Tensor, clamp_mean: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, -1)
        if clamp_mean and self.mean_clamp is not None:
            mean = mean.clamp(-self.mean_clamp, self.mean_clamp)
        if self.log_std_affine:
            log_std = self.log_std_multiplier * log_std + self.log_std_offset
        return mean, log_std.clamp(*self.log_std_range)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterized sample a ~ pi(.|s) and its log-density (tanh change of variables)."""
        mean, log_std = self.dist(obs)
        u = mean + log_std.exp() * torch.randn_like(mean)
        return torch.tanh(u), tanh_gaussian_log_prob(u, mean, log_std)

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) of a given action in (-1, 1) (behaviour cloning)."""
        mean, log_std = self.dist(obs, clamp_mean=True)
        u = torch.atanh(action.clamp(-1 + 1e-6, 1 - 1e-6))
        return tanh_gaussian_log_prob(u, mean, log_std)

    @torch.no_grad()
    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dist(obs)[0])


def tanh_gaussian_log_prob(u: torch.Tensor, mean: torch.Tensor,
                           log_std: torch.Tensor) -> torch.Tensor:
    """log N(u; mean, std) - sum log(1 - tanh(u)^2), the latter in a stable softplus form."""
    normal = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
    return (normal - log_det).sum(-1)


class Agent(nn.Module):
    """All trainable state: actor, fused twin critics and their target, log alpha, log alpha'."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.action_dim = action_dim
        self.actor = TanhGaussianActor(obs_dim, action_dim, args.actor_hidden_dims, args.init,
                                       args.log_std_affine, (args.log_std_min, args.log_std_max),
                                       args.mean_clamp)
        self.critic = FusedCritic(obs_dim, action_dim, args.critic_hidden_dims, args.init)
        # A copy of the critic, as Cal-QL (`deepcopy`, conservative_sac.py L95); rlkit builds
        # its target networks with their own random init (cql_mujoco_new.py L45-54): deviation.
        self.target_critic = FusedCritic(obs_dim, action_dim, args.critic_hidden_dims, "pytorch")
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.zeros(()))
        # rlkit cql.py starts log alpha' at 0, Cal-QL and CORL at 1.0: --log-alpha-prime-init
        self.log_alpha_prime = nn.Parameter(torch.tensor(float(args.log_alpha_prime_init)))


# ---- losses ------------------------------------------------------------------------------


def cql_logsumexp_is(q_rand: torch.Tensor, q_pi: torch.Tensor, logp_pi: torch.Tensor,
                     q_next_pi: torch.Tensor, logp_next_pi: torch.Tensor, action_dim: int,
                     temp: float = 1.0) -> torch.Tensor:
    """Importance-sampled log sum_a exp Q(s,a), App. F (official `min_q_version 3`).
    q_*: [E, B, N], all scored at the CURRENT state s; logp_*: [B, N] proposal log-densities.
    Each sample's Q has its proposal's log-density subtracted (detached: the penalty never
    trains the actor); uniform density on [-1, 1]^d is 0.5^d. Returns [E, B]. The constant
    log(3N) of a proper mean is omitted, as in the official code (it changes no gradient)."""
    cat = torch.cat([q_rand - action_dim * math.log(0.5), q_pi - logp_pi.detach(),
                     q_next_pi - logp_next_pi.detach()], dim=-1)
    return temp * torch.logsumexp(cat / temp, dim=-1)


def cql_logsumexp_plain(q_rand: torch.Tensor, q_pi: torch.Tensor, q_next_pi: torch.Tensor,
                        q_data: torch.Tensor, temp: float = 1.0) -> torch.Tensor:
    """T * logsumexp(Q/T) over [Q_rand, Q_data, Q_pi(s'), Q_pi(s)], no importance weights
    (official `min_q_version 2`, which the official README calls "CQL(rho)")."""
    cat = torch.cat([q_rand, q_data.unsqueeze(-1), q_next_pi, q_pi], dim=-1)
    return temp * torch.logsumexp(cat / temp, dim=-1)


def cql_penalty(push_down: torch.Tensor, q_data: torch.Tensor, data_term: bool,
                clip_min: float, clip_max: float) -> torch.Tensor:
    """Per-critic gap E_s[push-down] - E_D[Q(s,a)] (Eq. 4); without the data term: Eq. 1."""
    return (push_down - q_data if data_term else push_down).clamp(clip_min, clip_max).mean(-1)


def lagrange_terms(gap: torch.Tensor, log_alpha_prime: torch.Tensor, weight: float, tau: float,
                   form: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 30 dual descent (forms: see Args.cql_tau). Returns (critic penalty [E], alpha' loss,
    alpha'), alpha' = clamp(exp(log alpha'), 0, 1e6). The critic sees alpha' as a constant;
    alpha' sees the gap as a constant and grows while gap > tau."""
    alpha_prime = log_alpha_prime.exp().clamp(0.0, 1e6)
    slack = weight * (gap - tau) if form == "calql" else weight * gap - tau
    alpha_prime_loss = -(alpha_prime * slack.detach()).mean()  # mean over both critics
    return alpha_prime.detach() * slack, alpha_prime_loss, alpha_prime


def bellman_target(agent: Agent, batch: dict[str, torch.Tensor], args: Args,
                   alpha: torch.Tensor) -> torch.Tensor:
    """r + gamma (1 - d) * target value at s' (no gradient). Backups:
    standard: min_j Qbar_j(s', a') - alpha log pi(a'|s');  deterministic: no entropy term
    (official `deterministic_backup`); max over N a' ~ pi(.|s') (max_backup_form): `cql` min_j
    max_a' Qbar_j (rlkit `cql.py` L219-224), `calql` max_a' min_j Qbar_j (Cal-QL L176-186)."""
    with torch.no_grad():
        next_obs = batch["next_obs"]
        if args.max_backup:
            rep = next_obs.unsqueeze(1).expand(-1, args.cql_n_actions, -1)
            a_next, logp_next = agent.actor(rep)  # [B, N, a], [B, N]
            q_all = agent.target_critic(rep, a_next)  # [E, B, N]
            if args.max_backup_form == "cql":  # check_args: no backup_entropy with it
                q_next = q_all.max(-1).values.min(0).values
            else:
                q_next, idx = q_all.min(0).values.max(-1)  # over N
                logp_next = logp_next.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        else:
            a_next, logp_next = agent.actor(next_obs)
            q_next = agent.target_critic(next_obs, a_next).min(0).values
        if args.backup_entropy:
            q_next = q_next - alpha * logp_next
        return batch["rewards"] + args.gamma * (1.0 - batch["dones"]) * q_next


def compute_losses(agent: Agent, batch: dict[str, torch.Tensor], args: Args, bc: bool
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The four losses of one update, summed for ONE backward pass. Each trains only its own
    parameters; what keeps the others out of its gradient:

      loss              trains            kept off the other parameters by
      actor_loss        actor             critic detached (critic(detach=True)), alpha detached
      alpha_loss        log_alpha         log pi detached
      critic_loss       critic            target under no_grad (bellman_target), CQL
        (Bellman + CQL)                   proposals under no_grad and their log pi detached
                                          (cql_term), alpha' detached (lagrange_terms)
      alpha_prime_loss  log_alpha_prime   gap detached (lagrange_terms)
      (none)            target_critic     requires_grad False; Polyak in Trainer.step

    Checked by tests/test_cql_sac_losses.py (test_compute_losses_gradients_are_disjoint: the
    map above; alpha' a constant to the critics) and tests/test_calql_losses.py (the map).
    `bc`: behaviour cloning instead of the SAC actor loss (the first bc_steps updates);
    `cql_weight` (Cal-QL): the phase's CQL weight (Trainer.start_online)."""
    obs, actions = batch["obs"], batch["actions"]
    alpha = agent.log_alpha.exp()  # before this step's update (rlkit steps alpha first, L164)
    # ---- actor: SAC loss, or behaviour cloning for the first bc_steps (official code) ----
    a_pi, logp_pi = agent.actor(obs)
    if bc:
        actor_loss = (alpha.detach() * logp_pi - agent.actor.log_prob(obs, actions)).mean()
    else:
        q_pi = agent.critic(obs, a_pi, detach=True).min(0).values
        actor_loss = (alpha.detach() * logp_pi - q_pi).mean()
    target_entropy = -actions.shape[-1] if args.target_entropy is None else args.target_entropy
    alpha_loss = -(agent.log_alpha * (logp_pi.detach() + target_entropy)).mean()
    # ---- critics: Bellman error (MSE without the 1/2 of Eq. 4, as both official codes) ---
    target = bellman_target(agent, batch, args, alpha.detach())
    q_data = agent.critic(obs, actions)  # [E, B]
    bellman = ((q_data - target) ** 2).mean(-1)  # [E]
    critic_loss = bellman.sum()
    if args.cql_weight > 0 or args.lagrange:
        penalty, alpha_prime_loss, cql_metrics = cql_term(agent, batch, args, q_data)
        critic_loss = critic_loss + penalty.sum()
    else:  # naive offline SAC
        alpha_prime_loss = torch.zeros((), device=obs.device)
        cql_metrics = dict(alpha_prime=alpha_prime_loss)
    total = actor_loss + alpha_loss + critic_loss + alpha_prime_loss
    return total, dict(bellman_loss=bellman.mean(), q_data=q_data.mean(), actor_loss=actor_loss,
                       alpha=alpha.detach(), log_pi=logp_pi.detach().mean(),
                       critic_loss=critic_loss.detach(), **cql_metrics)


def cql_term(agent: Agent, batch: dict[str, torch.Tensor], args: Args, q_data: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Conservative penalty per critic [E], the alpha' loss (0 without Lagrange), metrics."""
    obs, next_obs = batch["obs"], batch["next_obs"]
    (batch_size, action_dim), n = batch["actions"].shape, args.cql_n_actions
    rep_obs = obs.unsqueeze(1).expand(-1, n, -1)  # [B, N, d]
    with torch.no_grad():  # proposal samples: the penalty never trains the actor
        a_rand = torch.rand(batch_size, n, action_dim, device=obs.device) * 2 - 1
        a_cur, logp_cur = agent.actor(rep_obs)
        a_next, logp_next = agent.actor(next_obs.unsqueeze(1).expand(-1, n, -1))
    # One critic call for all 3N actions, every one of them scored at the CURRENT state s.
    q_all = agent.critic(rep_obs.repeat(1, 3, 1), torch.cat([a_rand, a_cur, a_next], 1))
    q_rand, q_cur, q_next = q_all.split(n, dim=-1)  # each [E, B, N]
    if args.cql_importance_sample:
        push_down = cql_logsumexp_is(q_rand, q_cur, logp_cur, q_next, logp_next, action_dim,
                                     args.cql_temp)
    else:
        push_down = cql_logsumexp_plain(q_rand, q_cur, q_next, q_data, args.cql_temp)
    gap = cql_penalty(push_down, q_data, args.cql_data_term, args.cql_clip_diff_min,
                      args.cql_clip_diff_max)
    metrics = dict(cql_gap=gap.detach().mean(), q_ood=push_down.detach().mean())
    if args.lagrange:
        penalty, alpha_prime_loss, alpha_prime = lagrange_terms(
            gap, agent.log_alpha_prime, args.cql_weight, args.cql_tau, args.lagrange_form)
        return penalty, alpha_prime_loss, metrics | dict(alpha_prime=alpha_prime.detach())
    zero = torch.zeros((), device=obs.device)
    return args.cql_weight * gap, zero, metrics | dict(alpha_prime=zero + args.cql_weight)


# ---- training step -----------------------------------------------------------------------


class Trainer:
    """Optimizers and one gradient step with no host sync (the metrics stay on the device until
    Run.log reads them); counts its updates for the behaviour-cloning warm start.
    Cal-QL: `start_online()` sets the fine-tuning phase's CQL weight (--cql-weight-online)."""

    def __init__(self, agent: Agent, args: Args, device: torch.device):
        self.agent, self.args, self.updates = agent, args, 0
        fused = device.type == "cuda"
        if fused:  # --tf32: TF32 matmuls on CUDA; default float32
            torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
        capturable = args.compile and fused  # Adam's step counters on the device (CUDA graph)
        adam = lambda params, lr: torch.optim.Adam(params, lr=lr, fused=fused or None,
                                                   foreach=None if fused else True,
                                                   capturable=capturable)
        self.optimizers = dict(actor=adam(agent.actor.parameters(), args.policy_lr),
                               critic=adam(agent.critic.parameters(), args.qf_lr),
                               alpha=adam([agent.log_alpha], args.policy_lr),
                               alpha_prime=adam([agent.log_alpha_prime], args.alpha_prime_lr))
        self.online = list(agent.critic.parameters())
        self.target = list(agent.target_critic.parameters())
        update = lambda b, bc: sac_update(self, b, bc)
        self.compiled = CompiledStep(update, self.optimizers.values(), args.cudagraphs and fused) \
            if args.compile else None

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bc, self.updates = self.updates < self.args.bc_steps, self.updates + 1
        if self.compiled is not None:  # --compile: this update, compiled (sac_update)
            return self.compiled(batch, bc)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        return sac_update(self, batch, bc)

    def state_dict(self) -> dict[str, Any]:
        return dict(updates=self.updates,
                    optimizers={k: opt.state_dict() for k, opt in self.optimizers.items()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])


# ---- the update: eager in Trainer.step, or compiled (--compile) by CompiledStep (Part III) --


def sac_update(t: Trainer, batch: dict[str, torch.Tensor], bc: bool) -> dict[str, torch.Tensor]:
    """Losses, backward, Adam steps, then Polyak averaging of the target critics."""
    total, metrics = compute_losses(t.agent, batch, t.args, bc)
    total.backward()
    for opt in t.optimizers.values():
        opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(t.target, t.online, t.args.soft_target_update)
    return metrics


# ---- replay buffer -----------------------------------------------------------------------


class ReplayBuffer:
    """The whole dataset as tensors on the training device; uniform sampling on the device."""

    def __init__(self, data: dict[str, np.ndarray], device: torch.device, seed: int):
        self.data = {k: torch.as_tensor(v, device=device) for k, v in data.items()}
        self.size = len(self.data["obs"])
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, self.size, (batch_size,), device=self.data["obs"].device,
                            generator=self.generator)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict[str, Any]:
        return dict(generator=self.generator.get_state())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


# ---- evaluation (Cal-QL: and online episodes, the same env and transform) ----------------


def evaluate(agent: Agent, env: gym.Env, tf: Transform, args: Args, info: dict[str, Any],
             device: torch.device, gap: dict[str, Any]) -> dict[str, float | None]:
    """Deterministic policy for `eval_episodes` episodes, seeds fixed (independent of history),
    one rollout each (`gap`: config.json's eval_env["value_gap"]), stepped by env_step (Cal-QL:
    binary episodes end at success). Scored over the first `score_max_steps` steps (the
    horizon): score is the family's (info["score_definition"], Part II), success_rate the
    share with a success (None: none reported), return_mean the raw return unless replaced.
    value_gap (paper Table 4): min over twins of Q(s0, pi(s0)) minus the discounted return
    (rewards as trained) of the whole rollout, to a true termination or `rollout_max_steps`
    (a time limit is no end: training bootstraps through it); < 0: conservative; over the
    reward scale: value_gap_return. Its mean length: value_gap_steps; the mean bound on the
    return left out: value_gap_tail_bound."""
    score_steps, rollout_steps = (gap[k] or math.inf for k in ("score_max_steps",
                                                                "rollout_max_steps"))
    episodes, has_success = [], False
    for i in range(args.eval_episodes):
        obs, _ = env.reset(seed=10_000 * (args.seed + 1) + i)
        end, ep_return, disc_return, discount, t, success, score_info = (
            False, 0.0, 0.0, 1.0, 0, False, {})
        while not end:
            x = torch.as_tensor(tf.obs(flatten_obs(obs)), device=device).reshape(1, -1)
            action = agent.actor.act_deterministic(x)
            if t == 0:
                with torch.no_grad():
                    pred = agent.critic(x, action).min(0).values.item()
            obs, reward, terminated, truncated, step_info = env_step(
                env, tf.to_env_action(action[0].cpu().numpy()), args)
            if t < score_steps:
                ep_return += float(reward)
                has_success = has_success or "success" in step_info
                success = success or bool(step_info.get("success", False))
            disc_return += discount * float(tf.reward(float(reward)))
            discount, t = discount * args.gamma, t + 1
            end = terminated or truncated or t >= rollout_steps
            if t == score_steps or end and t < score_steps:  # the last scored step's info,
                score_info = copy.deepcopy(step_info)  # copied: envs may grow its lists later
        tail = 0.0 if terminated else gap_tail_bound(args.gamma, t, gap["reward_abs_max"])
        episodes.append((ep_return, pred, pred - disc_return, success, min(t, score_steps), t,
                         tail, score_info))
    returns, preds, gaps, successes, lengths, steps = (np.array(x, np.float64) for x in zip(
        *(e[:6] for e in episodes), strict=True))
    tails, rate = [e[6] for e in episodes], float(np.mean(successes)) if has_success else None
    score, extra = family_of(info.get("family")).score(info, returns, rate,
                                                       [e[7] for e in episodes])
    return dict(return_mean=float(np.mean(returns)), return_std=float(np.std(returns)),
                score=score, success_rate=rate, episode_length=float(np.mean(lengths)),
                value_gap=float(np.mean(gaps)),
                value_gap_return=float(np.mean(gaps)) / (tf.reward_scale or math.nan),
                value_gap_steps=float(np.mean(steps)),
                value_gap_tail_bound=None if None in tails else float(np.mean(tails)),
                q_pred_s0=float(np.mean(preds))) | extra


# ---- main loop ---------------------------------------------------------------------------


def main(args: Args) -> dict[str, Any]:
    """Train with a complete Args (parse_args, or preset_args plus replace)."""
    check_args(args)
    device = pick_device(args.device)
    args = replace(args, run_dir=args.resume or args.run_dir or default_run_dir(args))
    torch.manual_seed(args.seed)  # all training randomness is torch's; envs are seeded
    data = load_data(args)
    buffer = ReplayBuffer(data.transitions, device, args.seed)
    agent = Agent(data.info["obs_dim"], data.info["action_dim"], args).to(device)
    trainer = Trainer(agent, args, device)
    spec = dict(data.eval_env, value_gap=value_gap_spec(
        args.gamma, data.eval_env["max_episode_steps"], data.transitions["rewards"]))
    env = make_eval_env(spec, spec["value_gap"]["rollout_max_steps"], render_mode(args))
    run = Run(args, dict(agent=agent, trainer=trainer, buffer=buffer), data.info, spec, device)
    env = run.recorded(env)  # --capture-video (Part III)
    evaluation = lambda: evaluate(agent, env, data.tf, args, data.info, device, spec["value_gap"])
    if run.after:  # --evaluate / --export-policy RUN_DIR (Part III)
        return run.after_training(evaluation, lambda: EnvPolicy(agent.actor, data.tf))
    bar = progress_bar(args, run.step, args.total_steps, f"CQL {args.env}")
    for step in range(run.step + 1, args.total_steps + 1):
        metrics = trainer.step(buffer.sample(args.batch_size))
        advance(bar, 1, last=step == args.total_steps)
        if run.due(step, args.log_every, args.eval_every, last=args.total_steps):
            run.log(step, metrics)
        if run.due(step, args.eval_every, last=args.total_steps):
            run.evaluate_and_checkpoint(step, evaluation)
        run.stop_if_signalled(step)
    env.close()
    return run.finish(final_summary(run.history, data.info, args))


# ======================================================================================
# Part II: datasets and presets
# ======================================================================================


# ---- the value gap's rollout: long enough that the return left out is < 1% of its scale ---
GAP_TAIL = 0.01  # issue 17 item 3: the neglected tail below 1% of the return scale


def gap_horizon(gamma: float) -> int | None:
    """The fewest steps T with gamma^T <= GAP_TAIL, so that the return after T steps, at most
    gamma^T r_max / (1 - gamma), is below GAP_TAIL of the return scale r_max / (1 - gamma):
    0.99 -> 459; gamma 0 -> 1; gamma 1 -> None (no finite horizon)."""
    if gamma >= 1.0:
        return None
    return 1 if gamma <= 0.0 else math.ceil(math.log(GAP_TAIL) / math.log(gamma))


def gap_tail_bound(gamma: float, steps: int, reward_abs_max: float) -> float | None:
    """Bound on |sum_{t >= steps} gamma^t r_t| for |r_t| <= r_max, the return a rollout cut at
    `steps` leaves out: gamma^steps r_max / (1 - gamma); None: unbounded."""
    if reward_abs_max == 0.0:
        return 0.0
    return None if gamma >= 1.0 else gamma**steps * reward_abs_max / (1.0 - gamma)


def value_gap_spec(gamma: float, score_steps: int | None, rewards: np.ndarray
                   ) -> dict[str, Any]:
    """config.json's eval_env["value_gap"]: an evaluation episode is one rollout of
    max(score_steps, gap_horizon) steps or to a true termination, scored over its first
    score_steps; r_max = max |r| of the rewards as trained bounds the tail left out."""
    horizon, r_max = gap_horizon(gamma), float(np.abs(rewards).max(initial=0.0))
    rollout = None if score_steps is None else max(score_steps, horizon or 0)
    return dict(
        horizon=horizon, rule=f"ceil(log({GAP_TAIL}) / log(gamma))", tail_fraction=GAP_TAIL,
        score_max_steps=score_steps, rollout_max_steps=rollout,
        runs_past_time_limit=rollout is not None and rollout > score_steps, reward_abs_max=r_max,
        tail_bound=None if rollout is None else gap_tail_bound(gamma, rollout, r_max),
        note="no time limit: rollouts end where the env ends them" if rollout is None else
        "an env's own truncation before rollout_max_steps: see value_gap_tail_bound in metrics")


# ---- Minari loading: episodes to transitions (+ MC returns), transforms, the eval env -----


def load_minari_dataset(dataset_id: str):
    """Load a Minari dataset: local copy first, else download (needs network)."""
    try:
        import minari
    except ImportError:
        fail("loading a Minari dataset needs the package minari (pip install minari)")
    check_datasets_root()
    with contextlib.suppress(FileNotFoundError):
        return minari.load_dataset(dataset_id)
    known = sorted({ds for ds, _ in ENVS.values()})  # the ids the presets name
    if dataset_id.startswith("local/"):  # built by this project, never downloaded
        fail(missing_dataset(dataset_id, known))
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as exc:  # network errors come in many types
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


def flatten_obs(obs: Any) -> np.ndarray:
    """Flatten (possibly nested dict) observations to float32 [..., d], keys sorted: the dataset
    (time axis) and the evaluation env use this one function, so their feature orders agree."""
    if isinstance(obs, dict):
        return np.concatenate([flatten_obs(obs[k]) for k in sorted(obs)], axis=-1)
    return np.asarray(obs, dtype=np.float32)


def check_finite(data: dict[str, np.ndarray], dataset_id: str) -> None:
    """Refuse NaN/inf in the data, naming the field."""
    for key in ("obs", "next_obs", "actions", "rewards"):
        bad = int((~np.isfinite(data[key])).sum())
        if bad:
            fail(f"dataset {dataset_id} has {bad} non-finite values in '{key}'; clean or filter "
                 "those episodes before training")


def stepped_episodes(episodes, dataset_id: str):
    """The episodes with at least one step (a zero-step episode has no transition: skipped);
    an error if none remains."""
    kept = 0
    for ep in episodes:
        if len(ep.actions):
            kept += 1
            yield ep
    if not kept:
        fail(f"dataset {dataset_id} has no episode with at least one step; rebuild it or pick "
             "another dataset")


def check_actions(actions: np.ndarray, space: gym.spaces.Box, dataset_id: str) -> None:
    """Actions are rescaled from the Box bounds to [-1, 1]: the bounds must be finite and hold
    every dataset action (else it would be clipped without a word)."""
    low, high = space.low.astype(np.float32), space.high.astype(np.float32)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        fail(f"dataset {dataset_id}: its action space {space} has bounds that are not finite "
             f"(low {low.tolist()}, high {high.tolist()}); this script needs a bounded Box: "
             "rebuild the dataset with finite bounds")
    slack = 1e-5 * np.maximum(high - low, 1.0)  # float rounding of stored actions is no error
    if bad := int(((actions < low - slack) | (actions > high + slack)).any(axis=1).sum()):
        fail(f"dataset {dataset_id}: {bad} of {len(actions)} actions are outside the action "
             f"space's bounds (low {low.tolist()}, high {high.tolist()}); clip or drop them, or "
             "rebuild the dataset with the right bounds")


@dataclass
class Transform:
    """Everything applied to data that must be applied identically to env steps (evaluation,
    online episodes)."""

    obs_mean: np.ndarray
    obs_std: np.ndarray
    action_scale: np.ndarray
    action_bias: np.ndarray
    reward_scale: float
    reward_bias: float

    def obs(self, obs: np.ndarray) -> np.ndarray:
        return ((obs - self.obs_mean) / self.obs_std).astype(np.float32)

    def reward(self, reward: np.ndarray | float) -> np.ndarray | float:
        return reward * self.reward_scale + self.reward_bias

    def to_env_action(self, action: np.ndarray) -> np.ndarray:
        """Actor output in [-1, 1]^d -> env action in [low, high]."""
        return action * self.action_scale + self.action_bias

    def from_env_action(self, action: np.ndarray) -> np.ndarray:
        """Env action in [low, high] -> [-1, 1]^d, float32 (the dataset's actions)."""
        return np.clip((action - self.action_bias) / self.action_scale, -1.0, 1.0).astype(
            np.float32)


class EnvPolicy(nn.Module):
    """The deterministic policy as the env sees it (--export-policy): raw observations
    (B, obs_dim) in, env actions (B, action_dim) out, the Transform applied as in evaluate."""

    def __init__(self, actor: TanhGaussianActor, tf: Transform):
        super().__init__()
        self.actor = copy.deepcopy(actor).cpu()
        for name in ("obs_mean", "obs_std", "action_scale", "action_bias"):
            self.register_buffer(name, torch.as_tensor(getattr(tf, name), dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = (obs - self.obs_mean) / self.obs_std
        return torch.tanh(self.actor.dist(x)[0]) * self.action_scale + self.action_bias

    def example_input(self) -> torch.Tensor:
        return self.obs_mean.expand(2, -1).clone()


def d4rl_adroit_horizon(env_id: str) -> int | None:
    """D4RL's horizon of an Adroit env, which D4RL's reference scores are measured on: 100
    steps for pen, 200 for door, relocate and hammer (d4rl/hand_manipulation_suite/
    __init__.py). Minari's spec says 200 for every task (pen was 100 until Minari #286; pen
    episodes are 100-200 steps, #303). None: not an Adroit env."""
    if not env_id.startswith("AdroitHand"):
        return None
    return 100 if "Pen" in env_id else 200


def make_eval_env(spec: dict[str, Any], max_episode_steps: int | None = None,
                  render_mode: str | None = None, dataset_id: str | None = None) -> gym.Env:
    """The env of an eval_env spec (config.json's `eval_env`; online episodes use it too):
    built from its recorded entry point where it has one, else by its registered id, with the
    spec's time limit or `max_episode_steps` (evaluation: the value gap's longer rollout)."""
    register_robotics_envs(spec["id"])
    kwargs, steps = copy.deepcopy(spec["kwargs"]), max_episode_steps or spec["max_episode_steps"]
    frames = {"render_mode": render_mode} if render_mode else {}  # envs without the argument
    try:
        if spec.get("entry_point"):
            return gym.make(gym.envs.registration.EnvSpec(
                id=spec["id"], entry_point=spec["entry_point"], max_episode_steps=steps,
                kwargs=kwargs), **frames)
        return gym.make(spec["id"], max_episode_steps=steps, **frames, **kwargs)
    except Exception as exc:  # noqa: BLE001 - unregistered id, missing entry-point module, ...
        what = (f"the package with the module {exc.name}" if isinstance(exc, ModuleNotFoundError)
                else "the package that registers it")
        fail(f"{f'dataset {dataset_id}: ' if dataset_id else ''}cannot build the evaluation env "
             f"{spec['id']} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
             f"install {what} (Adroit, AntMaze, Kitchen and PointMaze envs: pip install "
             "gymnasium-robotics)")


def register_robotics_envs(env_id: str) -> None:
    """Register gymnasium-robotics' envs (Adroit, AntMaze, Kitchen, PointMaze) for an env id
    gymnasium does not know, when it is installed; the generic path does not need it. Its
    import-time notice (the Door/Hammer/Relocate v1 reward change, Gymnasium-Robotics #220)
    is shown only for those envs."""
    if env_id in gym.registry:
        return
    notice = io.StringIO()
    with contextlib.suppress(ImportError), contextlib.redirect_stderr(notice):
        import gymnasium_robotics
        gym.register_envs(gymnasium_robotics)
    concerned = env_id.startswith(("AdroitHandDoor", "AdroitHandHammer", "AdroitHandRelocate"))
    if concerned and notice.getvalue().strip():
        print(notice.getvalue().strip(), file=sys.stderr)


def episode_to_transitions(observations: Any, actions: np.ndarray, rewards: np.ndarray,
                           terminations: np.ndarray, truncations: np.ndarray) -> dict[str, Any]:
    """One episode (T+1 observations, T steps) -> T transitions, `next_obs[t] = obs[t+1]`; `done`
    is termination only: a truncation (time limit) is not terminal, its target bootstraps."""
    obs = flatten_obs(observations)
    if obs.ndim == 1:
        obs = obs[:, None]
    steps = len(actions)
    if len(obs) != steps + 1:
        fail(f"episode has {len(obs)} observations for {steps} actions (expected T+1)")
    return dict(obs=obs[:-1], next_obs=obs[1:],
                actions=np.asarray(actions, np.float32).reshape(steps, -1),
                rewards=np.asarray(rewards, np.float32).reshape(steps),
                dones=np.asarray(terminations, np.float32).reshape(steps),
                timeouts=np.asarray(truncations, np.float32).reshape(steps))


def episodes_to_transitions(episodes) -> dict[str, np.ndarray]:
    """Concatenate the transitions of Minari episodes (objects with the EpisodeData fields)."""
    parts = [episode_to_transitions(ep.observations, ep.actions, ep.rewards, ep.terminations,
                                    ep.truncations) for ep in episodes]
    if not parts:
        fail("the dataset has no episodes")
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    # per episode, for the locomotion reward scale
    data["episode_returns"] = np.array([p["rewards"].sum() for p in parts], np.float64)
    return data


def reward_scale_bias(data: dict[str, np.ndarray], args: Args) -> tuple[float, float]:
    """The rewards' r * scale + bias (make_transform), by --reward-mode."""
    if args.reward_mode == "none":
        return 1.0, 0.0
    if args.reward_mode == "locomotion":  # CORL / IQL: r * 1000 / (max_ret - min_ret)
        spread = float(data["episode_returns"].max() - data["episode_returns"].min())
        return 1000.0 / max(spread, 1e-6), 0.0
    return float(args.reward_scale), float(args.reward_bias)


def make_transform(data: dict[str, np.ndarray], action_space: gym.spaces.Box,
                   args: Args) -> Transform:
    """Observation statistics, action rescaling and reward scale/bias from the dataset."""
    dim = data["obs"].shape[1]
    mean, std = np.zeros(dim, np.float32), np.ones(dim, np.float32)
    if args.normalize_states:
        mean, std = data["obs"].mean(0), data["obs"].std(0) + 1e-3
    low, high = action_space.low.astype(np.float32), action_space.high.astype(np.float32)
    return Transform(mean.astype(np.float32), std.astype(np.float32), (high - low) / 2,
                     (high + low) / 2, *reward_scale_bias(data, args))


def apply_transform(data: dict[str, np.ndarray], tf: Transform) -> dict[str, np.ndarray]:
    """Normalized observations, actions in [-1, 1], scaled rewards: what the networks see."""
    return dict(obs=tf.obs(data["obs"]), next_obs=tf.obs(data["next_obs"]),
                actions=tf.from_env_action(data["actions"]),
                rewards=np.asarray(tf.reward(data["rewards"]), np.float32),
                dones=data["dones"])


def spec_dict(spec: gym.envs.registration.EnvSpec) -> dict[str, Any]:
    """What config.json records as `eval_env`: id, horizon, kwargs (maze_map included) and the
    entry point make_eval_env builds it from, as plain JSON (tuples -> lists, numpy -> Python)."""
    entry_point = spec.entry_point and str(spec.entry_point)
    return json.loads(json.dumps(dict(id=spec.id, max_episode_steps=spec.max_episode_steps,
                                      kwargs=spec.kwargs, entry_point=entry_point),
                                 default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def scoring(meta: dict[str, Any], family: str | None, dataset_id: str) -> dict[str, Any]:
    """How `score` is computed for this dataset (`score_definition`), with its source."""
    return family_of(family).scoring(meta, dataset_id)


def eval_env_spec(dataset, family: str | None) -> gym.envs.registration.EnvSpec:
    """The env evaluation runs in: the dataset's eval env spec (else its env spec), as the
    family changes it."""
    if dataset.env_spec is None:
        fail(f"dataset {dataset.storage.metadata.get('dataset_id')} records no environment "
             "(env_spec) to evaluate in; recreate it from an env")
    register_robotics_envs(dataset.env_spec.id)
    text = dataset.storage.metadata.get("eval_env_spec")
    eval_spec = gym.envs.registration.EnvSpec.from_json(text) if text else None
    return family_of(family).eval_spec(dataset.env_spec, eval_spec)


@dataclass
class Data:
    """What training and evaluation take from a dataset."""

    transitions: dict[str, np.ndarray]  # obs, next_obs, actions, rewards, dones (+ mc_returns)
    tf: Transform  # applied identically at evaluation (Cal-QL: and to online steps)
    info: dict[str, Any]  # dataset facts and how it is scored (config.json "dataset")
    eval_env: dict[str, Any]  # JSON spec of the evaluation env (config.json "eval_env")


def load_data(args: Args) -> Data:
    """Dataset id -> transitions as the networks see them, their transform, facts, eval env."""
    dataset = load_minari_dataset(args.dataset_id)
    if not isinstance(dataset.action_space, gym.spaces.Box):
        fail(f"dataset {args.dataset_id} has a {type(dataset.action_space).__name__} action "
             "space; this script needs continuous (Box) actions: use cql_qrdqn_atari.py")
    episodes = tqdm(dataset.iterate_episodes(), total=dataset.total_episodes, leave=False,
                    desc=f"loading {args.dataset_id}", disable=not args.progress)
    data = episodes_to_transitions(stepped_episodes(episodes, args.dataset_id))
    check_finite(data, args.dataset_id)
    check_actions(data["actions"], dataset.action_space, args.dataset_id)
    family = family_name(args.dataset_id)
    if (terminals := family_of(family).terminals) is not None:
        data["dones"] = terminals(data)
    tf = make_transform(data, dataset.action_space, args)
    info = dict(dataset_id=args.dataset_id, family=family, transitions=len(data["obs"]),
                episodes=len(data["episode_returns"]), obs_dim=data["obs"].shape[1],
                action_dim=data["actions"].shape[1],
                terminals=terminals and terminals.__name__,  # the family's, None: the data's
                **scoring(dataset.storage.metadata, family, args.dataset_id))
    eval_env = spec_dict(eval_env_spec(dataset, family))
    make_eval_env(eval_env, dataset_id=args.dataset_id).close()  # now, not after training
    return Data(apply_transform(data, tf), tf, info, eval_env)


# ---- dataset families: what each does to the data, its evaluation env, its score ----------
# One block per family, each registering a Family in FAMILIES with the dataset ids it takes; a
# dataset of no family takes FAMILIES[""] where set (Cal-QL: success_first), else the generic
# Family() defaults (as in a copy of this file with the blocks deleted).


def reference_scoring(meta: dict[str, Any], dataset_id: str) -> dict[str, Any]:
    """Generic score: the dataset metadata's reference returns, where it has them."""
    lo, hi = (None if meta.get(k) is None else float(meta[k])
              for k in ("ref_min_score", "ref_max_score"))
    source = None if lo is None or hi is None else "dataset metadata (ref_min_score / " \
        "ref_max_score)"
    return dict(score_definition="100 * (return - ref_min) / (ref_max - ref_min)" if source
                else None, ref_min_score=lo, ref_max_score=hi, ref_source=source)


def reference_score(info: dict[str, Any], returns: np.ndarray, rate: float | None,
                    last_infos: list[dict]) -> tuple[float | None, dict[str, float]]:
    """The score of evaluation episodes from the reference returns (None without)."""
    ret, lo, hi = float(np.mean(returns)), info.get("ref_min_score"), info.get("ref_max_score")
    return (100.0 * (ret - lo) / (hi - lo) if lo is not None and hi is not None else None), {}


@dataclass(frozen=True)
class Family:
    """A dataset family's changes to the generic path (the defaults)."""

    prefixes: tuple[str, ...] = ()  # the dataset ids it takes: id prefixes
    terminals: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None  # new `dones`
    eval_spec: Callable[[Any, Any], Any] = lambda data_spec, eval_spec: eval_spec or data_spec
    scoring: Callable[[dict[str, Any], str], dict[str, Any]] = reference_scoring
    score: Callable[..., tuple[float | None, dict[str, float]]] = reference_score


FAMILIES: dict[str, Family] = {}


def family_of(name: str | None) -> Family:
    return FAMILIES.get(name or "", Family())


def family_name(dataset_id: str) -> str | None:
    """The family taking `dataset_id` (the first whose prefix it starts with); None: generic."""
    return next((name for name, f in FAMILIES.items() if dataset_id.startswith(f.prefixes)), None)


def env_step(env: gym.Env, action: np.ndarray, args: Args
             ) -> tuple[Any, float, bool, bool, dict[str, Any]]:
    """One env step of evaluate -> (obs, reward, terminated, truncated, info), the env's own
    (Cal-QL's binary tasks change it)."""
    return env.step(action)


# ---- family: gym (Minari's mujoco/*) ------------------------------------------------------
# D4RL's Gym-MuJoCo reference returns (d4rl/gym_mujoco/__init__.py, *_RANDOM_SCORE and
# *_EXPERT_SCORE, used for every split of the v0-v2 datasets): (random, expert).
D4RL_MUJOCO_REFS = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0),
                    "walker2d": (1.629008, 4592.3), "ant": (-325.6, 3879.7)}


def gym_scoring(meta: dict[str, Any], dataset_id: str) -> dict[str, Any]:
    out, robot = reference_scoring(meta, dataset_id), dataset_id.split("/")[1]
    if out["ref_source"] is None and robot in D4RL_MUJOCO_REFS:  # Minari #323: none stored
        out.update(score_definition="100 * (return - ref_min) / (ref_max - ref_min)",
                   ref_min_score=D4RL_MUJOCO_REFS[robot][0],
                   ref_max_score=D4RL_MUJOCO_REFS[robot][1],
                   ref_source="D4RL d4rl/gym_mujoco/__init__.py random/expert returns of the "
                   "v2 datasets' envs (Gym MuJoCo v3): NOT like-for-like with the v5 envs")
    return out


FAMILIES["gym"] = Family(prefixes=("mujoco/",), scoring=gym_scoring)


# ---- family: adroit (D4RL/pen, door, relocate, hammer) --------------------------------------
def adroit_eval_spec(data_spec, eval_spec) -> gym.envs.registration.EnvSpec:
    """Minari's spec says 200 steps for every task (pen was 100 until Minari #286; pen
    episodes are 100-200 steps, #303), but the reference scores are D4RL's, measured on
    D4RL's horizons: 100 steps for pen, 200 for door, relocate and hammer."""
    horizon = d4rl_adroit_horizon(data_spec.id) or 200
    return replace(eval_spec or data_spec, max_episode_steps=horizon)


def adroit_scoring(meta: dict[str, Any], dataset_id: str) -> dict[str, Any]:
    out = reference_scoring(meta, dataset_id)
    if out["ref_source"] is not None:
        out["ref_source"] = ("dataset metadata: D4RL's reference scores (100-step pen "
                             "episodes, see eval_env)")
    return out


FAMILIES["adroit"] = Family(
    prefixes=("D4RL/pen/", "D4RL/door/", "D4RL/relocate/", "D4RL/hammer/"),
    eval_spec=adroit_eval_spec, scoring=adroit_scoring)


# ---- family: kitchen (D4RL/kitchen) ---------------------------------------------------------
KITCHEN_HORIZON = 280  # D4RL d4rl/kitchen/__init__.py: max_episode_steps=280 for every task
KITCHEN_TASK_SCORE = 25.0  # D4RL: ref_min_score 0, ref_max_score 4 tasks -> tasks x 25


def kitchen_eval_spec(data_spec, eval_spec) -> gym.envs.registration.EnvSpec:
    """The DATA's semantics: Minari collected with tasks kept and no termination
    (`remove_task_when_completed=False, terminate_on_tasks_completed=False`), so the reward
    is the number of goal tasks that hold at each step, as trained on, and the value gap
    compares like with like; D4RL's 280 steps. (D4RL's own semantics, each task paying 1
    once and the episode ending when all are done, would give returns <= 4 against Q-values
    trained on per-step counts.) The score is still D4RL's: kitchen_score."""
    # Minari collected so (minari-dataset-generation-scripts scripts/D4RL/kitchen/
    # create_franka_dataset.py); the data spec's own kwargs win where it records them
    kept = {"remove_task_when_completed": False, "terminate_on_tasks_completed": False}
    return replace(data_spec, max_episode_steps=KITCHEN_HORIZON,
                   kwargs={**kept, **data_spec.kwargs})


def kitchen_score(info: dict[str, Any], returns: np.ndarray, rate: float | None,
                  last_infos: list[dict]) -> tuple[float, dict[str, float]]:
    """D4RL's score: distinct tasks completed in the 280 steps x 25. The env lists every task
    completed so far in info["episode_task_completions"] whether or not it removes them
    (gymnasium-robotics kitchen_env.py `step`), read at the last scored step; D4RL removes a
    task when first completed, so its return is that count: return_mean reports it too."""
    tasks = np.array([len(i.get("episode_task_completions", ())) for i in last_infos],
                     np.float64)
    return KITCHEN_TASK_SCORE * float(np.mean(tasks)), dict(
        return_mean=float(np.mean(tasks)), return_std=float(np.std(tasks)),
        tasks_completed=float(np.mean(tasks)))


def demo_end_terminals(data: dict[str, np.ndarray]) -> np.ndarray:
    """Kitchen: the last step of each demonstration is terminal, as in D4RL's kitchen data
    (D4RL scripts/generation/generate_kitchen_datasets.py: `terminals` True at each demo's last
    step), which the official CQL code trains on (d4rl/examples/cql_mujoco_new.py `load_hdf5`
    of `d4rl.qlearning_dataset`). Minari replays each demonstration as one episode and ends it
    by truncation (minari-dataset-generation-scripts scripts/D4RL/kitchen/
    create_franka_dataset.py: a reset between demos, limits 280 / 450 above every demo)."""
    return np.maximum(data["dones"], data["timeouts"])


FAMILIES["kitchen"] = Family(
    prefixes=("D4RL/kitchen/",), terminals=demo_end_terminals, eval_spec=kitchen_eval_spec,
    score=kitchen_score,
    scoring=lambda meta, dataset_id: dict(
        score_definition="tasks completed (0-4) x 25, as D4RL (ref_min 0, ref_max 4)",
        ref_min_score=0.0, ref_max_score=4.0,
        ref_source="D4RL d4rl/kitchen/__init__.py ref_min_score 0, ref_max_score 4"))


# ---- family: antmaze (D4RL/antmaze) ---------------------------------------------------------


def goal_terminals(data: dict[str, np.ndarray]) -> np.ndarray:
    """AntMaze: every goal-reaching step (raw reward 1) is terminal. Minari's AntMaze data come
    from a continuing task (never terminated, reward 1 at every step within 0.45 of the goal).
    D4RL's antmaze datasets store `terminals` equal to these rewards (D4RL issue #199: "a
    reward/terminal of 1 when the ant is near the goal"), and the official codes train on
    those terminals: CQL `cql_antmaze_new.py` (`load_hdf5`: `_terminals = dataset['terminals']`
    from d4rl.qlearning_dataset) and Cal-QL `replay_buffer.py` (`dones=dataset['terminals']`).
    We follow them: done = reward == 1. Without it Q at the goal heads to r/(1-gamma), and
    evaluation, which ends at the goal, would not match the data."""
    return np.maximum(data["dones"], (data["rewards"] == 1.0).astype(np.float32))


def _cell(maze_map: list[list[Any]], mark: str) -> tuple[int, int] | None:
    found = [(i, j) for i, row in enumerate(maze_map) for j, c in enumerate(row) if c == mark]
    return found[0] if len(found) == 1 else None


def antmaze_eval_spec(data_spec, eval_spec) -> gym.envs.registration.EnvSpec:
    """The DATA's maze with the eval spec's fixed start (r) and goal (g) cells, ending at the
    goal (continuing_task=False), the eval horizon (700 umaze, 1000 others). The eval spec's
    maze is the data maze seen under a symmetry: identical for medium/large, the 180-degree
    rotation for umaze/umaze-diverse (Minari #304, #301: its walls are the mirror image). The
    eval cells are mapped through the symmetry that takes the eval walls onto the data walls
    (and, where the data map has a goal cell, its goal onto that goal)."""
    data_map = data_spec.kwargs.get("maze_map") or gym.spec(data_spec.id).kwargs["maze_map"]
    walls = np.array([[c == 1 for c in row] for row in data_map])
    source_map = eval_spec.kwargs.get("maze_map", data_map) if eval_spec else data_map
    reset, goal = _cell(source_map, "r"), _cell(source_map, "g")
    if reset is None or goal is None:
        fail(f"the AntMaze eval spec of {data_spec.id} has no single start (r) and goal (g) "
             "cell; cannot fix the evaluation episodes")
    eval_walls = np.array([[c == 1 for c in row] for row in source_map])
    (h, w), data_goal = walls.shape, _cell(data_map, "g")
    # (name, map, cell transform); rot180 (#304) before the mirrors: umaze-diverse's tie
    symmetries = (("identity", lambda a: a, lambda i, j: (i, j)),
                  ("rot180", lambda a: a[::-1, ::-1], lambda i, j: (h - 1 - i, w - 1 - j)),
                  ("mirror-lr", lambda a: a[:, ::-1], lambda i, j: (i, w - 1 - j)),
                  ("mirror-ud", lambda a: a[::-1, :], lambda i, j: (h - 1 - i, j)))
    options = [(name, cell) for name, grid, cell in symmetries
               if eval_walls.shape == walls.shape and np.array_equal(grid(eval_walls), walls)]
    options.sort(key=lambda option: option[1](*goal) != data_goal)  # no data goal: no change
    if not options:
        fail(f"the AntMaze eval maze of {data_spec.id} matches the data maze under no "
             "mirror or rotation; cannot place its start and goal in the data maze")
    _, cell = options[0]
    maze = [[1 if c == 1 else 0 for c in row] for row in data_map]
    (ri, rj), (gi, gj) = cell(*reset), cell(*goal)
    maze[ri][rj], maze[gi][gj] = "r", "g"
    kwargs = {**data_spec.kwargs, "maze_map": maze, "continuing_task": False,
              "reset_target": False}
    steps = (eval_spec or data_spec).max_episode_steps
    return replace(data_spec, kwargs=kwargs, max_episode_steps=steps)

FAMILIES["antmaze"] = Family(
    prefixes=("D4RL/antmaze/",), terminals=goal_terminals, eval_spec=antmaze_eval_spec,
    score=lambda info, returns, rate, last_infos: (100.0 * (rate or 0.0), {}),  # None: 0
    scoring=lambda meta, dataset_id: dict(
        score_definition="success rate x100 (CQL paper Table 2)", ref_min_score=None,
        ref_max_score=None, ref_source=None))


# ---- presets, each value with its source; the command line -------------------------------
# Sources of the Args defaults above. "CQL code" = github.com/aviralkumar2907/CQL (rlkit under
# d4rl/), "Cal-QL code" = github.com/nakamotoo/Cal-QL, "CORL" = github.com/tinkoff-ai/CORL.
_MUJOCO_NEW = "CQL code d4rl/examples/cql_mujoco_new.py"
_POL = "CQL code d4rl/rlkit/torch/sac/policies.py"
DEFAULT_SOURCES: dict[str, str] = dict(
    total_steps="paper App. F: 1M gradient steps; the official script runs 3M (3000 epochs x "
                "1000 steps, cql_mujoco_new.py L123-125): the paper's length is used",
    eval_every="project choice (the official loop evaluates every 1000-step epoch)",
    eval_episodes="project choice",
    batch_size=f"{_MUJOCO_NEW} `batch_size=256`; paper App. F",
    actor_hidden_dims=f"{_MUJOCO_NEW} `hidden_sizes=[M, M, M]`, `layer_size=256`",
    critic_hidden_dims=f"{_MUJOCO_NEW} `hidden_sizes=[M, M, M]`, `layer_size=256`",
    init="CQL code rlkit/torch/networks.py `fanin_init` hidden layers, `b_init_value=0.1`, "
         "last layer `init_w=3e-3` (L27-31, L49-64); policies.py `init_w=1e-3` (L45, L61-63)",
    log_std_min=f"{_POL} `LOG_SIG_MIN = -5` (L11)",
    log_std_max=f"{_POL} `LOG_SIG_MAX = 2` (L10)",
    mean_clamp=f"{_POL} `MEAN_MIN/MAX = -9/9` (L12-13), in `log_prob` only (L81)",
    log_std_affine="CQL code: rlkit TanhGaussianPolicy has no log-std multiplier/offset",
    gamma=f"{_MUJOCO_NEW} `discount=0.99`",
    policy_lr="paper App. F: 3e-5 for all domains (the official script's default: 1e-4, "
              "cql_mujoco_new.py L166)",
    qf_lr=f"{_MUJOCO_NEW} `qf_lr=3E-4`; paper App. F",
    soft_target_update=f"{_MUJOCO_NEW} `soft_target_tau=5e-3`",
    target_entropy="rlkit cql.py: `-np.prod(action_space.shape)` (None: -|A|)",
    bc_steps="project default: no warm start (presets set the official 40k where it was used)",
    backup_entropy=f"{_MUJOCO_NEW} `--deterministic_backup` default 'True'",
    max_backup=f"{_MUJOCO_NEW} `--max_q_backup` default 'False'",
    max_backup_form="rlkit cql.py L219-224: per critic the max over 10 actions, then the min",
    cql_weight="CQL README, MuJoCo command `--min_q_weight=(5.0 or 10.0)`",
    cql_importance_sample=f"{_MUJOCO_NEW} `--min_q_version` default 3 (CQL(H))",
    cql_data_term="paper Eq. 4 (CQL(H)); rlkit cql.py subtracts `q1_pred.mean()`",
    cql_n_actions=f"{_MUJOCO_NEW} `num_random=10`; paper App. F",
    cql_temp=f"{_MUJOCO_NEW} `temp=1.0`",
    cql_clip_diff_min="CQL code: no clipping",
    cql_clip_diff_max="CQL code: no clipping",
    lagrange="CQL README, MuJoCo command `--lagrange_thresh=-1.0` (off)",
    cql_tau="paper App. F: tau = 10 for gym (used with --lagrange; the official script's "
            "default `--lagrange_thresh` is 5.0, cql_mujoco_new.py L168)",
    lagrange_form="rlkit cql.py: `alpha_prime * (min_qf1_loss - target_action_gap)` with the "
                  "weight inside min_qf1_loss",
    log_alpha_prime_init="rlkit cql.py: `log_alpha_prime = ptu.zeros(1)`",
    alpha_prime_lr="rlkit cql.py: alpha' optimizer at qf_lr (3e-4)",
    reward_mode="CQL code: rewards as stored (`reward_scale=1`)",
    reward_scale="CQL code: `reward_scale=1`",
    reward_bias="CQL code: no reward bias",
    normalize_states="CQL code: observations as stored",
)

_CAL_QL = "Cal-QL code"
_RUN_ANTMAZE = "Cal-QL scripts/run_antmaze.sh"
_CORL_ANTMAZE = "CORL configs/offline/cql/antmaze/*.yaml"
_ANTMAZE_NEW = "CQL code d4rl/examples/cql_antmaze_new.py"
_APP_F_LAGRANGE = ("paper App. F: Lagrange with tau = 5 for Adroit and kitchen; "
                   f"{_MUJOCO_NEW} `--min_q_weight` default 1.0 (\"set to 5.0 or 10.0 if not "
                   "using lagrange\"), so in the CQL form the target gap is tau")
# Preset values, each with its source: group -> field -> (value, source).
PRESETS: dict[str, dict[str, tuple[Any, str]]] = {
    "defaults": {k: (getattr(Args, k), source) for k, source in DEFAULT_SOURCES.items()},
    "gym": dict(
        policy_lr=(1e-4, "CQL README, MuJoCo command `--policy_lr=1e-4`"),
        bc_steps=(40_000, f"{_MUJOCO_NEW} `--policy_eval_start` default 40000"),
        cql_weight=(5.0, "CQL README, MuJoCo command `--min_q_weight=(5.0 or 10.0)`"),
        lagrange=(False, "CQL README, MuJoCo command `--lagrange_thresh=-1.0`"),
    ),
    "antmaze": dict(  # Cal-QL / CORL antmaze (the CQL code's own run: antmaze-cql-code)
        policy_lr=(1e-4, f"{_CAL_QL} conservative_sac.py `policy_lr = 1e-4`; CORL yaml 0.0001"),
        bc_steps=(0, f"{_CAL_QL}: no BC warm start; {_CORL_ANTMAZE} `bc_steps: 0`"),
        cql_weight=(5.0, f"{_RUN_ANTMAZE} `--cql_min_q_weight=5.0`; CORL `cql_alpha: 5.0`"),
        lagrange=(True, f"{_RUN_ANTMAZE} `--cql.cql_lagrange=True`; CORL `cql_lagrange: true`"),
        cql_tau=(0.8, f"{_RUN_ANTMAZE} `--cql.cql_target_action_gap=0.8`; CORL the same"),
        lagrange_form=("calql", f"{_CAL_QL} conservative_sac.py: `alpha_prime * "
                                "cql_min_q_weight * (cql_qf1_diff - cql_target_action_gap)`"),
        log_alpha_prime_init=(1.0, f"{_CAL_QL} conservative_sac.py `Scalar(1.0)`; CORL "
                                   "cql.py `Scalar(1.0)`"),
        max_backup=(True, f"{_CAL_QL} `cql_max_target_backup = True`; CORL the same"),
        max_backup_form=("calql", f"{_CAL_QL} conservative_sac.py L176-186: min over critics, "
                                  "then max over actions"),
        critic_hidden_dims=((256, 256, 256, 256), f"{_RUN_ANTMAZE} `--qf_arch=256-256-256-256`"),
        actor_hidden_dims=((256, 256), f"{_RUN_ANTMAZE} `--policy_arch=256-256`"),
        init=("orthogonal", f"{_CAL_QL} conservative_sac_main.py `orthogonal_init=True` "
                            "(model.py L56-71); CORL `orthogonal_init: true`"),
        log_std_min=(-20.0, f"{_CAL_QL} model.py TanhGaussianPolicy `jnp.clip(log_std, -20.0, "
                            "2.0)` (L121, L134); CORL the same"),
        mean_clamp=(None, f"{_CAL_QL} model.py: no mean clamp"),
        log_std_affine=(True, f"{_CAL_QL} model.py TanhGaussianPolicy `log_std_multiplier=1.0`,"
                              " `log_std_offset=-1.0` (learnable); CORL the same"),
        reward_mode=("scale_bias", f"{_RUN_ANTMAZE} `--reward_scale/--reward_bias`"),
        reward_scale=(10.0, f"{_RUN_ANTMAZE} `--reward_scale=10.0`; CORL `reward_scale: 10.0`"),
        reward_bias=(-5.0, f"{_RUN_ANTMAZE} `--reward_bias=-5`; CORL `reward_bias: -5.0`"),
    ),
    # The CQL code's own antmaze run (`--env antmaze-<maze>-cql-code`): the defaults (rlkit
    # networks, init, clamps, Lagrange form) with these. `antmaze` is instead the recipe that
    # Cal-QL and CORL tuned, after CQL on antmaze did not reproduce (CORL #14, PR #56).
    "antmaze-cql-code": dict(
        policy_lr=(1e-4, f"{_ANTMAZE_NEW} `--policy_lr` default 1e-4; CQL README antmaze "
                         "command `--policy_lr=1e-4`"),
        bc_steps=(40_000, f"{_ANTMAZE_NEW} `--policy_eval_start` default 40000"),
        lagrange=(True, f"{_ANTMAZE_NEW}: `with_lagrange` unless `--lagrange_thresh` < 0"),
        cql_tau=(5.0, f"{_ANTMAZE_NEW} `--lagrange_thresh` default 5.0; CQL README antmaze "
                      "command `--lagrange_thresh=5.0`"),
        cql_weight=(5.0, "CQL README antmaze command `--min_q_wight=5.0` (sic: meant "
                         f"--min_q_weight; {_ANTMAZE_NEW}'s default is 1.0)"),
        max_backup=(False, f"{_ANTMAZE_NEW} `--max_q_backup` default 'False', not set by the "
                           "README command (the paper's App. F: max backup for antmaze)"),
        reward_mode=("scale_bias", f"{_ANTMAZE_NEW} `load_hdf5`: `(rewards - 0.5) * 4.0`"),
        reward_scale=(4.0, f"{_ANTMAZE_NEW} `load_hdf5`: `(rewards - 0.5) * 4.0`"),
        reward_bias=(-2.0, f"{_ANTMAZE_NEW} `load_hdf5`: `(rewards - 0.5) * 4.0`"),
    ),
    "adroit": dict(
        policy_lr=(3e-5, "paper App. F: 3e-5 (1e-4 performed badly on Adroit)"),
        bc_steps=(40_000, f"{_MUJOCO_NEW} `--policy_eval_start` default 40000"),
        cql_weight=(1.0, _APP_F_LAGRANGE),
        lagrange=(True, "paper App. F: Lagrange version for Adroit"),
        cql_tau=(5.0, "paper App. F: tau = 5 for Adroit"),
    ),
    "kitchen": dict(
        policy_lr=(3e-5, "paper App. F: 3e-5 for all domains"),
        bc_steps=(40_000, f"{_MUJOCO_NEW} `--policy_eval_start` default 40000"),
        cql_weight=(1.0, _APP_F_LAGRANGE),
        lagrange=(True, "paper App. F: Lagrange version for kitchen"),
        cql_tau=(5.0, "paper App. F: tau = 5 for kitchen"),
        max_backup=(True, "paper App. F: max backup for antmaze and kitchen"),
        max_backup_form=("cql", "rlkit cql.py L219-224: per critic the max, then the min"),
    ),
    # Local Pendulum data, sized for a CPU: small networks, larger learning rates, rewards
    # x0.1 (values ~ -100 instead of -1000); the paper's Polyak rate 5e-3 (issue 18).
    "pendulum": dict(
        total_steps=(10_000, "project: at the paper's Polyak rate, 10k updates score at "
                     "least what Polyak 0.05 did at 6k on all five local datasets (claims.md; "
                     "expert still rises to 30k)"),
        eval_every=(1_000, "project: 10 evaluations per run"),
        eval_episodes=(10, "project: as the benchmark suites"),
        actor_hidden_dims=((64, 64), "project: CPU-sized networks"),
        critic_hidden_dims=((64, 64), "project: CPU-sized networks"),
        policy_lr=(1e-3, "project: learns the local data in a few 1000 steps"),
        qf_lr=(1e-3, "project: learns the local data in a few 1000 steps"),
        reward_mode=("scale_bias", "project: rewards x0.1 (values ~ -100); x1 scored lower "
                     "on random data (benchmark/results/claims.md, local.md)"),
        reward_scale=(0.1, "project: rewards x0.1 (values ~ -100); x1 scored lower on random "
                      "data (benchmark/results/claims.md, local.md)"),
    ),
}


ADROIT_TASKS = ("pen", "door", "relocate", "hammer")
D4RL_ONLY_LEVELS = ("random", "medium-replay", "medium-expert", "full-replay")


def d4rl_level_hint(env: str) -> str | None:
    """What to use for a D4RL MuJoCo level that Minari's mujoco/ datasets do not have."""
    robot, _, level = env.partition("-")
    if robot not in ("hopper", "halfcheetah", "walker2d", "ant") or level not in D4RL_ONLY_LEVELS:
        return None
    return (f"Minari's mujoco/{robot} datasets have the levels simple, medium and expert, not "
            f"D4RL's {level}; use --env {robot}-medium (or -simple, -expert), or --dataset-id "
            "for another Minari dataset")
# `--env` -> (Minari dataset id, preset groups over the defaults): "{task}-{level}" for each
# (group, dataset id pattern, tasks, levels).
ENVS: dict[str, tuple[str, tuple[str, ...]]] = {
    f"{task}-{level}": (pattern.format(task, level), (group,))
    for group, pattern, tasks, levels in [
        ("gym", "mujoco/{}/{}-v0", ("hopper", "halfcheetah", "walker2d", "ant"),
         ("simple", "medium", "expert")),
        ("antmaze", "D4RL/{}/{}-v1", ("antmaze",),
         ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play",
          "large-diverse")),
        ("adroit", "D4RL/{}/{}-v2", ADROIT_TASKS, ("human", "cloned", "expert")),
        ("kitchen", "D4RL/{}/{}-v2", ("kitchen",), ("complete", "partial", "mixed")),
        ("pendulum", "local/{}/{}-v0", ("pendulum",),
         ("random", "medium", "expert", "medium-replay", "medium-expert"))]
    for task in tasks for level in levels}
ENVS.update({f"{env}-cql-code": (dataset_id, ("antmaze-cql-code",))  # the CQL code's run
             for env, (dataset_id, groups) in list(ENVS.items()) if groups == ("antmaze",)})
# `--dataset-id` without a preset `--env`: id prefix -> groups (the dataset's family).
FALLBACK: dict[str, tuple[str, ...]] = {
    "": (), **{p: (name,) for name, family in FAMILIES.items() for p in family.prefixes},
    "local/pendulum/": ("pendulum",)}
ALONE_TAKES_ITS_PRESET = False  # `--dataset-id D4RL/pen/human-v2` alone runs as pen-human-v2
ENV_HINT: Callable[[str], str | None] = lambda env: d4rl_level_hint(env)
_POSITIVE, _NON_NEGATIVE = ("positive", lambda v: v > 0), (">= 0", lambda v: v >= 0)
_WIDTHS = ("positive widths", lambda v: min(v, default=1) > 0)
# Field -> (rule, check of its value); None values are not checked.
RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **dict.fromkeys(("total_steps", "eval_every", "eval_episodes", "batch_size",
                     "cql_n_actions", "log_every", "policy_lr", "qf_lr", "alpha_prime_lr",
                     "cql_temp", "max_abs_q", "threads", "mean_clamp"), _POSITIVE),
    **dict.fromkeys(("bc_steps", "cql_weight"), _NON_NEGATIVE),
    "gamma": ("in [0, 1)", lambda v: 0 <= v < 1),  # 1: no discounting, MC returns divide by 0
    "soft_target_update": ("in (0, 1]", lambda v: 0 < v <= 1),
    **dict.fromkeys(("actor_hidden_dims", "critic_hidden_dims"), _WIDTHS)}


# ---- from the command line to Args: the same code in CQL-SAC and Cal-QL (the tables above
# are what differs) ------------------------------------------------------------------------
ENV_GROUPS: dict[str, tuple[str, ...]] = {env: groups for env, (_, groups) in ENVS.items()}


def fallback_groups(dataset_id: str) -> tuple[str, ...]:
    """FALLBACK's groups for `dataset_id`: those of the longest id prefix it names."""
    return FALLBACK[max((p for p in FALLBACK if dataset_id.startswith(p)), key=len)]


def preset_values(env: str, dataset_id: str | None = None) -> dict[str, tuple[Any, str]]:
    """Field -> (value, source) of `env`'s preset: the defaults (PRESETS' first group), then
    its groups in order (later ones win); an `env` without a preset takes FALLBACK's."""
    groups = ENVS[env][1] if env in ENVS else fallback_groups(dataset_id or "")
    return {k: entry for g in (next(iter(PRESETS)), *groups) for k, entry in PRESETS[g].items()}


ENV_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    env: (dataset_id, {k: v for k, (v, _) in preset_values(env).items()})
    for env, (dataset_id, _) in ENVS.items()}  # `--env` -> (dataset id, preset values)


def env_for_dataset(dataset_id: str) -> str:
    """`--env` of a run given only `--dataset-id`: the preset naming it where
    ALONE_TAKES_ITS_PRESET, else a name from the id (D4RL/pen/human-v2 -> pen-human-v2)."""
    named = [env for env, (ds, _) in ENVS.items() if ds == dataset_id and ALONE_TAKES_ITS_PRESET]
    return named[0] if named else "-".join(dataset_id.split("/")[1:]) or dataset_id


def check_env(env: str, dataset_id: str | None = None) -> None:
    """One-line error for an `--env` without a preset (ENV_HINT's, or without `--dataset-id`)."""
    if env not in ENVS and (hint := ENV_HINT(env)):
        fail(f"--env {env}: {hint}")
    if env not in ENVS and dataset_id is None:
        import difflib

        close = difflib.get_close_matches(env, ENVS, n=3)
        maybe = f" (did you mean {' or '.join(close)}?)" if close else ""
        fail(f"unknown --env {env!r}{maybe}; choose one of {', '.join(ENVS)}, or pass a Minari "
             "id with --dataset-id")


def preset_args(env: str, dataset_id: str | None = None) -> Args:
    """Args() with `env`'s preset filled in (literal values, see `--presets`); `dataset_id`
    replaces the preset's dataset (an `env` without a preset needs it)."""
    check_env(env, dataset_id)
    values = {k: v for k, (v, _) in preset_values(env, dataset_id).items()}
    return replace(Args(), env=env, dataset_id=dataset_id or ENVS[env][0], **values)


def parse_args(argv: list[str] | None = None) -> Args:
    """Command line -> complete Args: `--env`/`--dataset-id` pick the preset, which becomes
    tyro's default (so `--help` shows it), the other flags override it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--presets" in argv:
        print(presets_markdown())
        raise SystemExit(0)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--env", default=None)
    pre.add_argument("--dataset-id", "--dataset_id", default=None)
    known, _ = pre.parse_known_args(argv)
    env = known.env or (env_for_dataset(known.dataset_id) if known.dataset_id else Args.env)
    args = args_from_argv(preset_args(env, known.dataset_id), argv, env)
    check_args(args)
    return args


def check_args(args: Args) -> None:
    """Every argument checked once, up front (RULES): one-line errors, never a traceback."""
    check_env(args.env, args.dataset_id)
    if not 0 <= args.seed < SEED_END:  # the rule of check_run_args, before any data loads
        fail(f"--seed {args.seed} is outside [0, 2**31); pick a seed in that range")
    for name, (rule, ok) in RULES.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            fail(f"--{name.replace('_', '-')} must be {rule}, got {value}")
    if args.max_backup and args.backup_entropy and args.max_backup_form == "cql":
        fail("--backup-entropy with --max-backup needs --max-backup-form calql (rlkit's max "
             "backup has no entropy term)")
    if args.log_std_min >= args.log_std_max:
        fail("--log-std-min must be < --log-std-max")
    if args.cql_clip_diff_max < args.cql_clip_diff_min:
        fail("--cql-clip-diff-max must be >= --cql-clip-diff-min")
    if args.cudagraphs and not args.compile:
        fail("--cudagraphs needs --compile")


def presets_markdown() -> str:
    """Markdown table of the defaults and every preset value, with sources (`--presets`), then
    the `--env` names and the rule for a dataset without one."""
    fmt = lambda v: " ".join(map(str, v)) if isinstance(v, tuple) else repr(v)  # str quoted
    lines = ["| preset | field | value | source |", "|---|---|---|---|"]
    for group, values in PRESETS.items():
        for name, (value, source) in values.items():
            cells = (group, name, fmt(value), source)  # "|" inside a cell escaped
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    envs = "; ".join(f"`{env}`: {ds}, {' + '.join(g)}" for env, (ds, g) in ENVS.items())
    alone = "; ".join(f"{p or 'other'}...: {' + '.join(g) or 'defaults'}"
                      for p, g in FALLBACK.items())
    return "\n".join([*lines, "", f"`--env` -> dataset, groups over the defaults: {envs}.", "",
                      f"`--dataset-id` without a preset `--env`: {alone}."])


# ---- the run: its summary and length (main and Part III; Cal-QL: loop counters) ----------


def final_summary(history: list[dict], info: dict[str, Any], args: Args) -> dict[str, Any]:
    """summary.json's numbers: the last evaluation, and how its score is computed."""
    last = history[-1]
    return dict(final_score=last["score"], final_return=last["return_mean"],
                final_success_rate=last["success_rate"], value_gap=last["value_gap"],
                value_gap_return=last["value_gap_return"],
                score_definition=info["score_definition"], ref_source=info["ref_source"],
                total_steps=args.total_steps)


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
