"""cql_qrdqn_atari.py on each data family it names, as a user's first run meets it (issue 8):
Minari Atari (schema twin under the real id) and DQN Replay (dopamine's format): what evaluation
sees, the game checks, and the host-memory replay buffer."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dqn_replay import make_dqn_replay_dir

import cql_qrdqn_atari as m

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(total_steps=2, eval_every=2, eval_episodes=1, batch_size=4, max_episode_steps=30,
            log_every=1, progress=False)


def run(run_dir, env, **kw):
    """A few steps of the env's preset (tiny settings); returns config.json."""
    preset = m.preset_args(env, kw.pop("dataset_id", None), kw.pop("dqn_replay_dir", None),
                           kw.pop("data_fraction", 0.01))
    m.main(dataclasses.replace(preset, run_dir=str(run_dir), **{**TINY, **kw}))
    return json.loads((Path(run_dir) / "config.json").read_text())


def ale_settings(eval_env: dict) -> tuple[float, int]:
    """(sticky-action probability, no-op starts) of the env that config.json describes, read
    from the built env itself."""
    env = m.make_eval_env(eval_env)
    sticky = env.unwrapped.ale.getFloat("repeat_action_probability")
    noops = env.env.noop_max  # AtariPreprocessing under the frame stack
    env.close()
    return sticky, noops


# --- Minari Atari ----------------------------------------------------------------------------


def test_minari_atari_evaluates_with_the_datasets_sticky_setting(twin, tmp_path):
    """atari/breakout/expert-v0 was collected with repeat_action_probability 0: evaluation uses
    0 (not dopamine's 0.25) and no no-op starts, and config.json says so."""
    ds_id = twin("atari/breakout/expert-v0")
    assert m.preset_args("breakout").sticky_prob == 0.0  # read from the local data's spec
    config = run(tmp_path / "b", "breakout")
    assert config["dataset"]["dataset_id"] == ds_id
    ev = config["eval_env"]
    assert ev["id"] == "ALE/Breakout-v5" and ev["max_episode_steps"] == 30
    assert ev["kwargs"]["repeat_action_probability"] == 0.0
    assert ev["kwargs"]["frameskip"] == 4  # the dataset's ALE v5 internal frame-skip
    assert ev["wrappers"]["AtariPreprocessing"]["noop_max"] == 0
    assert ale_settings(ev) == (0.0, 0)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["final_return"] is not None and summary["final_score"] is not None


def test_minari_atari_sticky_comes_from_the_data_not_a_constant(local_dataset, tmp_path):
    """The local pong-random set was collected with ALE v5's default sticky actions (0.25):
    its evaluation uses 0.25, so the setting follows each dataset."""
    local_dataset("pong-random")
    assert m.preset_args("pong-random").sticky_prob == 0.25
    config = run(tmp_path / "p", "pong-random", dataset_id=None)
    assert config["eval_env"]["kwargs"]["repeat_action_probability"] == 0.25


# --- DQN Replay --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pong_replay(tmp_path_factory):
    root = tmp_path_factory.mktemp("dqn")
    return make_dqn_replay_dir(root / "Pong" / "1" / "replay_logs", num_checkpoints=2,
                               steps_per_checkpoint=400)


def test_dqn_replay_evaluates_as_dopamine(pong_replay, tmp_path):
    """dopamine's create_atari_environment: sticky actions 0.25, no no-op starts, frame-skip 4
    by the preprocessing (max-pooled), 27k steps in the preset."""
    assert m.preset_args("pong", dqn_replay_dir=str(pong_replay)).max_episode_steps == 27_000
    config = run(tmp_path / "r", "pong", dqn_replay_dir=str(pong_replay), data_fraction=0.5)
    ev = config["eval_env"]
    assert ev["id"] == "ALE/Pong-v5" and ev["kwargs"]["frameskip"] == 1
    assert ev["kwargs"]["repeat_action_probability"] == 0.25
    assert ev["wrappers"]["AtariPreprocessing"] == {"noop_max": 0, "frame_skip": 4,
                                                    "screen_size": 84, "grayscale_obs": True}
    assert ale_settings(ev) == (0.25, 0)


