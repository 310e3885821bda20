"""cql_qrdqn_atari.py end to end: run directory, resume, signals, bad inputs, learning."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from dqn_replay import make_dqn_replay_dir

import cql_qrdqn_atari as m

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "cql_qrdqn_atari.py")


def args_for(env, dataset_id=None, dqn_replay_dir=None, data_fraction=0.01, **overrides):
    """The env's preset with overrides, as tests build complete Args."""
    preset = m.preset_args(env, dataset_id, dqn_replay_dir, data_fraction)
    return dataclasses.replace(preset, **overrides)


def small(env="cartpole-medium", **kw):
    base = dict(total_steps=300, eval_every=150, eval_episodes=2, log_every=50,
                progress=False, hidden_dims=(32, 32), num_quantiles=8)
    base.update(kw)
    return args_for(env, **base)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def run_cli(*argv, env=None, timeout=120):
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})


# --- end to end -----------------------------------------------------------------------------------


def test_cartpole_run_writes_the_run_directory(tmp_path, local_dataset):
    local_dataset("cartpole-medium")
    run_dir = tmp_path / "run"
    summary = m.main(small(run_dir=str(run_dir)))
    config = json.loads((run_dir / "config.json").read_text())
    args = config["args"]
    assert args["env"] == "cartpole-medium"
    assert config["dataset"]["source"] == "local/cartpole/medium-v0"
    assert args["cql_weight"] == 1.0 and args["hidden_dims"] == [32, 32]  # preset + override
    assert config["eval_env"] == {"id": "CartPole-v1", "max_episode_steps": 500, "kwargs": {}}
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [150, 300]
    for r in rows:
        assert len(r["episode_returns"]) == 2
        for key in ("return_mean", "normalized_score", "qr_loss", "cql_loss",
                    "cql_gap", "alpha_prime", "q_pred_s0", "value_gap"):
            assert r[key] is not None and np.isfinite(r[key]), key
    lo, hi = 9.0, 500.0  # CartPole ref scores are about random ~22 / controller 500
    assert lo < rows[-1]["return_mean"] <= hi
    ds = m.minari.load_dataset("local/cartpole/medium-v0")
    ref_lo, ref_hi = ds.storage.metadata["ref_min_score"], ds.storage.metadata["ref_max_score"]
    want = 100 * (rows[-1]["return_mean"] - ref_lo) / (ref_hi - ref_lo)
    assert rows[-1]["normalized_score"] == pytest.approx(want)
    for key in ("final_normalized_score", "final_return", "updates_per_sec", "wall_time_s",
                "total_steps"):
        assert summary[key] is not None
    assert json.loads((run_dir / "summary.json").read_text())["final_return"] == \
        rows[-1]["return_mean"]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 300 and not list(run_dir.glob("*.tmp"))
    assert ckpt["parts"]["trainer"]["updates"] == 300


def test_pong_local_run_with_nature_torso(tmp_path, local_dataset):
    local_dataset("pong-random")
    run_dir = tmp_path / "pong"
    summary = m.main(args_for("pong-random", total_steps=4, eval_every=2, eval_episodes=1,
                            batch_size=8, max_episode_steps=60, log_every=2, progress=False,
                            run_dir=str(run_dir)))
    config = json.loads((run_dir / "config.json").read_text())["args"]
    # the Atari preset: paper optimizer and QR-DQN settings
    assert (config["qf_lr"], config["adam_eps"], config["num_quantiles"]) == (5e-5, 3.125e-4, 200)
    assert config["target_update_every"] == 2000 and config["clip_reward"] is True
    assert config["eval_epsilon"] == 0.001
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [2, 4]
    ret = rows[-1]["return_mean"]
    assert summary["final_normalized_score"] == pytest.approx(100 * (ret + 20.7) / (14.6 + 20.7))


