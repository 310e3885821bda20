"""Cal-QL: calibrated CQL pre-training, then online fine-tuning (offline-to-online RL).

Nakamoto, Zhai, Singh, Sobol Mark, Ma, Finn, Kumar, Levine. "Cal-QL: Calibrated Offline RL
Pre-Training for Efficient Online Fine-Tuning." NeurIPS 2023. https://arxiv.org/abs/2303.05479
Official code: github.com/nakamotoo/Cal-QL (JAX, built on JaxCQL). CQL: Kumar et al. 2020.

Cal-QL is CQL (importance-sampled logsumexp, twin critics, max backup, fixed or Lagrange
weight) plus ONE change: in the logsumexp, the Q-values of the policy actions (pi(.|s) and
pi(.|s'), both scored at s) are replaced by max(Q(s,a), V_mu(s)), V_mu the Monte-Carlo
return-to-go of the behaviour policy. `--no-enable-calql` gives plain CQL, all else equal.
Where the official code and the paper's appendix differ, the official code is followed and
the comment says so. `--presets` prints every preset value with its source; `--env X
--help` shows the values that run for X. `diff cql_sac_continuous.py calql_finetune.py`
shows what Cal-QL changes.

    python benchmark/datasets.py pointmaze-sparse pen-cloned-local   # local datasets
    python calql_finetune.py --env pointmaze-binary                 # CPU, about a minute
    python calql_finetune.py --env antmaze-medium-play --no-enable-calql   # plain CQL
    python calql_finetune.py --dataset-id mujoco/hopper/medium-v0    # generic preset

- Part I, the algorithm (lines 57-806): Args, networks, losses, training step, buffers,
  evaluation and online episodes, main.
- Part II, datasets and presets (lines 807-1376): Minari loading, one block per dataset family
  (its data, evaluation env and score), the presets with their sources, argument parsing.
  Copying the file for your own data: delete the family blocks and the presets and pass
  `--dataset-id`; the generic path (any Minari dataset with Box actions) still runs.
- Part III, run plumbing (lines 1377-1958): run directory, checkpoints, resume, signals, W&B.
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
from typing import Any, NoReturn

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
    """Cal-QL fine-tuning. Defaults are the pen-binary preset; `--env X` loads X's preset
    (`--env X --help` shows it, `--presets` lists every preset value with its source)."""

    env: str = "pen-binary"
    """Task with a preset: pen-binary, door-binary, relocate-binary, antmaze-<maze>,
    pointmaze-binary (local, CPU). Left out with --dataset-id: the preset of the dataset's
    family, else the generic preset under a name derived from the id."""
    dataset_id: str = "D4RL/pen/cloned-v2"
    """Minari dataset id (the preset's by default); any other id keeps the preset's values,
    e.g. D4RL/pen/human-v2 or local/pen/cloned-v0."""
    seed: int = 0
    """Random seed (networks, sampling, online and evaluation episodes)."""
    device: str = "auto"
    """Device: auto, cpu or cuda (auto picks CUDA when available)."""
    offline_steps: int = 20_000
    """Gradient steps of offline pre-training."""
    online_steps: int = 200_000
    """Environment steps of online fine-tuning."""
    offline_eval_every: int = 2_000
    """Evaluate (and checkpoint) every N updates of pre-training; also at step 0 (before any
    update, as the official loop's epoch 0) and at its end (the 'offline score')."""
    eval_every: int = 2_000
    """Evaluate (and checkpoint) every this many env steps during fine-tuning."""
    eval_episodes: int = 20
    """Deterministic evaluation episodes."""
    batch_size: int = 256
    """Transitions per gradient step; online: mixing_ratio of them offline, the rest online."""
    mixing_ratio: float = 0.5
    """Share of each online-phase batch drawn from the offline data."""
    utd: int = 1
    """Online update-to-data ratio: gradient steps per collected env step."""
    run_dir: str | None = None
    """Run directory; None: runs/calql_finetune__<env>__s<seed>__<time>."""
    actor_hidden_dims: tuple[int, ...] = (512, 512)
    """Actor hidden widths."""
    critic_hidden_dims: tuple[int, ...] = (512, 512, 512)
    """Critic hidden widths."""
    orthogonal_init: bool = True
    """Orthogonal init, hidden gain sqrt(2), last layer 1e-2 (Cal-QL code)."""
    log_std_affine: bool = True
    """Actor log-std = m * log_std + b with learnable scalars m (init 1.0) and b (init -1.0),
    before the clamp (Cal-QL JaxCQL/model.py TanhGaussianPolicy); the same flag as CQL-SAC."""

    # ---- SAC -------------------------------------------------------------------------
    gamma: float = 0.99
    """Discount factor."""
    policy_lr: float = 1e-4
    """Actor (and entropy alpha) learning rate."""
    qf_lr: float = 3e-4
    """Critic learning rate."""
    soft_target_update: float = 5e-3
    """Polyak rate of the target critics."""
    target_entropy: float | None = None
    """Entropy target of the automatic temperature; None: -|A|."""
    bc_steps: int = 0
    """Behaviour-cloning warm start of the actor for this many offline steps."""
    backup_entropy: bool = False
    """Keep -alpha*log pi in the Bellman target (JaxCQL `backup_entropy`)."""
    max_backup: bool = True
    """Max backup: max over N actions from pi(.|s') of the twin-min target Q."""

    # ---- CQL / Cal-QL ------------------------------------------------------------------
    enable_calql: bool = True
    """Calibrate the policy-action Q-values with max(Q, V_mu); --no-enable-calql: plain CQL."""
    cql_weight: float = 1.0
    """CQL weight alpha (official `cql_min_q_weight`); with --lagrange it multiplies the gap."""
    cql_weight_online: float | None = None
    """CQL weight during fine-tuning; None: the same as --cql-weight (official
    `cql_min_q_weight_online=-1`: unchanged)."""
    cql_n_actions: int = 10
    """N actions per state from each proposal (uniform, pi(.|s), pi(.|s'))."""
    cql_importance_sample: bool = True
    """Importance-sampled logsumexp (official default); --no-...: plain logsumexp incl. Q_data."""
    cql_temp: float = 1.0
    """Temperature T of T*logsumexp(Q/T)."""
    cql_clip_diff_min: float = -math.inf
    """Lower clip of the per-critic CQL gap (Cal-QL code)."""
    cql_clip_diff_max: float = math.inf
    """Upper clip of the per-critic CQL gap (Cal-QL code)."""
    lagrange: bool = False
    """Tune alpha' by dual descent towards the gap --cql-tau (Cal-QL: alpha' * w * (gap - tau))."""
    cql_tau: float = 1.0
    """Target action gap of the Lagrange form (official `cql_target_action_gap`)."""
    alpha_prime_lr: float = 3e-4
    """Learning rate of log alpha' (Lagrange only; official: qf_lr)."""
    log_alpha_prime_init: float = 1.0
    """Initial log alpha' (Lagrange only): 1.0, i.e. alpha' = e at the start."""

    # ---- data ------------------------------------------------------------------------
    binary: bool = True
    """Binary relabelling (Adroit): r = success - 1, success step terminal, failed
    trajectories dropped, each cut after its last success; online episodes end at success."""
    goal_terminals: bool = False
    """Data steps that receive the goal reward (`success` info) are terminal, as D4RL's
    antmaze `terminals` (AntMaze); MC returns restart after each terminal."""
    horizon: int | None = 100
    """Episode length limit of online and evaluation episodes; None (generic preset): the
    evaluation env spec's max_episode_steps."""
    reward_scale: float = 10.0
    """Rewards become r * scale + bias."""
    reward_bias: float = 5.0
    """Rewards become r * scale + bias."""
    sparse_reward: bool = True
    """Apply the all-failure rule to MC returns (sparse tasks)."""
    reward_neg: float = -1.0
    """Raw failure reward r_neg; a trajectory whose every reward is r_neg (after scale and
    bias) gets MC returns r_neg / (1 - gamma) at every step."""
    normalize_states: bool = False
    """Normalize observations with the offline data's mean/std (eps 1e-3), at evaluation too."""

    # ---- run -------------------------------------------------------------------------
    log_every: int = 1000
    """Read training metrics to the host (the only sync in pre-training) every N updates."""
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

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...],
                 orthogonal: bool, ensemble: int = 2):
        super().__init__()
        dims = (obs_dim + action_dim, *hidden, 1)
        self.layers = nn.ModuleList(EnsembleLinear(ensemble, i, o) for i, o in pairwise(dims))
        self.ensemble = ensemble
        if orthogonal:
            orthogonal_(list(self.layers), transposed=True)

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


LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # paper App. F; both official codes (rlkit, JaxCQL)


