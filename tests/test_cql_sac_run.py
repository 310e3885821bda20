"""CQL-SAC end to end: variants, compile, a dataset id alone. The run contract (run files,
signals, kills, resume, divergence, bad inputs) is tests/test_run_contract.py."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCRIPTS, read_json, read_metrics, write_dataset

import cql_sac_continuous as cql


def tiny_args(run_dir: Path, **overrides) -> cql.Args:
    base = dict(run_dir=str(run_dir), actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16),
                batch_size=32, cql_n_actions=3,
                eval_episodes=1, total_steps=60, eval_every=30, log_every=25, progress=False)
    return cql.replace(cql.preset_args("pendulum-medium"), **{**base, **overrides})


@pytest.mark.parametrize("overrides", [
    dict(cql_importance_sample=False, cql_temp=0.5),
    dict(cql_data_term=False),
    dict(lagrange=True, cql_tau=1.0, lagrange_form="calql"),
    dict(max_backup=True, backup_entropy=True, max_backup_form="calql", init="orthogonal"),
    dict(cql_weight=0.0, normalize_states=True, reward_mode="scale_bias", reward_scale=0.1,
         track=True),  # W&B code path, disabled by conftest
], ids=["plain", "eq1", "lagrange", "max-backup", "naive-sac"])
def test_variants_run_end_to_end(local_dataset, tmp_path, overrides):
    local_dataset("pendulum-medium")
    summary = cql.main(tiny_args(tmp_path / "run", total_steps=30, **overrides))
    assert np.isfinite(summary["final_return"]) and np.isfinite(summary["value_gap"])
    alpha_primes = [r["alpha_prime"] for r in read_metrics(tmp_path / "run")]
    if overrides.get("lagrange"):
        assert alpha_primes[-1] != 1.0  # tuned away from exp(0)
    dataset = read_json(tmp_path / "run" / "config.json")["dataset"]
    assert dataset["ref_min_score"] < dataset["ref_max_score"]  # the normalized score's refs


def test_compile_gives_the_eager_losses(one_torch_thread):
    """torch.compile of the loss computation computes the eager losses. The traced graph
    (backend aot_eager: eager kernels, eager RNG) is bit-identical; inductor, the script's
    backend, draws its own random numbers, so its random-dependent metrics are compared with
    the spread of eager over seeds and the deterministic ones exactly (no private settings)."""
    args = cql.replace(cql.preset_args("pendulum-medium"), compile=True, cql_n_actions=3,
                       actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16), lagrange=True)
    torch.manual_seed(0)
    agent = cql.Agent(3, 2, args)
    g = torch.Generator().manual_seed(3)
    batch = dict(obs=torch.randn(32, 3, generator=g), next_obs=torch.randn(32, 3, generator=g),
                 actions=torch.rand(32, 2, generator=g) * 1.8 - 0.9,
                 rewards=torch.randn(32, generator=g), dones=torch.zeros(32))

    def losses(fn, seed):
        torch.manual_seed(seed)
        return {k: v.item() for k, v in fn(agent, batch, args, False)[1].items()}

    traced = torch.compile(cql.compute_losses, backend="aot_eager")
    assert losses(traced, 5) == losses(cql.compute_losses, 5)
    eager = [losses(cql.compute_losses, 100 + s) for s in range(16)]
    trainer = cql.Trainer(agent, args, torch.device("cpu"))  # the compiled whole update
    compiled = losses(torch.compile(cql.compute_losses), 5)  # inductor
    for key, value in compiled.items():
        ref = np.array([e[key] for e in eager])
        assert abs(value - ref.mean()) <= 6 * ref.std() + 1e-5 * abs(ref.mean()) + 1e-6, key
    metrics = trainer.step(batch)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_dataset_id_alone_runs_with_the_default_preset(tmp_path, monkeypatch):
    """No --env and a dataset of no known family: the paper's defaults, env named after it;
    config.json's eval_env is exactly {id, max_episode_steps, kwargs, entry_point, value_gap}:
    Pendulum never terminates, so every evaluation rolls out the gap's 459 steps past its 200."""
    write_dataset(tmp_path, "someone/pendulum/tiny-v0", "Pendulum-v1")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    tiny = SCRIPTS["cql_sac"].argv[2:]  # the contract's tiny sizes, without its --env
    args = cql.parse_args(["--dataset-id", "someone/pendulum/tiny-v0", *tiny, "--total-steps",
                           "2", "--eval-every", "2", "--run-dir", str(tmp_path / "run")])
    assert args.env == "pendulum-tiny-v0" and args.bc_steps == 0 and args.policy_lr == 3e-5
    summary = cql.main(args)
    assert summary["total_steps"] == 2 and np.isfinite(summary["final_return"])
    eval_env = read_json(tmp_path / "run" / "config.json")["eval_env"]
    assert eval_env == {"id": "Pendulum-v1", "max_episode_steps": 200,
                        "kwargs": eval_env["kwargs"],
                        "entry_point": "gymnasium.envs.classic_control.pendulum:PendulumEnv",
                        "value_gap": eval_env["value_gap"]}
    gap = eval_env["value_gap"]
    assert (gap["horizon"], gap["score_max_steps"], gap["rollout_max_steps"]) == (459, 200, 459)
    assert gap["tail_fraction"] == 0.01 and gap["runs_past_time_limit"] is True
    rewards = cql.load_data(args).transitions["rewards"]
    assert gap["reward_abs_max"] == pytest.approx(float(np.abs(rewards).max()))
    assert gap["tail_bound"] == pytest.approx(0.99**459 * gap["reward_abs_max"] / 0.01)
    for row in read_metrics(tmp_path / "run"):
        assert row["episode_length"] == 200 and row["value_gap_steps"] == 459
        assert row["value_gap_tail_bound"] == pytest.approx(gap["tail_bound"])

