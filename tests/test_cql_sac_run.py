"""CQL-SAC end to end: run directory contract, variants, compile, kill/resume, bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from minari.data_collector import EpisodeBuffer

import cql_sac_continuous as cql

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "cql_sac_continuous.py")
TINY = ["--hidden-dims", "16", "16", "--batch-size", "32", "--cql-n-actions", "3",
        "--eval-episodes", "1", "--log-every", "25", "--no-progress"]


def tiny_args(run_dir: Path, **overrides) -> cql.Args:
    base = dict(run_dir=str(run_dir), actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16),
                batch_size=32, cql_n_actions=3,
                eval_episodes=1, total_steps=60, eval_every=30, log_every=25, progress=False)
    return cql.replace(cql.preset_args("pendulum-medium"), **{**base, **overrides})


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# One torch thread in subprocesses: two on a shared 2-core machine make steps many times slower.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_script(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_run_directory_contract(local_dataset, tmp_path):
    local_dataset("pendulum-medium")
    summary = cql.main(tiny_args(tmp_path / "run", bc_steps=20))
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["args"]["cql_weight"] == 5.0 and config["args"]["actor_hidden_dims"] == [16, 16]
    assert config["dataset"]["dataset_id"] == "local/pendulum/medium-v0"
    assert config["eval_env"] == {"id": "Pendulum-v1", "max_episode_steps": 200,
                                  "kwargs": config["eval_env"]["kwargs"]}
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [30, 60]
    for key in ("normalized_score", "return_mean", "value_gap", "critic_loss", "actor_loss",
                "alpha", "alpha_prime", "cql_gap", "bellman_loss"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert (run / "checkpoint.pt").exists() and not (run / "checkpoint.pt.tmp").exists()
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary
    assert summary["final_return"] == rows[-1]["return_mean"]
    assert summary["final_normalized_score"] == rows[-1]["normalized_score"]
    assert summary["updates_per_sec"] > 0 and summary["wall_time_s"] > 0
    lo, hi = config["dataset"]["ref_min_score"], config["dataset"]["ref_max_score"]
    assert rows[-1]["normalized_score"] == pytest.approx(
        100 * (rows[-1]["return_mean"] - lo) / (hi - lo))


@pytest.mark.parametrize("overrides", [
    dict(cql_variant="plain", cql_temp=0.5),
    dict(cql_variant="eq7"),
    dict(cql_data_term=False),
    dict(lagrange=True, cql_tau=1.0, lagrange_form="calql"),
    dict(max_backup=True, backup_entropy=True, orthogonal_init=True),
    dict(cql_weight=0.0, normalize_states=True, reward_mode="scale_bias", reward_scale=0.1,
         track=True),  # W&B code path, disabled by conftest
], ids=["plain", "eq7", "eq1", "lagrange", "max-backup", "naive-sac"])
def test_variants_run_end_to_end(local_dataset, tmp_path, overrides):
    local_dataset("pendulum-medium")
    summary = cql.main(tiny_args(tmp_path / "run", total_steps=30, **overrides))
    assert np.isfinite(summary["final_return"]) and np.isfinite(summary["value_gap"])
    alpha_primes = [r["alpha_prime"] for r in read_metrics(tmp_path / "run")]
    if overrides.get("lagrange"):
        assert alpha_primes[-1] != 1.0  # tuned away from exp(0)


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
    trainer = cql.Trainer(agent, args, torch.device("cpu"))  # the script's compiled path
    compiled = losses(trainer.loss_fn, 5)
    for key, value in compiled.items():
        ref = np.array([e[key] for e in eager])
        assert abs(value - ref.mean()) <= 6 * ref.std() + 1e-5 * abs(ref.mean()) + 1e-6, key
    metrics = trainer.step(batch)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_sigterm_then_resume_matches_an_uninterrupted_run(local_dataset, tmp_path,
                                                          one_torch_thread):
    local_dataset("pendulum-medium")
    steps = ["--total-steps", "600", "--eval-every", "100", "--seed", "3"]
    reference = cql.main(tiny_args(tmp_path / "ref", total_steps=600, eval_every=100, seed=3))
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, SCRIPT, *TINY, *steps, "--run-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists() or \
            not (run / "metrics.jsonl").read_text():
        time.sleep(0.05)  # first evaluation written: the run is mid-way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"--resume {run}" in err
    stopped_at = len(read_metrics(run))
    assert stopped_at < 6 and not (run / "summary.json").exists()
    resumed = run_script(*TINY, *steps, "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    ref_rows, rows = read_metrics(tmp_path / "ref"), read_metrics(run)
    assert [r["step"] for r in rows] == [100, 200, 300, 400, 500, 600]
    for a, b in zip(ref_rows, rows, strict=True):
        assert a == b  # bit-identical evaluations and training metrics
    for key in ("final_return", "final_normalized_score", "value_gap"):
        assert summary[key] == reference[key]


def test_resume_after_a_hard_kill_continues_from_the_last_checkpoint(local_dataset, tmp_path):
    local_dataset("pendulum-medium")
    args = tiny_args(tmp_path / "run", total_steps=90, eval_every=30)
    reference = cql.main(tiny_args(tmp_path / "ref", total_steps=90, eval_every=30))
    cql.main(cql.replace(args, total_steps=60))  # as if killed right after step 60's eval...
    with open(tmp_path / "run" / "metrics.jsonl", "a") as fh:  # ...mid-way through the next
        fh.write('{"step": 75, "stale": true}\n')
    resumed = cql.main(cql.replace(args, resume=str(tmp_path / "run")))
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [30, 60, 90]
    assert resumed["final_return"] == reference["final_return"]


def test_resume_with_a_different_config_is_refused(local_dataset, tmp_path):
    local_dataset("pendulum-medium")
    cql.main(tiny_args(tmp_path / "run", total_steps=30))
    with pytest.raises(SystemExit, match="cql_weight: 5.0 -> 1.0"):
        cql.main(tiny_args(tmp_path / "run", total_steps=30, cql_weight=1.0,
                           resume=str(tmp_path / "run")))
    with pytest.raises(SystemExit, match="no checkpoint"):
        cql.main(tiny_args(tmp_path / "new", resume=str(tmp_path / "nothing-here")))


def test_divergence_stops_with_step_and_last_checkpoint(local_dataset, tmp_path, monkeypatch):
    local_dataset("pendulum-medium")
    sample, calls = cql.ReplayBuffer.sample, []

    def poisoned(self, batch_size):  # NaN rewards from the 41st batch on
        batch = sample(self, batch_size)
        calls.append(1)
        if len(calls) > 40:
            batch["rewards"] = batch["rewards"] * float("nan")
        return batch

    monkeypatch.setattr(cql.ReplayBuffer, "sample", poisoned)
    with pytest.raises(SystemExit, match=r"diverged at step 50 .*checkpoint.pt \(step 30\)"):
        cql.main(tiny_args(tmp_path / "run", log_every=25, eval_every=30, total_steps=90))


def write_dataset(root: Path, dataset_id: str, env_id: str, episodes: int = 2,
                  corrupt: bool = False) -> None:
    """A tiny hand-made Minari dataset in `root` (random actions)."""
    os.environ["MINARI_DATASETS_PATH"], old = str(root), os.environ["MINARI_DATASETS_PATH"]
    try:
        env = gym.make(env_id)
        buffers = []
        for k in range(episodes):
            obs, _ = env.reset(seed=k)
            rows = dict(observations=[obs], actions=[], rewards=[], terminations=[],
                        truncations=[])
            for t in range(10):
                obs, r, term, trunc, _ = env.step(env.action_space.sample())
                rows["observations"].append(obs)
                rows["actions"].append(env.action_space.sample())
                rows["rewards"].append(np.nan if corrupt and t == 3 else r)
                rows["terminations"].append(term)
                rows["truncations"].append(t == 9)
                if term:
                    break
            buffers.append(EpisodeBuffer(**{k: np.asarray(v) for k, v in rows.items()},
                                         infos={}))
        minari.create_dataset_from_buffers(dataset_id, buffers, env=env_id)
    finally:
        os.environ["MINARI_DATASETS_PATH"] = old


def test_dataset_id_alone_runs_with_the_default_preset(tmp_path, monkeypatch):
    """No --env and a dataset of no known family: the paper's defaults, env named after it."""
    write_dataset(tmp_path, "someone/pendulum/tiny-v0", "Pendulum-v1")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    args = cql.parse_args(["--dataset-id", "someone/pendulum/tiny-v0", *TINY, "--total-steps",
                           "2", "--eval-every", "2", "--run-dir", str(tmp_path / "run")])
    assert args.env == "pendulum-tiny-v0" and args.bc_steps == 0 and args.policy_lr == 3e-5
    summary = cql.main(args)
    assert summary["total_steps"] == 2 and np.isfinite(summary["final_return"])


BAD_INPUTS = {
    "unknown-env": (["--env", "hopper-mediun"], "unknown --env 'hopper-mediun'"),
    "missing-local": (["--env", "pendulum-medium-replay"], "build it with: "
                      "python benchmark/datasets.py local/pendulum/medium-replay-v0"),
    "discrete": (["--dataset-id", "test/cartpole/tiny-v0"], "use cql_qrdqn_atari.py"),
    "nan": (["--dataset-id", "test/pendulum/nan-v0"], "non-finite values in 'rewards'"),
    "no-cuda": (["--device", "cuda"], "no CUDA device"),
    "no-network": (["--dataset-id", "D4RL/pen/human-v2"], "could not be downloaded"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_give_one_line_errors(tmp_path, case):
    if case == "no-cuda" and cql.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    write_dataset(tmp_path, "test/cartpole/tiny-v0", "CartPole-v1")
    write_dataset(tmp_path, "test/pendulum/nan-v0", "Pendulum-v1", corrupt=True)
    argv, message = BAD_INPUTS[case]
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, *argv, *TINY, "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]