def test_dqn_replay_of_another_game_is_refused(pong_replay, tmp_path):
    """Pong data with --env breakout: a one-line error naming both games (it used to index Q out
    of range: Pong has 6 actions, Breakout 4)."""
    with pytest.raises(SystemExit, match=r"^error: --dqn-replay-dir .* holds pong data, but "
                                         r"--env is breakout"):
        m.parse_args(["--env", "breakout", "--dqn-replay-dir", str(pong_replay)])
    r = subprocess.run([sys.executable, str(ROOT / "cql_qrdqn_atari.py"), "--env", "breakout",
                        "--dqn-replay-dir", str(pong_replay)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --dqn-replay-dir")


def test_dqn_replay_actions_beyond_the_game_are_refused(tmp_path):
    """A folder named after Breakout that holds 6-action data: the largest action (5) is beyond
    Breakout's 4, a one-line error before any frame is read."""
    replay = make_dqn_replay_dir(tmp_path / "Breakout" / "1" / "replay_logs", num_checkpoints=1,
                                 steps_per_checkpoint=200)
    with pytest.raises(SystemExit, match=r"^error: --dqn-replay-dir .*: checkpoint 0 has action "
                                         r"5, but breakout has 4 actions"):
        run(tmp_path / "b", "breakout", dqn_replay_dir=str(replay), data_fraction=0.5)
    assert m.dqn_replay_game(str(replay)) == "breakout"
    assert m.dqn_replay_game("/data/SpaceInvaders/3/replay_logs") == "space_invaders"
    assert m.dqn_replay_game("/data/somewhere") is None


# --- replay buffer in host memory ----------------------------------------------------------------


def test_buffer_on_the_host_samples_what_the_device_buffer_samples(pong_replay):
    """--buffer-device cpu: the same batches (same generator on the CPU), each moved to the
    training device; the buffer's tensors stay on the host."""
    data = m.load_dqn_replay(str(pong_replay), 0.5, progress=False)
    cpu = torch.device("cpu")
    on_device = m.ReplayBuffer(data, cpu, 3, clip_reward=True)
    on_host = m.ReplayBuffer(data, cpu, 3, clip_reward=True, storage=cpu)
    torch.testing.assert_close(on_device.sample(8), on_host.sample(8))
    assert on_host.frames.device == cpu and on_host.nbytes() >= data.frames.nbytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_buffer_on_the_host_is_pinned_and_batches_reach_the_gpu(pong_replay):
    data = m.load_dqn_replay(str(pong_replay), 0.5, progress=False, pin=True)
    cuda = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    buf = m.ReplayBuffer(data, cuda, 0, clip_reward=True, storage=torch.device("cpu"))
    assert buf.frames.is_pinned() and buf.frames.device.type == "cpu"
    assert buf.frames.data_ptr() == torch.as_tensor(data.frames).data_ptr()  # no second copy
    batch = buf.sample(32)
    assert all(t.device.type == "cuda" for t in batch.values())
    reference = m.ReplayBuffer(data, torch.device("cpu"), 0, clip_reward=True)
    torch.testing.assert_close({k: t.cpu() for k, t in batch.items()}, reference.sample(32))
    assert torch.cuda.max_memory_allocated() - before < 2 * 2**20  # only batches on the GPU


def test_buffer_device_cpu_run_matches_the_default(pong_replay, tmp_path):
    """A run with --buffer-device cpu gives the same numbers as one with the default (here the
    training device is the CPU too, so the two differ only in the code path)."""
    kw = dict(dqn_replay_dir=str(pong_replay), data_fraction=0.5, total_steps=4, eval_every=4,
              log_every=2, seed=1)
    run(tmp_path / "dev", "pong", **kw)
    config = run(tmp_path / "host", "pong", buffer_device="cpu", **kw)
    assert config["args"]["buffer_device"] == "cpu"

    def rows(d):
        return [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").open()]

    a, b = rows("dev"), rows("host")
    for key in ("loss", "qr_loss", "cql_gap", "return_mean"):
        assert a[-1][key] == b[-1][key], key


def test_buffer_device_flag_parses():
    argv = ["--env", "pong", "--dqn-replay-dir", "d", "--buffer-device", "cpu"]
    assert m.parse_args(argv).buffer_device == "cpu"
    assert m.parse_args(argv[:4]).buffer_device == "device"
    assert np.dtype(m.host_zeros((2, 3), np.uint8, pin=False).dtype) == np.uint8
    assert os.environ.get("MINARI_DATASETS_PATH")  # conftest keeps tests off ~/.minari
