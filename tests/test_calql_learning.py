"""Learning checks on the local sparse task (PointMaze corridor, binary reward {-5, +5}).

CPU-sized settings, the same for Cal-QL and plain CQL: 64x64 networks, batch 64, learning
rates 1e-3 and Polyak rate 0.05 (so that values of scale -5 / (1 - 0.99) = -500 converge
in a few thousand steps), CQL weight 5 (the AntMaze weight; with Adroit's 1.0 the
underestimation builds up too slowly for a CPU test). The calibration test changes three
flags, the same for both methods; see its docstring."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import calql_finetune as calql

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def learning_args(run_dir: Path, **overrides) -> calql.Args:
    base = dict(run_dir=str(run_dir), actor_hidden_dims=(64, 64), critic_hidden_dims=(64, 64),
                batch_size=64, qf_lr=1e-3, policy_lr=1e-3, soft_target_update=0.05,
                cql_weight=5.0, log_every=250, progress=False, seed=0)
    return replace(calql.preset_args("pointmaze-binary"), **{**base, **overrides})


@torch.no_grad()
def full_data_calibration(args: calql.Args) -> dict[str, float]:
    """Calibration of the run's checkpointed critic on EVERY offline transition: share of
    states with min_j Q_j(s, a~pi(s)) < V_mu(s), and mean Q - V_mu (the training metrics
    calib_below_share / calib_q_minus_vmu, over the whole dataset instead of a batch)."""
    data = calql.load_data(args)
    agent = calql.Agent(data.info["obs_dim"], data.info["action_dim"], args)
    ckpt = torch.load(Path(args.run_dir) / "checkpoint.pt", weights_only=False)
    agent.load_state_dict(ckpt["parts"]["agent"])
    batch = {k: torch.as_tensor(data.transitions[k]) for k in calql.KEYS}
    torch.manual_seed(0)
    a_pi, _ = agent.actor(batch["obs"])
    diff = agent.critic(batch["obs"], a_pi).min(0).values - batch["mc_returns"]
    return dict(below_share=float((diff < 0).float().mean()), q_minus_vmu=float(diff.mean()))


@pytest.mark.slow
def test_calql_values_are_calibrated_where_cql_values_are_not(local_dataset, tmp_path):
    """Issue 4's claim in its strong form: after offline pre-training, plain CQL's
    Q(s, pi(s)) is below V_mu(s) on most dataset states, Cal-QL's on few.

    Both methods use the same flags: CQL weight 20, the plain (not importance-sampled)
    logsumexp that includes Q(s, a_D) (`cql_importance_sample=False`, the official
    code's alternative) and the ordinary SAC target (`max_backup=False`). With the
    Adroit preset's importance-sampled logsumexp and max backup, CQL's values on this
    small task stay above V_mu on most states (CQL below-share at weight 5: 0.26, 0.10
    after 6000 steps; weight 20 or 50 does not raise it; Lagrange with tau 0.8 or 5: 0.15
    or 0.22). Both changes are needed (seed 0, weight 5: max backup off alone 0.41, plain
    logsumexp alone 0.46, both 0.63; weight 20: max backup off alone 0.23, plain
    logsumexp alone 0.44, both 0.74).

    Measured over every offline transition (share of states with Q(s,pi(s)) < V_mu(s),
    mean Q - V_mu), 2500 steps, seeds 0/1/2/3:
        Cal-QL  0.10 / 0.08 / 0.07 / 0.08    +16.9 / +17.2 / +17.8 / +17.5
        CQL     0.74 / 0.73 / 0.72 / 0.73     -9.5 /  -9.7 /  -8.7 /  -9.3
    (seed 0 with 5000 steps: Cal-QL 0.08, CQL 0.72; with 1500 steps: 0.08, 0.64)."""
    local_dataset("pointmaze-sparse")
    stats = {}
    for name, enable in (("calql", True), ("cql", False)):
        args = learning_args(tmp_path / name, enable_calql=enable, offline_steps=2500,
                             offline_eval_every=2500, online_steps=0, eval_episodes=5,
                             cql_weight=20.0, cql_importance_sample=False, max_backup=False)
        calql.main(args)
        stats[name] = full_data_calibration(args)
    print("calibration on the offline data (share of states with Q(s,pi(s)) < V_mu(s), "
          f"mean Q - V_mu): {json.dumps(stats)}")
    # Cal-QL: Q(s, pi(s)) >= V_mu(s) on nearly every state; plain CQL, everything else
    # equal, is below V_mu on most states and below it on average.
    assert stats["calql"]["below_share"] < 0.2
    assert stats["cql"]["below_share"] > 0.6
    assert stats["calql"]["q_minus_vmu"] > 0.0 > stats["cql"]["q_minus_vmu"]
    assert stats["calql"]["q_minus_vmu"] > stats["cql"]["q_minus_vmu"] + 10.0


@pytest.mark.slow
def test_online_fine_tuning_improves_on_the_pretrained_policy(local_dataset, tmp_path):
    local_dataset("pointmaze-sparse")
    args = learning_args(tmp_path / "run", offline_steps=800, offline_eval_every=800,
                         online_steps=1500, eval_every=500, eval_episodes=10)
    summary = calql.main(args)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    print("success rate by phase/env step:",
          [(r["phase"], r["env_steps"], r["success_rate"]) for r in rows])
    print(json.dumps(summary))
    assert summary["offline_success_rate"] <= 0.5
    assert summary["final_success_rate"] >= summary["offline_success_rate"] + 0.4
    assert np.isfinite(summary["cumulative_regret"]) and summary["env_steps"] >= 1500