def test_dqn_replay_run(tmp_path):
    replay = make_dqn_replay_dir(tmp_path / "Pong" / "1" / "replay_logs", num_checkpoints=2)
    run_dir = tmp_path / "run"
    summary = m.main(args_for("pong", dqn_replay_dir=str(replay), data_fraction=0.5,
                              total_steps=2, eval_every=2, eval_episodes=1, batch_size=4,
                            max_episode_steps=30, log_every=1, progress=False,
                            run_dir=str(run_dir)))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["cql_weight"] == 1.0  # preset for a large fraction (0.5 > 5%)
    assert summary["transitions"] > 0 and config["dataset"]["source"].startswith("dqn_replay:")
    # the paper's presets: alpha 4.0 with 1% of the data, 1.0 with 10%
    assert m.preset_args("pong", dqn_replay_dir="x", data_fraction=0.01).cql_weight == 4.0
    assert m.preset_args("pong", dqn_replay_dir="x", data_fraction=0.1).cql_weight == 1.0
    argv = ["--env", "pong", "--dqn-replay-dir", "x", "--data-fraction", "0.1"]
    assert m.parse_args(argv).cql_weight == 1.0
    assert m.parse_args([*argv, "--cql-weight", "2.5"]).cql_weight == 2.5


def test_dataset_id_alone_runs(tmp_path, local_dataset):
    """--dataset-id of a discrete Minari set with no --env: the preset of its observations."""
    ds_id = local_dataset("cartpole-medium")
    r = run_cli("--dataset-id", ds_id, "--total-steps", "20", "--eval-every", "20",
                "--eval-episodes", "1", "--num-quantiles", "4", "--no-progress", "--run-dir",
                str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["args"]["env"] == "cartpole-medium-v0"
    assert config["dataset"]["dataset_id"] == ds_id
    assert config["args"]["hidden_dims"] == [128, 128]  # the vector preset


def test_compile_runs_on_cpu(tmp_path, local_dataset):
    local_dataset("cartpole-medium")
    summary = m.main(small(total_steps=20, eval_every=20, eval_episodes=1, compile=True,
                           run_dir=str(tmp_path / "c")))
    assert summary["final_return"] > 0


# --- checkpoint and resume ------------------------------------------------------------------------


def test_resume_gives_identical_numbers(tmp_path, local_dataset):
    local_dataset("cartpole-medium")
    args = dict(total_steps=400, eval_every=100, lagrange=True, cql_tau=0.5,
                target_update_every=60)
    full = m.main(small(run_dir=str(tmp_path / "full"), **args))
    half_dir = tmp_path / "half"
    m.main(small(run_dir=str(half_dir), **{**args, "total_steps": 200}))
    resumed = m.main(small(resume=str(half_dir), **args))
    assert read_metrics(half_dir) == read_metrics(tmp_path / "full")
    assert resumed["final_return"] == full["final_return"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(half_dir / "checkpoint.pt", weights_only=False)
    a, b = a["parts"]["agent"], b["parts"]["agent"]
    assert {k for k in a if k.startswith("q.")} and a.keys() == b.keys()
    for k, v in a.items():  # the Q network, its target copy and log alpha'
        assert torch.equal(v, b[k]), k


def test_resume_refuses_different_arguments(tmp_path, local_dataset):
    local_dataset("cartpole-medium")
    run_dir = tmp_path / "r"
    m.main(small(run_dir=str(run_dir), total_steps=50, eval_every=50, eval_episodes=1))
    with pytest.raises(SystemExit, match=r"error: .*does not match.*cql_weight.*qf_lr"):
        m.main(small(resume=str(run_dir), total_steps=100, qf_lr=0.5, cql_weight=3.0))
    # free fields (total_steps, progress, ...) may change
    m.main(small(resume=str(run_dir), total_steps=60, eval_every=50, eval_episodes=1,
                 progress=True))
    assert [r["step"] for r in read_metrics(run_dir)] == [50, 60]


def test_sigint_saves_checkpoint_and_resume_continues_identically(tmp_path, local_dataset):
    local_dataset("cartpole-medium")
    run_dir = tmp_path / "sig"
    common = ["--env", "cartpole-medium", "--eval-every", "100", "--eval-episodes", "1",
              "--hidden-dims", "32", "32", "--num-quantiles", "8", "--log-every", "50"]
    proc = subprocess.Popen([sys.executable, SCRIPT, *common, "--total-steps", "100000",
                             "--run-dir", str(run_dir), "--no-progress"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    metrics = run_dir / "metrics.jsonl"  # written empty at the start: wait for a row
    while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    assert "stopped by signal" in err and f"--resume {run_dir}" in err, err[-2000:]
    assert "Traceback" not in err
    step = torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"]
    assert 100 <= step < 100000
    target = (step // 100 + 1) * 100 + 30
    kw = dict(env="cartpole-medium", eval_every=100, eval_episodes=1, hidden_dims=(32, 32),
              num_quantiles=8, log_every=50, progress=False, total_steps=target)
    resumed = m.main(args_for(resume=str(run_dir), **kw))
    full = m.main(args_for(run_dir=str(tmp_path / "full"), **kw))
    assert resumed["final_return"] == full["final_return"]
    assert read_metrics(run_dir)[-1] == read_metrics(tmp_path / "full")[-1]


# --- bad inputs -----------------------------------------------------------------------------------


def test_unknown_env_lists_valid_names():
    with pytest.raises(SystemExit, match="unknown --env 'walker'; valid: pong, breakout"):
        m.parse_args(["--env", "walker"])
    r = run_cli("--env", "notagame", "--no-progress")
    assert r.returncode != 0 and "error: unknown --env 'notagame'" in r.stderr
    assert "Traceback" not in r.stderr


def test_continuous_dataset_points_to_sac_script(local_dataset):
    ds_id = local_dataset("pendulum-random")
    with pytest.raises(SystemExit, match="continuous action space.*cql_sac_continuous.py"):
        m.main(args_for("custom", dataset_id=ds_id, progress=False))


def test_missing_replay_dir_and_unknown_game(tmp_path):
    with pytest.raises(SystemExit, match="--dqn-replay-dir .* does not exist.*gsutil"):
        m.main(args_for("pong", dqn_replay_dir=str(tmp_path / "nope"), progress=False))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"no \$store\$_observation_ckpt"):
        m.main(args_for("pong", dqn_replay_dir=str(tmp_path / "empty"), progress=False))
    with pytest.raises(SystemExit, match="Atari game as --env: 'pongg' unknown; valid: pong"):
        m.parse_args(["--env", "pongg", "--dqn-replay-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="'cartpole-expert' is a local dataset, not an Atari"):
        m.parse_args(["--env", "cartpole-expert", "--dqn-replay-dir", str(tmp_path)])


def test_missing_local_dataset_says_how_to_build(tmp_path):
    r = run_cli("--env", "cartpole-expert", env={"MINARI_DATASETS_PATH": str(tmp_path)})
    assert r.returncode != 0
    assert "local/cartpole/expert-v0 not found" in r.stderr
    assert "build it with: python benchmark/datasets.py cartpole-expert" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_atari_dataset_without_network(tmp_path):
    r = run_cli("--env", "breakout", env={"MINARI_DATASETS_PATH": str(tmp_path),
                                          "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0
    assert "error: dataset atari/breakout/expert-v0 is not under" in r.stderr
    assert "minari download atari/breakout/expert-v0" in r.stderr
    assert "Traceback" not in r.stderr


def test_nan_in_data_is_refused(tmp_path, monkeypatch):
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    obs = np.zeros((4, 4), np.float32)
    buf = EpisodeBuffer(observations=obs, actions=np.zeros(3, np.int64),
                        rewards=np.array([1.0, np.nan, 1.0]), terminations=np.zeros(3, bool),
                        truncations=np.array([False, False, True]))
    with pytest.warns(UserWarning):
        minari.create_dataset_from_buffers("test/nan/bad-v0", [buf], env=gym.make("CartPole-v1"))
    with pytest.raises(SystemExit, match="test/nan/bad-v0 contains NaN"):
        m.main(args_for("custom", dataset_id="test/nan/bad-v0", progress=False))


def test_divergence_names_step_and_last_checkpoint(tmp_path, local_dataset):
    local_dataset("cartpole-medium")
    run_dir = tmp_path / "div"
    with pytest.raises(SystemExit) as e:
        m.main(small(run_dir=str(run_dir), qf_lr=100.0, cql_weight=0.0, eval_every=10,
                     eval_episodes=1, log_every=10, total_steps=2000))
    msg = str(e.value)
    assert msg.startswith("error: training diverged at step 20 (")
    assert f"last good checkpoint is {run_dir / 'checkpoint.pt'} (step 10)" in msg
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 10


# --- learning -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cql_beats_plain_qrdqn_on_narrow_cartpole_data(tmp_path, local_dataset):
    """Expert CartPole data (balancing controller, 10% random actions): CQL reaches near-expert
    return; plain offline QR-DQN (CQL weight 0) overestimates the rare actions and fails."""
    local_dataset("cartpole-expert")
    kw = dict(env="cartpole-expert", total_steps=4000, eval_every=4000, eval_episodes=5,
              progress=False)
    cql = m.main(args_for(run_dir=str(tmp_path / "cql"), **kw))
    plain = m.main(args_for(run_dir=str(tmp_path / "plain"), cql_weight=0.0, **kw))
    print(f"CQL normalized {cql['final_normalized_score']:.1f} (return {cql['final_return']}), "
          f"CQL weight 0: {plain['final_normalized_score']:.1f} ({plain['final_return']})")
    assert cql["final_normalized_score"] >= 90.0
    assert plain["final_normalized_score"] <= cql["final_normalized_score"] - 40.0


# --- evaluation -----------------------------------------------------------------------------------


def test_evaluation_is_seeded_batched_and_uses_epsilon():
    import gymnasium as gym

    torch.manual_seed(0)
    q = m.QRNetwork((4,), 2, 3, (8,))
    make_env = lambda: gym.make("CartPole-v1")  # noqa: E731

    def ev(n, eps, seed, cap=10**9):
        envs = [make_env() for _ in range(n)]
        return np.array(m.evaluate(q, envs, eps, seed, "cpu", cap)["episode_returns"])

    a = ev(3, 0.0, 123)
    np.testing.assert_array_equal(a, ev(3, 0.0, 123))
    # side by side == one after the other (greedy): episode e is env seed 123 + e
    np.testing.assert_array_equal(a, [ev(1, 0.0, 123 + e)[0] for e in range(3)])
    assert (ev(2, 0.0, 5, cap=7) <= 7).all()  # step cap
    # epsilon 1: uniformly random actions, whatever the network
    assert 12 < ev(20, 1.0, 0).mean() < 40
    assert m.eval_seed(0, 100) == m.eval_seed(0, 100) != m.eval_seed(0, 200) != m.eval_seed(1, 100)


def test_value_gap_is_q_s0_minus_discounted_return():
    import gymnasium as gym

    class Const(torch.nn.Module):  # Q = 7 everywhere, 1 quantile
        frames = False

        def forward(self, x):
            return torch.full((len(x), 2, 1), 7.0)

    envs = [gym.make("CartPole-v1") for _ in range(2)]
    out = m.evaluate(Const(), envs, 0.0, 0, "cpu", 5, gamma=0.5, score_range=(1.0, 3.0))
    # 5 steps of reward 1 (capped): discounted return 1 + .5 + .25 + .125 + .0625
    assert out["q_pred_s0"] == 7.0
    assert out["value_gap"] == pytest.approx(7.0 - 1.9375)
    assert out["return_mean"] == 5.0 and out["normalized_score"] == pytest.approx(200.0)


def test_track_logs_to_wandb(tmp_path, local_dataset, monkeypatch):
    """--track: wandb is imported lazily and gets the config, train/eval metrics and summary
    (a stand-in module records the calls; the real wandb import alone takes seconds)."""
    import types

    calls = {"log": [], "summary": {}}

    class Run:
        summary = calls["summary"]

        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    local_dataset("cartpole-medium")
    m.main(small(run_dir=str(tmp_path / "w"), total_steps=20, eval_every=20, eval_episodes=1,
                 log_every=10, track=True, wandb_entity="me"))
    assert calls["init"]["project"] == "cql-calql" and calls["init"]["entity"] == "me"
    assert calls["init"]["config"]["env"] == "cartpole-medium"
    assert [s for s, d in calls["log"] if "train/qr_loss" in d] == [10, 20]
    assert [s for s, d in calls["log"] if "eval/normalized_score" in d] == [20]
    assert "final_return" in calls["summary"] and calls.get("finished")
