"""Learning checks on the local sparse task (PointMaze corridor, binary reward {-5, +5}).

CPU-sized settings, the same for Cal-QL and plain CQL: 64x64 networks, batch 64, learning
rates 1e-3 and Polyak rate 0.05 (so that values of scale -5 / (1 - 0.99) = -500 converge
in a few thousand steps), CQL weight 5 (the AntMaze weight; with Adroit's 1.0 the
underestimation builds up too slowly for a CPU test)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import calql_finetune as calql

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def learning_args(run_dir: Path, **overrides) -> calql.Args:
    base = dict(env="pointmaze-binary", run_dir=str(run_dir), hidden_dims=(64, 64),
                batch_size=64, qf_lr=1e-3, policy_lr=1e-3, soft_target_update=0.05,
                cql_weight=5.0, log_every=250, progress=False, seed=0)
    return calql.resolve_args(calql.Args(**{**base, **overrides}))


def full_data_calibration(args: calql.Args) -> dict[str, float]:
    """Calibration of the run's checkpointed critic on EVERY offline transition."""
    data, _, _, info = calql.load_data(args)
    agent = calql.Agent(info["obs_dim"], info["action_dim"], args)
    ckpt = torch.load(Path(args.run_dir) / "checkpoint.pt", weights_only=False)
    agent.load_state_dict(ckpt["agent"])
    batch = {k: torch.as_tensor(data[k]) for k in calql.KEYS}
    torch.manual_seed(0)
    return calql.calibration_stats(agent, batch)


@pytest.mark.slow
def test_calql_values_are_calibrated_where_cql_values_are_not(local_dataset, tmp_path):
    local_dataset("pointmaze-sparse")
    stats = {}
    for name, enable in (("calql", True), ("cql", False)):
        args = learning_args(tmp_path / name, enable_calql=enable, offline_steps=2500,
                             offline_eval_every=2500, online_steps=0, eval_episodes=5)
        calql.main(args)
        stats[name] = full_data_calibration(args)
    print("calibration on the offline data (share of states with Q(s,pi(s)) < V_mu(s), "
          f"mean Q - V_mu): {json.dumps(stats)}")
    # Cal-QL: Q(s, pi(s)) >= V_mu(s) on nearly every state. Plain CQL, everything else equal,
    # is below V_mu on several times as many states (measured here: 0.06 vs 0.26; in this
    # CPU-sized run CQL does not reach a majority of states below V_mu), and its values sit
    # lower relative to V_mu on average.
    assert stats["calql"]["below_share"] < 0.15
    assert stats["cql"]["below_share"] > max(2 * stats["calql"]["below_share"],
                                             stats["calql"]["below_share"] + 0.1)
    assert stats["calql"]["q_minus_vmu"] > stats["cql"]["q_minus_vmu"] + 5.0


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