class TanhGaussianActor(nn.Module):
    """pi(a|s) = tanh(N(mu(s), sigma(s))), log-std clamped to `log_std_range`; log_std_affine:
    log-std = m * log_std + b before the clamp, m and b learnable scalars initialised to 1 and
    -1 (Args.log_std_affine: Cal-QL `model.py`, CORL)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...], orthogonal: bool,
                 log_std_affine: bool = False,
                 log_std_range: tuple[float, float] = (LOG_STD_MIN, LOG_STD_MAX)):
        super().__init__()
        self.net = mlp(obs_dim, hidden, 2 * action_dim)
        if orthogonal:
            orthogonal_([m for m in self.net if isinstance(m, nn.Linear)], transposed=False)
        self.log_std_affine, self.log_std_range = log_std_affine, log_std_range
        if log_std_affine:
            self.log_std_multiplier = nn.Parameter(torch.tensor(1.0))
            self.log_std_offset = nn.Parameter(torch.tensor(-1.0))

    def dist(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, -1)
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
        mean, log_std = self.dist(obs)
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
        self.actor = TanhGaussianActor(obs_dim, action_dim, args.actor_hidden_dims,
                                       args.orthogonal_init, args.log_std_affine)
        self.critic = FusedCritic(obs_dim, action_dim, args.critic_hidden_dims,
                                  args.orthogonal_init)
        self.target_critic = FusedCritic(obs_dim, action_dim, args.critic_hidden_dims, False)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.zeros(()))
        # rlkit cql.py starts log alpha' at 0, Cal-QL and CORL at 1.0: --log-alpha-prime-init
        self.log_alpha_prime = nn.Parameter(torch.tensor(float(args.log_alpha_prime_init)))


# ---- losses ------------------------------------------------------------------------------


def calibrate(q_pi: torch.Tensor, mc_returns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cal-QL's one change: max(Q(s,a), V_mu(s)) for policy actions. q_pi [E, B, N],
    mc_returns [B]. Returns (calibrated Q, bound rate = share of Q-values below V_mu)."""
    lower = mc_returns.reshape(1, -1, 1)
    bound_rate = (q_pi < lower).float().mean()
    return torch.maximum(q_pi, lower), bound_rate


def calql_logsumexp(q_rand: torch.Tensor, q_pi: torch.Tensor, logp_pi: torch.Tensor,
                    q_next_pi: torch.Tensor, logp_next_pi: torch.Tensor,
                    mc_returns: torch.Tensor | None, action_dim: int, temp: float = 1.0,
                    importance_sample: bool = True, q_data: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The pushed-down term of the CQL/Cal-QL critic loss, per critic and state: [E, B].

    q_*: [E, B, N], every action scored at the CURRENT state s; logp_*: [B, N] proposal
    log-densities (detached: the penalty never trains the actor). mc_returns None = CQL.
    Order of operations of the Cal-QL official code (`enable_calql` branch): the max with
    V_mu is taken on the RAW policy-action Q-values (pi(s) and pi(s') sets), BEFORE the
    importance-sampling correction; the random actions are never calibrated. (The paper's
    appendix listing takes the max after subtracting log pi and uses 4 samples of pi(s)
    only: the official code is followed.) Then random - log(0.5^d), pi - log pi, the three
    sets concatenated and T * logsumexp(./T) (App. F; log(3N) omitted as in the code)."""
    stats: dict[str, torch.Tensor] = {}
    if mc_returns is not None:
        # Cal-QL official: max with V_mu before the IS correction, policy actions only.
        q_pi, stats["bound_rate_pi"] = calibrate(q_pi, mc_returns)
        q_next_pi, stats["bound_rate_pi_next"] = calibrate(q_next_pi, mc_returns)
    if importance_sample:
        log_unif = action_dim * math.log(0.5)  # log density of Uniform(-1, 1)^d
        cat = torch.cat([q_rand - log_unif, q_pi - logp_pi.detach(),
                         q_next_pi - logp_next_pi.detach()], dim=-1)
    else:  # official `cql_importance_sample=False`: [Q_rand, Q_data, Q_pi(s'), Q_pi(s)]
        assert q_data is not None
        cat = torch.cat([q_rand, q_data.unsqueeze(-1), q_next_pi, q_pi], dim=-1)
    return temp * torch.logsumexp(cat / temp, dim=-1), stats


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
    (official `deterministic_backup`); max: max over N a' ~ pi(.|s') of min_j Qbar_j (Cal-QL)."""
    with torch.no_grad():
        next_obs = batch["next_obs"]
        if args.max_backup:
            rep = next_obs.unsqueeze(1).expand(-1, args.cql_n_actions, -1)
            a_next, logp_next = agent.actor(rep)  # [B, N, a], [B, N]
            q_next, idx = agent.target_critic(rep, a_next).min(0).values.max(-1)  # over N
            logp_next = logp_next.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        else:
            a_next, logp_next = agent.actor(next_obs)
            q_next = agent.target_critic(next_obs, a_next).min(0).values
        if args.backup_entropy:
            q_next = q_next - alpha * logp_next
        return batch["rewards"] + args.gamma * (1.0 - batch["dones"]) * q_next


def compute_losses(agent: Agent, batch: dict[str, torch.Tensor], args: Args, bc: bool,
                   cql_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The four losses, summed for ONE backward pass; each trains only its own parameters:

      actor_loss        -> actor (incl. log-std scalars): Q(s, a~pi) by critic(detach=True)
                           (critic weights detached, gradient through a only); alpha detached
      alpha_loss        -> log_alpha: log pi detached
      critic_loss       -> critic: Bellman target under no_grad (bellman_target); CQL
                           proposals under no_grad, their log pi detached (cql_term,
                           calql_logsumexp); alpha' detached (lagrange_terms)
      alpha_prime_loss  -> log_alpha_prime: the gap detached (lagrange_terms)
      target critic     -> nothing (requires_grad False; Polyak averaging in Trainer.step)

    Checked by tests/test_calql_losses.py::
    test_gradients_are_disjoint_and_the_penalty_never_trains_the_actor."""
    obs, actions = batch["obs"], batch["actions"]
    alpha = agent.log_alpha.exp()

    # ---- actor: SAC loss E[alpha log pi - min_j Q_j(s, a~pi)] (JaxCQL policy_loss) ------
    a_pi, logp_pi = agent.actor(obs)
    q_pi = agent.critic(obs, a_pi, detach=True).min(0).values  # [B], also for calibration
    if bc:  # optional BC warm start: E[alpha log pi - log pi(a_D|s)]
        actor_loss = (alpha.detach() * logp_pi - agent.actor.log_prob(obs, actions)).mean()
    else:
        actor_loss = (alpha.detach() * logp_pi - q_pi).mean()
    # Automatic entropy tuning: -log alpha * (log pi + target entropy) (SAC, JaxCQL).
    target_entropy = -agent.action_dim if args.target_entropy is None else args.target_entropy
    alpha_loss = -(agent.log_alpha * (logp_pi.detach() + target_entropy)).mean()

    # ---- critics: Bellman MSE (JaxCQL `mse_loss(q_pred, td_target)`, no 1/2) -----------
    target = bellman_target(agent, batch, args, alpha.detach())
    q_data = agent.critic(obs, actions)  # [E, B]
    bellman = ((q_data - target) ** 2).mean(-1)  # [E]
    penalty, alpha_prime_loss, cql_metrics = cql_term(agent, batch, args, q_data, cql_weight)
    critic_loss = bellman.sum() + penalty.sum()  # the penalty applies to each critic
    # calibration of the batch: share of states with Q(s, pi(s)) < V_mu(s), mean Q - V_mu
    gap_to_mc = q_pi.detach() - batch["mc_returns"]
    metrics = dict(bellman_loss=bellman.mean(), q_data=q_data.mean(), actor_loss=actor_loss,
                   alpha=alpha.detach(), log_pi=logp_pi.detach().mean(),
                   calib_below_share=(gap_to_mc < 0).float().mean(),
                   calib_q_minus_vmu=gap_to_mc.mean(), critic_loss=critic_loss.detach(),
                   **cql_metrics)
    total = actor_loss + alpha_loss + critic_loss + alpha_prime_loss
    return total, metrics


def cql_term(agent: Agent, batch: dict[str, torch.Tensor], args: Args, q_data: torch.Tensor,
             cql_weight: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Conservative penalty per critic [E], the alpha' loss (0 without Lagrange), metrics."""
    obs, next_obs = batch["obs"], batch["next_obs"]
    batch_size, n, action_dim = obs.shape[0], args.cql_n_actions, agent.action_dim
    rep_obs = obs.unsqueeze(1).expand(-1, n, -1)  # [B, N, d]
    with torch.no_grad():  # proposal samples: the penalty never trains the actor
        a_rand = torch.rand(batch_size, n, action_dim, device=obs.device) * 2 - 1
        a_cur, logp_cur = agent.actor(rep_obs)
        a_next, logp_next = agent.actor(next_obs.unsqueeze(1).expand(-1, n, -1))
    # One critic call for all 3N actions; pi(s') actions are scored at the CURRENT s
    # (official `cql_next_actions` evaluated with `observations`).
    q_all = agent.critic(rep_obs.repeat(1, 3, 1), torch.cat([a_rand, a_cur, a_next], 1))
    q_rand, q_cur, q_next = q_all.split(n, dim=-1)  # each [E, B, N]
    mc = batch["mc_returns"] if args.enable_calql else None
    push_down, metrics = calql_logsumexp(q_rand, q_cur, logp_cur, q_next, logp_next, mc,
                                         action_dim, args.cql_temp, args.cql_importance_sample,
                                         q_data)
    # CQL gap per critic: E_s[logsumexp] - E_D[Q(s,a)], clipped (official `cql_qf_diff`).
    gap = (push_down - q_data).clamp(args.cql_clip_diff_min, args.cql_clip_diff_max).mean(-1)
    metrics.update(cql_gap=gap.detach().mean(), q_ood=push_down.detach().mean())
    if args.lagrange:
        penalty, alpha_prime_loss, alpha_prime = lagrange_terms(
            gap, agent.log_alpha_prime, cql_weight, args.cql_tau, "calql")
        return penalty, alpha_prime_loss, dict(metrics, alpha_prime=alpha_prime.detach())
    # Fixed weight: alpha * gap (official `cql_min_q_weight * cql_qf_diff`).
    zero = torch.zeros((), device=obs.device)
    return cql_weight * gap, zero, dict(metrics, alpha_prime=zero + cql_weight)


# ---- training step -----------------------------------------------------------------------


class Trainer:
    """Optimizers and one gradient step with no host sync (metrics stay on the device until
    Run.log reads them). Its update counter ends the BC warm start; `start_online()` sets
    the fine-tuning phase's CQL weight (--cql-weight-online) at the phase switch."""

    def __init__(self, agent: Agent, args: Args, device: torch.device):
        self.agent, self.args = agent, args
        fused = device.type == "cuda"
        if fused:  # --tf32: TF32 matmuls on CUDA; default float32
            torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
        capturable = args.compile and fused  # Adam's step counters on the device (CUDA graph)
        adam = lambda params, lr: torch.optim.Adam(params, lr=lr, fused=fused or None,
                                                   foreach=None if fused else True,
                                                   capturable=capturable)
        self.optimizers = dict(
            actor=adam(agent.actor.parameters(), args.policy_lr),
            critic=adam(agent.critic.parameters(), args.qf_lr),
            alpha=adam([agent.log_alpha], args.policy_lr),
            alpha_prime=adam([agent.log_alpha_prime], args.alpha_prime_lr),
        )
        self.online = list(agent.critic.parameters())
        self.target = list(agent.target_critic.parameters())
        self.updates, self.fine_tuning, self.cql_weight = 0, False, args.cql_weight
        self.weight = torch.tensor(float(args.cql_weight), device=device)  # compiled
        update = lambda b, bc: calql_update(self, b, bc)
        self.compiled = CompiledStep(update, self.optimizers.values(), args.cudagraphs and fused) \
            if args.compile else None

    def start_online(self) -> None:
        """The phase switch: no BC warm start, the online CQL weight."""
        self.fine_tuning = True
        if self.args.cql_weight_online is not None:
            self.cql_weight = self.args.cql_weight_online
            self.weight.fill_(float(self.cql_weight))  # the compiled step's: same graph

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bc = not self.fine_tuning and self.updates < self.args.bc_steps
        self.updates += 1
        if self.compiled is not None:  # --compile: this update, compiled (calql_update)
            return self.compiled(batch, bc)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        total, metrics = compute_losses(self.agent, batch, self.args, bc, self.cql_weight)
        total.backward()
        for opt in self.optimizers.values():
            opt.step()
        with torch.no_grad():  # Polyak averaging of the target critics
            torch._foreach_lerp_(self.target, self.online, self.args.soft_target_update)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return dict(updates=self.updates,
                    optimizers={k: opt.state_dict() for k, opt in self.optimizers.items()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])


# ---- compiled step (--compile / --cudagraphs): not needed to read the algorithm ---------
# Trainer.step's update as one function, compiled (and CUDA-graphed) by CompiledStep (Part
# III); the CQL weight a tensor (the phase switch changes its value, not the graph)


def calql_update(t: Trainer, batch: dict[str, torch.Tensor], bc: bool
                 ) -> dict[str, torch.Tensor]:
    total, metrics = compute_losses(t.agent, batch, t.args, bc, t.weight)
    total.backward()
    for opt in t.optimizers.values():
        opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(t.target, t.online, t.args.soft_target_update)
    return metrics


# ---- replay buffer -----------------------------------------------------------------------

KEYS = ("obs", "next_obs", "actions", "rewards", "dones", "mc_returns")


class ReplayBuffer:
    """Transitions (KEYS) as tensors on the training device, sampled uniformly there. The
    offline buffer holds the dataset; the online one is preallocated (`capacity`) and takes
    whole trajectories, each with its MC returns, once they have ended. Checkpoints hold
    the online contents; the offline data is reloaded from the dataset."""

    def __init__(self, data: dict[str, np.ndarray], device: torch.device, seed: int,
                 capacity: int = 0):
        self.size, self.online = 0, capacity > 0
        self.capacity = capacity or len(data["obs"])
        self.data = {k: torch.zeros((self.capacity, *data[k].shape[1:]), device=device)
                     for k in KEYS}
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.add_trajectory(data)

    def add_trajectory(self, traj: dict[str, np.ndarray]) -> None:
        n = len(traj["obs"])
        if self.size + n > self.capacity:
            fail(f"online buffer full ({self.capacity} transitions)")
        for k in KEYS:
            self.data[k][self.size:self.size + n] = torch.as_tensor(traj[k])
        self.size += n

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, self.size, (batch_size,), device=self.data["obs"].device,
                            generator=self.generator)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict[str, Any]:
        data = {k: v[:self.size].cpu() for k, v in self.data.items()} if self.online else None
        return dict(size=self.size, data=data, generator=self.generator.get_state())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.online:
            self.size = state["size"]
            for k, v in state["data"].items():
                self.data[k][:self.size] = v.to(self.data[k].device)
        self.generator.set_state(state["generator"])


def mixed_batch(offline: ReplayBuffer, online: ReplayBuffer | None, batch_size: int,
                mixing_ratio: float) -> dict[str, torch.Tensor]:
    """Online phase: round(batch * mixing_ratio) offline transitions, the rest online
    (Cal-QL official `concatenate_batches`; paper: 128 + 128). Pre-training: all offline."""
    n_off = batch_size if online is None or online.size == 0 else round(batch_size * mixing_ratio)
    if n_off in (0, batch_size):  # one source only
        return (offline if n_off else online).sample(batch_size)
    a, b = offline.sample(n_off), online.sample(batch_size - n_off)
    return {k: torch.cat([a[k], b[k]]) for k in KEYS}


# ---- evaluation, and online episodes in the same env with the same transform -------------


def make_eval_env(spec: dict[str, Any]) -> gym.Env:
    """The env of an eval_env spec (config.json's `eval_env`; online episodes use it too):
    built from its recorded entry point where it has one, else by its registered id."""
    register_robotics_envs()
    kwargs = copy.deepcopy(spec["kwargs"])
    try:
        if spec.get("entry_point"):
            return gym.make(gym.envs.registration.EnvSpec(
                id=spec["id"], entry_point=spec["entry_point"],
                max_episode_steps=spec["max_episode_steps"], kwargs=kwargs))
        return gym.make(spec["id"], max_episode_steps=spec["max_episode_steps"], **kwargs)
    except (gym.error.UnregisteredEnv, ModuleNotFoundError) as exc:
        fail(f"cannot build the evaluation env {spec['id']} ({exc}); Adroit, AntMaze, Kitchen "
             "and PointMaze envs need gymnasium-robotics (pip install gymnasium-robotics)")


def env_step(env: gym.Env, action: np.ndarray, args: Args
             ) -> tuple[Any, float, bool, bool, bool | None]:
    """One env step -> (obs, raw reward, terminal, time-limit truncation, success or None
    when the env reports no success). Binary tasks: reward success - 1, and the episode
    ends, as a terminal, at success."""
    obs, reward, terminated, truncated, info = env.step(action)
    success = bool(info["success"]) if "success" in info else None
    if args.binary:
        # Binary Adroit as the official mj_envs fork (nakamotoo/mj_envs, `reward_type=
        # "binary"`: r = goal_achieved - 1) and Cal-QL's sampler (JaxCQL/sampler.py ends the
        # episode when goal_achieved). The env's own `terminated` is dropped: the fork's
        # pen-binary-v0 never ends early (early_termination=False), door/relocate never do.
        reward, terminated = float(bool(success)) - 1.0, bool(success)
    return obs, float(reward), bool(terminated), bool(truncated) and not terminated, success


def collect_trajectory(agent: Agent, env: gym.Env, tf: Transform, args: Args,
                       device: torch.device, seed: int) -> tuple[dict[str, np.ndarray], bool]:
    """One whole trajectory with the current STOCHASTIC policy (Cal-QL official sampler),
    from env.reset(seed=seed); its MC returns are computed once it has ended."""
    obs, _ = env.reset(seed=seed)
    rows, done, success = [], False, False
    while not done:
        x = torch.as_tensor(tf.obs(flatten_obs(obs)), device=device).reshape(1, -1)
        with torch.no_grad():
            action = agent.actor(x)[0][0].cpu().numpy()
        obs, reward, terminal, truncated, ok = env_step(env, tf.to_env_action(action), args)
        rows.append((x[0].cpu().numpy(), tf.obs(flatten_obs(obs)), action, tf.reward(reward),
                     float(terminal)))
        success, done = success or bool(ok), terminal or truncated
    columns = zip(*rows, strict=True)  # obs, next_obs, actions, rewards, dones: KEYS[:5]
    traj = {k: np.asarray(v, np.float32) for k, v in zip(KEYS[:5], columns, strict=True)}
    traj["mc_returns"] = mc_returns(traj["rewards"], traj["dones"], args.gamma,
                                    args.sparse_reward, float(tf.reward(args.reward_neg)))
    return traj, success


def evaluate(agent: Agent, env: gym.Env, tf: Transform, args: Args, info: dict[str, Any],
             device: torch.device) -> dict[str, float | None]:
    """Deterministic policy for `eval_episodes` episodes with fixed seeds; binary episodes
    end at success; success rate = share of episodes that reach success at any step.

    score: 100 * success rate where the env reports success (the papers' metric on binary and
    goal-reaching tasks), else the normalized return (only where the dataset's reference
    scores apply to the evaluated return, see eval_env_description), else the mean return.
    return_mean: the raw env return (binary: the relabelled {-1, 0} return); length_mean:
    mean episode length (the horizon bounds it; success ends it).
    value_gap: min_j Q_j(s0, pi(s0)) minus the discounted (scaled) return obtained;
    negative = conservative."""
    episodes, has_success = [], False
    for i in range(args.eval_episodes):
        obs, _ = env.reset(seed=10_000 * (args.seed + 1) + i)
        done, ep_return, disc_return, discount, t, success = False, 0.0, 0.0, 1.0, 0, False
        while not done:
            x = torch.as_tensor(tf.obs(flatten_obs(obs)), device=device).reshape(1, -1)
            action = agent.actor.act_deterministic(x)
            if t == 0:
                with torch.no_grad():
                    pred = agent.critic(x, action).min(0).values.item()
            obs, reward, terminal, truncated, ok = env_step(
                env, tf.to_env_action(action[0].cpu().numpy()), args)
            has_success, success = has_success or ok is not None, success or bool(ok)
            ep_return, disc_return = ep_return + reward, disc_return + discount * float(
                tf.reward(reward))
            discount, done, t = discount * args.gamma, terminal or truncated, t + 1
        episodes.append((ep_return, t, pred - disc_return, success))
    returns, lengths, gaps, successes = zip(*episodes, strict=True)
    ret = float(np.mean(returns))
    lo, hi = info.get("ref_min_score"), info.get("ref_max_score")
    norm = 100.0 * (ret - lo) / (hi - lo) if lo is not None and hi is not None else None
    rate = float(np.mean(successes)) if has_success else None
    score = 100.0 * rate if rate is not None else (norm if norm is not None else ret)
    return dict(score=score, success_rate=rate, return_mean=ret, normalized_score=norm,
                length_mean=float(np.mean(lengths)), value_gap=float(np.mean(gaps)))


# ---- main loop ---------------------------------------------------------------------------


class Counters:
    """Loop counters, one of Run's checkpointed parts: the phase (offline | online), online
    env steps and trajectories so far. Online episode k resets its env with its own seed, so
    a resumed run continues bit-identically on CPU."""

    def __init__(self):
        self.phase, self.env_steps, self.episodes = "offline", 0, 0

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


def main(args: Args) -> dict[str, Any]:
    """Offline pre-training, then online fine-tuning, from complete Args (parse_args, or
    preset_args + dataclasses.replace); returns the summary."""
    check_args(args)
    device = pick_device(args.device)
    args = replace(args, run_dir=args.resume or args.run_dir or default_run_dir(args))
    torch.manual_seed(args.seed)  # all training randomness is torch's; envs are seeded
    data = load_data(args)
    obs_dim, action_dim = data.info["obs_dim"], data.info["action_dim"]
    offline = ReplayBuffer(data.transitions, device, args.seed)
    online = ReplayBuffer({k: v[:0] for k, v in data.transitions.items()}, device,
                          args.seed + 1, args.online_steps + data.eval_env["max_episode_steps"])
    agent = Agent(obs_dim, action_dim, args).to(device)
    trainer = Trainer(agent, args, device)
    env, eval_env = make_eval_env(data.eval_env), make_eval_env(data.eval_env)
    loop = Counters()
    run = Run(args, dict(agent=agent, trainer=trainer, offline=offline, online=online,
                         loop=loop), data.info, data.eval_env, device)
    evaluate_policy = lambda: evaluate(agent, eval_env, data.tf, args, data.info, device)
    name = f"{'Cal-QL' if args.enable_calql else 'CQL'} {args.env}"
    # ---- offline pre-training: CQL / Cal-QL updates on offline batches -----------------
    if not run.history:  # the initial policy, as the official loop's epoch 0
        run.evaluate_and_checkpoint(0, evaluate_policy, phase="offline", env_steps=0)
    for step in tqdm(range(run.step + 1, args.offline_steps + 1), desc=f"{name} offline",
                     disable=not args.progress, dynamic_ncols=True):
        metrics = trainer.step(offline.sample(args.batch_size))
        if run.due(step, args.log_every, args.offline_eval_every, last=args.offline_steps):
            run.log(step, metrics)
        if run.due(step, args.offline_eval_every, last=args.offline_steps):  # last: offline score
            run.evaluate_and_checkpoint(step, evaluate_policy, phase="offline", env_steps=0)
        run.stop_if_signalled(step)

    # ---- online fine-tuning (Cal-QL official loop): a whole trajectory with the stochastic
    # policy, stored with its MC returns, then len(traj) x UTD updates on mixed batches.
    # An env episode cannot be checkpointed, so a stop signal is honoured at the next
    # trajectory boundary, with every stored trajectory trained on. After a hard kill the
    # run resumes from the last evaluation and re-collects the trajectories since then.
    loop.phase, step = "online", run.step
    trainer.start_online()
    bar = tqdm(total=args.online_steps, initial=min(loop.env_steps, args.online_steps),
               desc=f"{name} online", disable=not args.progress, dynamic_ncols=True)
    while loop.env_steps < args.online_steps:
        traj, _ = collect_trajectory(agent, env, data.tf, args, device,
                                     seed=1_000_000 * (args.seed + 1) + loop.episodes)
        online.add_trajectory(traj)
        n, before = len(traj["rewards"]), loop.env_steps
        loop.env_steps, loop.episodes = before + n, loop.episodes + 1
        for _ in range(n * args.utd):
            step += 1
            metrics = trainer.step(mixed_batch(offline, online, args.batch_size,
                                               args.mixing_ratio))
            if run.due(step, args.log_every):
                run.log(step, metrics)
        bar.update(n)
        # evaluate once each time the env steps pass a multiple of --eval-every, and at the end
        if loop.env_steps // args.eval_every > before // args.eval_every or \
                loop.env_steps >= args.online_steps:
            run.log(step, metrics)
            run.evaluate_and_checkpoint(step, evaluate_policy, phase="online",
                                        env_steps=loop.env_steps)
        run.stop_if_signalled(step)
    for resource in (bar, env, eval_env):
        resource.close()
    return run.finish(dict(final_summary(run.history), gradient_steps=step,
                           env_steps=loop.env_steps, episodes=loop.episodes))


def final_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Offline score (end of pre-training), final score, cumulative regret (mean over online
    evaluations of 1 - success rate), largest drop below the pre-trained score, calibration."""
    offline = [r for r in history if r["phase"] == "offline"]
    online = [r for r in history if r["phase"] == "online"]
    pre, last = offline[-1], history[-1]
    rates = [r["success_rate"] for r in online if r["success_rate"] is not None]
    return dict(
        offline_score=pre["score"], offline_success_rate=pre["success_rate"],
        final_score=last["score"], final_success_rate=last["success_rate"],
        final_return=last["return_mean"], value_gap=last["value_gap"],
        cumulative_regret=float(np.mean([1.0 - s for s in rates])) if rates else None,
        max_drop_below_offline=max(0.0, pre["score"] - min(r["score"] for r in online))
        if online else None,
        calib_below_share=last.get("calib_below_share"),
        calib_q_minus_vmu=last.get("calib_q_minus_vmu"),
        calib_below_share_offline_end=pre.get("calib_below_share"))


# ======================================================================================
# Part II: datasets and presets
# ======================================================================================


# ---- Minari loading: episodes to transitions with MC returns, the evaluation env ---------


def load_minari_dataset(dataset_id: str):
    """Load a Minari dataset: local copy first, else download (needs network)."""
    try:
        import minari
    except ImportError:
        fail("loading a Minari dataset needs the package minari (pip install minari)")
    with contextlib.suppress(FileNotFoundError):
        return minari.load_dataset(dataset_id)
    if dataset_id.startswith("local/"):  # built by this project, never downloaded
        fail(f"dataset {dataset_id} not found; build it with: "
             f"python benchmark/datasets.py {dataset_id}")
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as exc:  # network errors come in many types
        fail(f"dataset {dataset_id} is not in {os.environ.get('MINARI_DATASETS_PATH', '~/.minari')}"
             f" and could not be downloaded ({type(exc).__name__}); on a machine with network "
             f"run `minari download {dataset_id}` and copy the datasets folder here")


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


def register_robotics_envs() -> None:
    """Register gymnasium-robotics' envs (Adroit, AntMaze, Kitchen, PointMaze) when it is
    installed; the generic path (any other gymnasium env) does not need it."""
    with contextlib.suppress(ImportError):
        import gymnasium_robotics
        gym.register_envs(gymnasium_robotics)


def step_success(infos: dict | None, steps: int) -> np.ndarray | None:
    """Per-step `success` flags [T] from Minari episode infos, or None if not recorded
    (Minari's collectors store the reset info first: T+1 entries, the last T are the steps)."""
    if not infos or "success" not in infos:
        return None
    success = np.asarray(infos["success"]).astype(bool).reshape(-1)
    if len(success) not in (steps, steps + 1):
        fail(f"'success' info has {len(success)} entries for {steps} steps")
    return success[-steps:]


def mc_returns(rewards: np.ndarray, dones: np.ndarray, gamma: float, sparse: bool,
               reward_neg: float) -> np.ndarray:
    """Monte-Carlo return-to-go of ONE trajectory on its scaled rewards (Cal-QL official
    `calc_return_to_go`): G_t = r_t + gamma * G_{t+1} * (1 - done_t), G_T = 0.

    A trajectory cut by a time limit is not terminal for the TD target, but its MC return
    only sums the rewards that were observed (the tail is 0), as in the official code.
    All-failure rule (sparse tasks): if every reward equals the scaled failure reward r_neg,
    every step gets r_neg / (1 - gamma), the value of never succeeding."""
    rewards = np.asarray(rewards, np.float64)
    if len(rewards) == 0:
        return np.zeros(0, np.float32)
    if sparse and np.all(rewards == reward_neg):
        return np.full(len(rewards), reward_neg / (1.0 - gamma), np.float32)
    out = np.zeros(len(rewards), np.float64)
    following = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        following = rewards[t] + gamma * following * (1.0 - float(dones[t]))
        out[t] = following
    return out.astype(np.float32)


def segment_mc_returns(rewards: np.ndarray, dones: np.ndarray, gamma: float, sparse: bool,
                       reward_neg: float) -> np.ndarray:
    """MC returns of one stored trajectory, computed per segment ending at a terminal.

    The official loader for D4RL data (`qlearning_dataset_and_calc_mc` in Cal-QL
    JaxCQL/replay_buffer.py) starts a new trajectory after every terminal, so the all-failure
    rule applies to each segment: in AntMaze the steps after the last goal visit form an
    all-failure segment. For binary Adroit trajectories, which end at a success, this equals
    `mc_returns` on the whole trajectory (as `truncate_traj` computes it)."""
    ends = [int(i) + 1 for i in np.flatnonzero(dones)]
    if not ends or ends[-1] != len(rewards):
        ends.append(len(rewards))
    out, start = [], 0
    for end in ends:
        out.append(mc_returns(rewards[start:end], dones[start:end], gamma, sparse, reward_neg))
        start = end
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def episode_transitions(ep, args: Args) -> dict[str, np.ndarray] | None:
    """One Minari episode -> raw transitions (rewards relabelled if binary), or None if a
    binary trajectory without success is dropped. `reached`: the episode has a success step
    (from the `success` infos; None when the dataset records none)."""
    obs = flatten_obs(ep.observations)
    obs = obs[:, None] if obs.ndim == 1 else obs
    steps = len(ep.actions)
    if len(obs) != steps + 1:
        fail(f"episode has {len(obs)} observations for {steps} actions (expected T+1)")
    rewards = np.asarray(ep.rewards, np.float32).reshape(steps)
    terms = np.asarray(ep.terminations, np.float32).reshape(steps)
    success = step_success(getattr(ep, "infos", None), steps)
    if (args.binary or args.goal_terminals) and success is None:
        fail(f"dataset {args.dataset_id} has no per-step 'success' info; --env {args.env} "
             f"needs it ({'binary task' if args.binary else 'goal terminals'}; Minari's "
             "D4RL/<task>/*-v2 and D4RL/antmaze/*-v1 datasets record it)")
    if args.binary:
        if (kept := binary_relabel(success)) is None:
            return None
        (rewards, terms), steps = kept, len(kept[0])
    elif args.goal_terminals:
        # D4RL antmaze convention (D4RL #199): terminal = 1 exactly where the goal reward is
        # received; Cal-QL reads these terminals (replay_buffer.py
        # `get_d4rl_dataset_with_mc_calculation`: dones = dataset['terminals']). Minari's
        # AntMaze data is a continuing task (never terminated); its reward 1 and `success`
        # info are the same event (distance to the goal <= 0.45).
        terms = np.maximum(terms, success.astype(np.float32))
    actions = np.asarray(ep.actions, np.float32).reshape(len(ep.actions), -1)
    reached = None if success is None else bool(success[:steps].any())
    return dict(obs=obs[:steps], next_obs=obs[1:steps + 1], actions=actions[:steps],
                rewards=rewards, dones=terms, reached=reached)


@dataclass
class Data:
    """What a run needs from its dataset."""

    transitions: dict[str, np.ndarray]  # KEYS, transformed: the offline replay buffer
    tf: Transform  # applied identically to online and evaluation steps
    info: dict[str, Any]  # dataset facts for config.json
    eval_env: dict[str, Any]  # JSON spec of the online/evaluation env (make_eval_env)


def load_data(args: Args) -> Data:
    """Dataset id -> offline transitions with MC returns, transform, dataset facts and the
    evaluation env's spec."""
    dataset = load_minari_dataset(args.dataset_id)
    if not isinstance(dataset.action_space, gym.spaces.Box):
        fail(f"dataset {args.dataset_id} has a {type(dataset.action_space).__name__} action "
             "space; Cal-QL needs continuous (Box) actions (cql_qrdqn_atari.py trains "
             "discrete ones)")
    episodes, reached, total = [], [], 0
    for ep in tqdm(dataset.iterate_episodes(), total=dataset.total_episodes, leave=False,
                   desc=f"loading {args.dataset_id}", disable=not args.progress):
        total += 1
        tr = episode_transitions(ep, args)
        reached.append(False if tr is None else tr.pop("reached"))  # None: binary, no success
        if tr is not None and len(tr["rewards"]):
            episodes.append(tr)
    if not episodes:
        fail(f"dataset {args.dataset_id}: none of its {total} trajectories reaches success; "
             "nothing is left after dropping failures")
    raw = {k: np.concatenate([e[k] for e in episodes]) for k in episodes[0]}
    check_finite(raw, args.dataset_id)
    low = dataset.action_space.low.astype(np.float32)
    high = dataset.action_space.high.astype(np.float32)
    dim = raw["obs"].shape[1]
    mean, std = ((raw["obs"].mean(0), raw["obs"].std(0) + 1e-3) if args.normalize_states
                 else (np.zeros(dim, np.float32), np.ones(dim, np.float32)))
    tf = Transform(mean.astype(np.float32), std.astype(np.float32), (high - low) / 2,
                   (high + low) / 2, float(args.reward_scale), float(args.reward_bias))
    r_neg = float(tf.reward(args.reward_neg))
    # MC returns per trajectory, on the scaled rewards (Cal-QL official order).
    mc = [segment_mc_returns(tf.reward(e["rewards"]), e["dones"], args.gamma,
                             args.sparse_reward, r_neg) for e in episodes]
    data = dict(obs=tf.obs(raw["obs"]), next_obs=tf.obs(raw["next_obs"]),
                actions=tf.from_env_action(raw["actions"]),
                rewards=np.asarray(tf.reward(raw["rewards"]), np.float32),
                dones=raw["dones"].astype(np.float32), mc_returns=np.concatenate(mc))
    eval_env, comparable = eval_env_description(dataset, args)
    meta = dataset.storage.metadata
    info = dict(dataset_id=args.dataset_id, episodes_in_dataset=total,
                episodes_kept=len(episodes), transitions=len(data["obs"]), obs_dim=dim,
                action_dim=data["actions"].shape[1], horizon=eval_env["max_episode_steps"],
                # share of the dataset's episodes with a success step (from the `success`
                # infos, before any is dropped); None: the dataset records no success
                success_in_data=None if None in reached else float(np.mean(reached)),
                terminals_in_data=int(data["dones"].sum()),
                # reference scores only where the evaluated return is the one they refer to
                **{k: float(meta[k]) if comparable and meta.get(k) is not None else None
                   for k in ("ref_min_score", "ref_max_score")})
    return Data(data, tf, info, eval_env)


def jsonable(value: Any) -> Any:
    """Spec kwargs as plain JSON values (tuples -> lists, numpy -> Python)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist")
                                 else str(v)))


def eval_env_description(dataset, args: Args) -> tuple[dict[str, Any], bool]:
    """{id, max_episode_steps, kwargs, entry_point} of the env that online episodes and
    evaluation use, and whether the dataset's reference scores apply to its returns.

    AntMaze: built from the DATA's env spec (antmaze_eval_kwargs). Others: the dataset's eval
    env spec (else its env spec) with `--horizon` steps (Adroit: D4RL's 100 for pen; Minari's
    spec says 200 since Minari #286, and pen episodes are 100-200 steps, #303), or the
    spec's own limit where --horizon is None (generic preset)."""
    data_spec = dataset.env_spec
    # Minari 0.5 parses the eval spec on load but exposes it only through
    # recover_environment(eval_env=True); this is the same parsed EnvSpec.
    spec = getattr(dataset, "_eval_env_spec", None) or data_spec
    if spec is None:
        fail(f"dataset {args.dataset_id} records no environment to evaluate in")
    horizon = args.horizon or spec.max_episode_steps
    if not horizon:
        fail(f"dataset {args.dataset_id}: its env spec has no max_episode_steps; set --horizon")
    kwargs = dict(spec.kwargs)
    comparable = not args.binary  # relabelled {-1, 0} returns are not D4RL's dense returns
    if data_spec is not None and data_spec.id.startswith("AntMaze"):
        spec, kwargs = data_spec, antmaze_eval_kwargs(dict(data_spec.kwargs), data_spec.id)
        comparable = False  # Minari's antmaze references score the continuing eval env
    return dict(id=spec.id, max_episode_steps=horizon, kwargs=jsonable(kwargs),
                entry_point=str(spec.entry_point)), comparable


# ---- dataset families: what the presets load, how it differs from the paper's -----------
# - Adroit binary (`pen|door|relocate-binary`): `D4RL/<task>/cloned-v2` (D4RL's human demos
#   plus BC rollouts), re-labelled `r = success - 1` from its `success` infos. The official
#   data, AWAC's 25 demos plus 500 BC trajectories per task (Cal-QL README, `JaxCQL/
#   replay_buffer.py get_hand_dataset_with_mc_calculation`), is not on Minari; cloned-v2 is the
#   closest public data. D4RL's horizons (pen 100, door/relocate 200); success rate, no
#   normalized score (D4RL's reference scores are dense returns, not {-1, 0} ones).
# - AntMaze (`antmaze-<maze>`): `D4RL/antmaze/<maze>-v1`, never terminated: goal-reward steps
#   become terminals (D4RL's antmaze `terminals`, which Cal-QL reads); evaluated in the DATA's
#   maze with fixed start and goal cells, ending at the goal, score = success rate x 100.
# - Any other continuous-action dataset: `--dataset-id X` alone, the generic preset.


# ---- family: Adroit binary (pen, door, relocate) -----------------------------------------
def binary_relabel(success: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Adroit binary task (Cal-QL): r = success - 1 in {-1, 0} replaces the dense reward; a
    success step is terminal; a trajectory with no success is dropped (None); a kept one is
    cut after its last success (so it ends at a terminal). Returns the kept prefix's
    (rewards, terminals); the caller cuts observations and actions to the same length."""
    if not success.any():
        return None
    flags = success[:int(np.flatnonzero(success)[-1]) + 1].astype(np.float32)
    return flags - 1.0, flags


# ---- family: AntMaze ---------------------------------------------------------------------
# AntMaze start and goal cells (row, col) in Minari's maze maps, used in the DATA's maze.
# umaze: the r/g cells of the antmaze-umaze data map (minari-dataset-generation-scripts
# scripts/antmaze/create_antmaze_dataset.py), which place start and goal as D4RL's
# antmaze-umaze-v2 (goal 8 m "above" the start, the wall between); umaze-diverse data uses
# the same walls and has no r/g cells. medium/large: the r/g cells of the script's
# EVAL_ENV_MAPS, whose walls equal the data's. The umaze EVAL_ENV_MAPS (the datasets' eval
# env spec) is the MIRROR image of the data maze (Minari #304): not used.
ANTMAZE_CELLS = {"UMaze": ((3, 1), (1, 1)), "Medium": ((1, 1), (6, 6)),
                 "Large": ((1, 1), (7, 9))}


def maze_walls(maze_map: list[list[Any]]) -> list[list[int]]:
    """1 = wall, 0 = free (reset/goal/combined cells are free)."""
    return [[1 if cell == 1 else 0 for cell in row] for row in maze_map]


def antmaze_eval_kwargs(data_kwargs: dict[str, Any], env_id: str) -> dict[str, Any]:
    """Evaluation env kwargs for AntMaze data: the data's maze walls, the fixed start and
    goal cells of ANTMAZE_CELLS, and an episodic task (terminated at the goal, as D4RL's
    antmaze eval envs, `eval=True`, and the official Cal-QL loop see it)."""
    kind = env_id.split("_")[1].split("-")[0]  # AntMaze_UMaze-v4 -> UMaze
    if kind not in ANTMAZE_CELLS:
        fail(f"AntMaze env {env_id}: no start/goal cells for this maze (known: "
             f"{', '.join(ANTMAZE_CELLS)})")
    walls = maze_walls(data_kwargs["maze_map"])
    (sr, sc), (gr, gc) = ANTMAZE_CELLS[kind]
    if walls[sr][sc] or walls[gr][gc]:
        fail(f"AntMaze env {env_id}: the start/goal cells are walls in the data's maze")
    walls[sr][sc], walls[gr][gc] = "r", "g"
    return dict(data_kwargs, maze_map=walls, continuing_task=False, reset_target=False)


# ---- presets, each value with its source; the command line -------------------------------
ADROIT_SH = "Cal-QL scripts/run_adroit.sh"
ANTMAZE_SH = "Cal-QL scripts/run_antmaze.sh"
JAXCQL = "Cal-QL JaxCQL/conservative_sac.py get_default_config"
MAIN_PY = "Cal-QL JaxCQL/conservative_sac_main.py"
LOCAL = "project choice for the local CPU task (benchmark/datasets.py), not a paper setting"

# Values shared by every preset (the Args defaults), with their sources.
COMMON: dict[str, tuple[Any, str]] = {
    "batch_size": (256, f"{MAIN_PY} FLAGS batch_size=256; paper App. D: 256"),
    "mixing_ratio": (0.5, f"{ADROIT_SH} / {ANTMAZE_SH} --mixing_ratio=0.5"),
    "utd": (1, f"{MAIN_PY} FLAGS online_utd_ratio=1"),
    "orthogonal_init": (True, f"{MAIN_PY} FLAGS orthogonal_init=True"),
    "log_std_affine": (True, "Cal-QL JaxCQL/model.py TanhGaussianPolicy: learnable "
                       "`Scalar(log_std_multiplier=1.0)`, `Scalar(log_std_offset=-1.0)`"),
    "gamma": (0.99, f"{JAXCQL} discount=0.99"),
    "policy_lr": (1e-4, f"{JAXCQL} policy_lr=1e-4"),
    "qf_lr": (3e-4, f"{JAXCQL} qf_lr=3e-4"),
    "soft_target_update": (5e-3, f"{JAXCQL} soft_target_update_rate=5e-3"),
    "target_entropy": (None, f"{MAIN_PY}: target_entropy >= 0 becomes -|A| (None here)"),
    "bc_steps": (0, "Cal-QL code has no BC warm start"),
    "backup_entropy": (False, f"{JAXCQL} backup_entropy=False"),
    "max_backup": (True, f"{JAXCQL} cql_max_target_backup=True"),
    "enable_calql": (True, f"{ADROIT_SH} / {ANTMAZE_SH} --enable_calql=True"),
    "cql_weight_online": (None, f"{MAIN_PY} FLAGS cql_min_q_weight_online=-1.0 (unchanged)"),
    "cql_n_actions": (10, f"{JAXCQL} cql_n_actions=10"),
    "cql_importance_sample": (True, f"{JAXCQL} cql_importance_sample=True"),
    "cql_temp": (1.0, f"{JAXCQL} cql_temp=1.0"),
    "cql_clip_diff_min": (-math.inf, f"{JAXCQL} cql_clip_diff_min=-inf"),
    "cql_clip_diff_max": (math.inf, f"{JAXCQL} cql_clip_diff_max=inf"),
    "alpha_prime_lr": (3e-4, f"{JAXCQL}: log_alpha_prime's optimizer uses qf_lr"),
    "log_alpha_prime_init": (1.0, "Cal-QL JaxCQL/conservative_sac.py `Scalar(1.0)` for "
                             "log_alpha_prime; CORL algorithms/finetune/cal_ql.py the same"),
    "cql_tau": (1.0, f"{JAXCQL} cql_target_action_gap=1.0 (unused without Lagrange)"),
}

# Adroit binary tasks (pen, door, relocate).
ADROIT: dict[str, tuple[Any, str]] = {
    "offline_steps": (20_000, f"{ADROIT_SH} --n_pretrain_epochs=20 x "
                      "--n_train_step_per_epoch_offline=1000"),
    "offline_eval_every": (2_000, f"{ADROIT_SH} --offline_eval_every_n_epoch=2 (x 1000 steps)"),
    "eval_every": (2_000, f"{ADROIT_SH} --online_eval_every_n_env_steps=2000"),
    "eval_episodes": (20, f"{ADROIT_SH} --eval_n_trajs=20"),
    "actor_hidden_dims": ((512, 512), f"{ADROIT_SH} --policy_arch=512-512"),
    "critic_hidden_dims": ((512, 512, 512), f"{ADROIT_SH} --qf_arch=512-512-512"),
    "cql_weight": (1.0, f"{ADROIT_SH} --cql_min_q_weight=1.0"),
    "lagrange": (False, f"{JAXCQL} cql_lagrange=False (not set by {ADROIT_SH})"),
    "binary": (True, "Cal-QL JaxCQL/replay_buffer.py get_hand_dataset_with_mc_calculation: "
               "r = goal_achieved - 1, cut after the last success, failures dropped"),
    "goal_terminals": (False, "binary relabelling makes each success step terminal"),
    "reward_scale": (10.0, f"{ADROIT_SH} --reward_scale=10.0"),
    "reward_bias": (5.0, f"{ADROIT_SH} --reward_bias=5.0"),
    "sparse_reward": (True, "Cal-QL JaxCQL/replay_buffer.py calc_return_to_go(is_sparse_reward"
                      "=True) for adroit-binary"),
    "reward_neg": (-1.0, "Cal-QL JaxCQL/replay_buffer.py ENV_CONFIG['adroit-binary'] "
                   "reward_neg=-1.0"),
}
_MJ_ENVS = "nakamotoo/mj_envs hand_manipulation_suite/__init__.py"
_CLONED = "closest public data to AWAC's demos + BC data (module docstring)"
TASKS: dict[str, dict[str, tuple[Any, str]]] = {
    "pen-binary": {
        "dataset_id": ("D4RL/pen/cloned-v2", _CLONED),
        # --online-steps 300000 gives the paper's number
        "online_steps": (200_000, f"{ADROIT_SH} max_online_env_steps=2e5 for pen (paper "
                         "App. D.3 says 300k: the official script is followed)"),
        "horizon": (100, f"{_MJ_ENVS} pen-binary-v0 max_episode_steps=100 (D4RL pen: 100)"),
    },
    "door-binary": {
        "dataset_id": ("D4RL/door/cloned-v2", _CLONED),
        "online_steps": (1_000_000, f"{ADROIT_SH} max_online_env_steps=1e6 for door"),
        "horizon": (200, f"{_MJ_ENVS} door-binary-v0 max_episode_steps=200"),
    },
    "relocate-binary": {
        "dataset_id": ("D4RL/relocate/cloned-v2", _CLONED),
        "online_steps": (1_000_000, f"{ADROIT_SH} max_online_env_steps=1e6 for relocate"),
        "horizon": (200, f"{_MJ_ENVS} relocate-binary-v0 max_episode_steps=200"),
    },
}

# AntMaze: all six mazes.
ANTMAZE: dict[str, tuple[Any, str]] = {
    "offline_steps": (1_000_000, f"{ANTMAZE_SH} --n_pretrain_epochs=1000 x "
                      "--n_train_step_per_epoch_offline=1000"),
    "online_steps": (1_000_000, f"{ANTMAZE_SH} --max_online_env_steps=1e6"),
    "offline_eval_every": (50_000, f"{ANTMAZE_SH} --offline_eval_every_n_epoch=50 (x 1000)"),
    "eval_every": (2_000, f"{ANTMAZE_SH} --online_eval_every_n_env_steps=2000"),
    "eval_episodes": (20, f"{ANTMAZE_SH} --eval_n_trajs=20"),
    "actor_hidden_dims": ((256, 256), f"{ANTMAZE_SH} --policy_arch=256-256"),
    "critic_hidden_dims": ((256, 256, 256, 256), f"{ANTMAZE_SH} --qf_arch=256-256-256-256"),
    "cql_weight": (5.0, f"{ANTMAZE_SH} --cql_min_q_weight=5.0"),
    "lagrange": (True, f"{ANTMAZE_SH} --cql.cql_lagrange=True"),
    "cql_tau": (0.8, f"{ANTMAZE_SH} --cql.cql_target_action_gap=0.8"),
    "binary": (False, "AntMaze rewards are already sparse {0, 1}"),
    "goal_terminals": (True, "Cal-QL JaxCQL/replay_buffer.py reads D4RL antmaze `terminals` "
                       "(1 where the goal reward is received, D4RL #199)"),
    "reward_scale": (10.0, f"{ANTMAZE_SH} --reward_scale=10.0"),
    "reward_bias": (-5.0, f"{ANTMAZE_SH} --reward_bias=-5"),
    "sparse_reward": (True, "Cal-QL JaxCQL/replay_buffer.py is_sparse_reward=True for antmaze"),
    "reward_neg": (0.0, "Cal-QL JaxCQL/replay_buffer.py ENV_CONFIG['antmaze'] reward_neg=0.0"),
}
MAZES = ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play",
         "large-diverse")
_D4RL_ANT = "D4RL d4rl/locomotion/__init__.py antmaze-{}-v2 max_episode_steps={}"
for _maze in MAZES:
    _steps = 700 if _maze.startswith("umaze") else 1000
    TASKS[f"antmaze-{_maze}"] = {
        "dataset_id": (f"D4RL/antmaze/{_maze}-v1", "Minari's port of D4RL antmaze-*-v2"),
        "horizon": (_steps, _D4RL_ANT.format(_maze, _steps)),
    }

# Local sparse task (benchmark/datasets.py): small enough for a CPU in about a minute.
POINTMAZE: dict[str, tuple[Any, str]] = {
    **ADROIT,
    "dataset_id": ("local/pointmaze/sparse-v0", LOCAL),
    "offline_steps": (2_000, LOCAL),
    "online_steps": (3_000, LOCAL),
    "offline_eval_every": (1_000, LOCAL),
    "eval_every": (1_000, LOCAL),
    "eval_episodes": (10, LOCAL),
    "actor_hidden_dims": ((64, 64), LOCAL),
    "critic_hidden_dims": ((64, 64), LOCAL),
    "horizon": (100, "local/pointmaze/sparse-v0 eval env spec max_episode_steps=100"),
}

# `--dataset-id X` alone, X no preset's dataset: adroit-binary + generic, i.e. Cal-QL's Adroit
# schedule and networks on the rewards as recorded. Binary relabelling and goal terminals
# redefine the task and Cal-QL applies them to named tasks only, so they stay off even where
# the data records `success` (dense MC returns); `--env pen-binary --dataset-id X` relabels X.
_DENSE = "project choice: the data's own rewards for a dataset without a Cal-QL preset"
GENERIC: dict[str, tuple[Any, str]] = {
    "online_steps": (200_000, f"{ADROIT_SH} max_online_env_steps=2e5 (pen)"),
    **{k: (v, _DENSE) for k, v in dict(binary=False, goal_terminals=False, sparse_reward=False,
                                       reward_neg=0.0, reward_scale=1.0, reward_bias=0.0).items()},
    "horizon": (None, "the evaluation env spec's max_episode_steps"),
}

# `--env` -> the preset groups applied in order (later ones win).
ENV_GROUPS: dict[str, tuple[str, ...]] = {
    **{f"{t}-binary": ("adroit-binary", f"{t}-binary") for t in ("pen", "door", "relocate")},
    **{f"antmaze-{m}": ("antmaze", f"antmaze-{m}") for m in MAZES},
    "pointmaze-binary": ("pointmaze-binary",),
}
PRESETS: dict[str, dict[str, tuple[Any, str]]] = {
    "all (Args defaults)": COMMON, "adroit-binary": ADROIT, "antmaze": ANTMAZE,
    "pointmaze-binary": POINTMAZE, **{k: v for k, v in TASKS.items() if v},
    "generic": GENERIC,
}


def preset_values(env: str) -> dict[str, tuple[Any, str]]:
    """Field -> (value, source) of the `--env` preset, shared values included."""
    out = dict(COMMON)
    for group in ENV_GROUPS.get(env, ("adroit-binary", "generic")):
        out.update(PRESETS[group])
    return out


ENV_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    env: (preset_values(env)["dataset_id"][0],
          {k: v for k, (v, _) in preset_values(env).items() if k != "dataset_id"})
    for env in ENV_GROUPS
}  # `--env` -> (preset dataset id, preset field values)
DENSE_TASKS = ("hopper", "halfcheetah", "walker2d", "ant", "pendulum", "cartpole", "hammer",
               "kitchen", "humanoid", "swimmer")


def generic_env(dataset_id: str) -> str:
    """`--env` of a dataset without a preset: mujoco/hopper/medium-v0 -> hopper-medium-v0."""
    return "-".join(dataset_id.split("/")[1:]) or dataset_id


def env_for_dataset(dataset_id: str) -> str:
    """`--dataset-id` alone: the preset that loads this dataset, else the generic preset."""
    named = [env for env, (ds, _) in ENV_PRESETS.items() if ds == dataset_id]
    return named[0] if named else generic_env(dataset_id)


def check_env(env: str, dataset_id: str | None = None) -> None:
    """One-line error for an `--env` without a preset (the generic name of `dataset_id` is
    one)."""
    if env.endswith("-binary") and env not in ENV_PRESETS:
        base = env.removesuffix("-binary")
        kind = "a dense-reward task" if base.split("-")[0] in DENSE_TASKS else "not a task"
        fail(f"--env {env}: {base} is {kind} with no binary (success) version; binary "
             f"tasks: {', '.join(k for k in ENV_PRESETS if k.endswith('-binary'))}")
    if env not in ENV_PRESETS and (dataset_id is None or env != generic_env(dataset_id)):
        fail(f"unknown --env {env!r}; choose one of {', '.join(ENV_PRESETS)}, or give "
             "--dataset-id alone")


def preset_args(env: str, dataset_id: str | None = None) -> Args:
    """Args() with the `--env` preset's values filled in (literal values, see --presets);
    the generic preset where `env` is `dataset_id`'s generic name."""
    check_env(env, dataset_id)
    values = {k: v for k, (v, _) in preset_values(env).items() if k != "dataset_id"}
    return replace(Args(), env=env, dataset_id=dataset_id or ENV_PRESETS[env][0], **values)


def check_args(args: Args) -> None:
    """Every argument once, up front: one-line errors for values no run can use."""
    check_env(args.env, args.dataset_id)
    least = dict(offline_steps=0, online_steps=0, bc_steps=0, offline_eval_every=1,
                 eval_every=1, eval_episodes=1, batch_size=1, utd=1, cql_n_actions=1,
                 log_every=1, horizon=1)
    for name, low in least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            fail(f"--{name.replace('_', '-')} {value} must be at least {low}")
    if not 0.0 <= args.mixing_ratio <= 1.0:
        fail(f"--mixing-ratio {args.mixing_ratio} is outside [0, 1] (share of offline data "
             "in each online batch)")
    if min(args.actor_hidden_dims + args.critic_hidden_dims) < 1:
        fail("hidden widths must be at least 1")
    if args.cudagraphs and not args.compile:
        fail("--cudagraphs needs --compile")


def presets_markdown() -> str:
    """The preset table: group, field, value, source (`--presets`)."""
    lines = ["| preset group | field | value | source |", "|---|---|---|---|"]
    for group, values in PRESETS.items():
        for name, (value, source) in values.items():
            cells = (group, f"`{name}`", f"`{value}`", source)  # escape "|" inside a cell
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    uses = "; ".join(f"`{env}`: {' + '.join(g)}" for env, g in ENV_GROUPS.items())
    return "\n".join([*lines, "", f"`--env` -> groups applied over the defaults: {uses}; "
                      "`--dataset-id` alone: the preset naming it, else adroit-binary + generic."])


def parse_args(argv: list[str] | None = None) -> Args:
    """Command line -> complete Args: the `--env` preset is tyro's default, so `--help`
    shows the values that will run; `--presets` prints the preset table and exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--presets" in argv:
        print(presets_markdown())
        raise SystemExit(0)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--env", default=None)
    pre.add_argument("--dataset-id", "--dataset_id", default=None)
    known, _ = pre.parse_known_args(argv)
    env = known.env or (env_for_dataset(known.dataset_id) if known.dataset_id else Args.env)
    args = tyro.cli(Args, default=preset_args(env, known.dataset_id), args=argv)
    check_args(args)
    return args


LENGTH_FIELD = "online_steps"  # the run length a resume may grow (Part III)


def planned_updates(args: Args) -> int:
    """Gradient updates of the whole run (Part III's start line)."""
    return args.offline_steps + args.online_steps * args.utd


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
               "log_every", LENGTH_FIELD}  # a resume may change these (the length: grow only)
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json")
LOCK_FILE = "run.lock"
DEVICES = ("auto", "cpu", "cuda")
SEED_END = 2**31  # seeds in [0, 2**31): torch, numpy and gymnasium accept all of them
WANDB_REFUSED = ":;,#?/'"  # not allowed in a W&B run id (wandb/sdk/wandb_settings.py)
CPU_WARN_UPDATES = 100_000  # more updates than this on a CPU: a warning and a time estimate
REPORT_KEYS = ("step", "phase", "env_steps", "return_mean", "score", "normalized_score",
               "success_rate", "value_gap")  # printed after each evaluation, when present
_LOCKS: dict[str, int] = {}  # run directory -> descriptor of its lock, held by this process


def default_run_dir(args: Args) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"runs/{Path(__file__).stem}__{args.env}__s{args.seed}__{stamp}"


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


class StartupSignal(BaseException):
    """SIGINT/SIGTERM before Run took the signals over (the command line's start-up)."""


def _startup_signal(signum: int, _frame: Any) -> None:
    raise StartupSignal(signum)


class Run:
    """One run directory: config, evaluation rows, checkpoints of `parts`, resume, stop
    signals, the divergence guard, W&B and the summary. The main loop calls `log`,
    `evaluate_and_checkpoint` and `stop_if_signalled`; nothing here touches the algorithm."""

    restore_signals = True  # cli(): False, the process ends with the run

    def __init__(self, args: Args, parts: dict[str, Any], info: dict[str, Any],
                 eval_env: dict[str, Any], device: torch.device):
        self.args, self.parts = args, parts
        self.dir = Path(args.run_dir)
        self.ckpt = self.dir / "checkpoint.pt"
        self.step, self.history, self.saved = 0, [], None  # saved: the checkpoint's step
        self.timing = dict(train_s=0.0, wall_s=0.0)
        self.train_values: dict[str, float] = {}
        self.signal: int | None = None
        self.wandb = None
        # first: a stop signal from here on is honoured at the first step boundary
        self._handlers = {s: signal.signal(s, self._on_signal)
                          for s in (signal.SIGINT, signal.SIGTERM)}
        try:
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
                script=Path(__file__).name, torch=torch.__version__, device=str(device)))
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
        """One metrics row: `fields`, the evaluation, the last training metrics; then the
        checkpoint. Evaluation time is not training time (updates_per_sec)."""
        self.timing["train_s"] += time.perf_counter() - self._train0
        row = dict(step=step, **fields, **evaluate(), **self.train_values)
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
        last = self.history[-1] if self.history else {}
        score = summary.get("final_score", summary.get("final_normalized_score"))
        gap = summary.get("value_gap", last.get("value_gap"))
        print(f"done: final score {fmt(score)} | value gap {fmt(gap)} "
              f"| wall time {summary['wall_time_s']:.0f} s | {self.dir / 'summary.json'}",
              file=sys.stderr)
        return summary

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

    def load(self) -> None:
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
        detail = arg_changes(state.get("args", now), now)
        if detail:
            fail(f"{self.ckpt} was made by another run of {this} ({detail}); {unchanged}")
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


def cli() -> None:
    """The command line: run checks before the data loads; a stop signal before Run takes
    the signals over exits 128+signal with one line (Ctrl-C: 130)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _startup_signal)
    Run.restore_signals = False
    try:
        main(check_run_args(parse_args()))
    except StartupSignal as stop:
        signum = stop.args[0]
        print(f"error: stopped by signal {signum} during start-up, before training began; "
              "nothing was written; run the command again", file=sys.stderr)
        raise SystemExit(128 + signum) from None


if __name__ == "__main__":
    cli()
