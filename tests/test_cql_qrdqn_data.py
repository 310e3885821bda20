"""cql_qrdqn_atari.py data: frame stacking, the DQN Replay loader, Minari Atari preprocessing."""

import gzip
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from dqn_replay import DQN_REPLAY_ELEMENTS, dqn_frame_step, make_dqn_replay_dir

import cql_qrdqn_atari as m

# --- frame stacking at episode boundaries ---------------------------------------------------------


def encoded_episode(ep: int, T: int, terminal: bool):
    """Frames whose pixels encode (episode, t): pixel [0,0] = ep+1, pixel [0,1] = t+1."""
    obs = np.zeros((T + 1, 84, 84), np.uint8)
    obs[:, 0, 0] = ep + 1
    obs[:, 0, 1] = np.arange(T + 1) + 1
    term = np.zeros(T, bool)
    term[-1] = terminal
    return obs, np.arange(T) % 3, np.ones(T, np.float32) * ep, term


def decode(frame):
    return int(frame[0, 0]) - 1, int(frame[0, 1]) - 1  # (-1, -1) for a zero frame


def test_frame_stack_never_crosses_episode_ends():
    lengths = [5, 1, 7, 2]
    eps = [encoded_episode(i, T, terminal=i != 2) for i, T in enumerate(lengths)]
    n_total = sum(lengths) + len(lengths) * 4
    frames, actions, rewards, dones, valid = m.episodes_layout(iter(eps), n_total, stack=4)
    data = m.Data(frames, actions, rewards, dones, valid, 4, 3, None)
    buf = m.ReplayBuffer(data, torch.device("cpu"), 0, clip_reward=False)
    assert len(buf) == sum(lengths)  # every transition of every episode, nothing else
    idx = torch.as_tensor(valid)
    obs, nxt = buf.stacked(idx).numpy(), buf.stacked(idx + 1).numpy()
    seen = set()
    for k, i in enumerate(valid):
        ep, t = decode(obs[k, -1])
        seen.add((ep, t))
        for j in range(4):  # frame j of the stack is step t-3+j of the SAME episode, or zero
            want = (ep, t - 3 + j) if t - 3 + j >= 0 else (-1, -1)
            assert decode(obs[k, j]) == want, (ep, t, j)
            want_next = (ep, t - 2 + j) if t - 2 + j >= 0 else (-1, -1)
            assert decode(nxt[k, j]) == want_next
        assert actions[i] == t % 3 and rewards[i] == ep
        assert dones[i] == float(t == lengths[ep] - 1 and ep != 2)
    assert seen == {(e, t) for e, T in enumerate(lengths) for t in range(T)}
    # the first state of an episode is [0, 0, 0, o_0] as dopamine's agent state at reset
    first = obs[[k for k in range(len(valid)) if decode(obs[k, -1]) == (2, 0)][0]]
    assert (first[:3] == 0).all()


def test_vector_layout_next_obs_and_truncation():
    T = 4
    obs = np.arange((T + 1) * 2, dtype=np.float32).reshape(T + 1, 2)
    ep = (obs, np.zeros(T, np.int64), np.ones(T, np.float32), np.zeros(T, bool))  # truncated
    frames, actions, rewards, dones, valid = m.episodes_layout(iter([ep, ep]), 2 * (T + 1), 1)
    data = m.Data(frames, actions, rewards, dones, valid, 1, 2, None)
    buf = m.ReplayBuffer(data, torch.device("cpu"), 0, clip_reward=False)
    assert len(buf) == 2 * T
    batch = buf.sample(64)
    assert sorted(batch) == ["actions", "dones", "next_obs", "obs", "rewards"]
    # next obs is the following row, also at truncation
    torch.testing.assert_close(batch["next_obs"], batch["obs"] + 2)
    assert (batch["dones"] == 0).all()


def test_reward_clipping():
    frames, actions, rewards, dones, valid = m.episodes_layout(
        iter([(np.zeros((3, 2), np.float32), np.zeros(2), np.array([5.0, -3.0]),
               np.zeros(2, bool))]), 3, 1)
    data = m.Data(frames, actions, rewards, dones, valid, 1, 1, None)
    assert m.ReplayBuffer(data, torch.device("cpu"), 0, True).rewards[:2].tolist() == [1, -1]
    assert m.ReplayBuffer(data, torch.device("cpu"), 0, False).rewards[:2].tolist() == [5, -3]


# --- DQN Replay (dopamine format) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def replay_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dqn") / "Pong" / "1" / "replay_logs"
    return make_dqn_replay_dir(path, num_checkpoints=3, steps_per_checkpoint=1000, seed=0)


def read_gz(path):
    with gzip.open(path, "rb") as f:
        return np.load(f)


def check_transitions(data: m.Data):
    """Every valid transition: consecutive agent steps of one episode, zeros only as a prefix
    right after an episode start, matching action/reward, next state shifted by one."""
    buf = m.ReplayBuffer(data, torch.device("cpu"), 0, clip_reward=False)
    idx = torch.as_tensor(data.valid)
    obs, nxt = buf.stacked(idx).numpy(), buf.stacked(idx + 1).numpy()
    terminal_steps = {dqn_frame_step(data.frames[i]) for i in np.flatnonzero(data.dones)}
    for k, i in enumerate(data.valid):
        steps = [dqn_frame_step(f) for f in obs[k]]
        g = steps[-1]
        assert g > 0, "a padding frame never starts a transition"
        n_zero = sum(s == 0 for s in steps)
        assert steps[:n_zero] == [0] * n_zero
        assert steps[n_zero:] == list(range(g - 3 + n_zero, g + 1)), steps
        # no episode end inside the stack; zero padding only right after an episode end
        assert not any(s in terminal_steps for s in steps[n_zero:-1])
        if n_zero:
            assert g - 3 + n_zero - 1 in terminal_steps or g - 3 + n_zero == 1
        assert data.actions[i] == g % 6 and data.rewards[i] == g % 3 - 1
        next_last = dqn_frame_step(nxt[k, -1])
        if data.dones[i]:
            assert g in terminal_steps
        else:
            assert next_last == g + 1
            assert [dqn_frame_step(f) for f in nxt[k, :-1]] == steps[1:]


def test_dqn_replay_loader_full(replay_dir):
    data = m.load_dqn_replay(str(replay_dir), 1.0, "all", progress=False)
    assert data.frames.shape == (3000, 84, 84) and data.stack == 4
    check_transitions(data)
    # nearly all of the 3000 stored rows are usable: only padding, each chunk's first rows
    # (3), its last row (1) and the rows around its write cursor (5) are not
    n_pad = sum(int((read_gz(replay_dir / f"$store$_observation_ckpt.{k}.gz")
                     .reshape(1000, -1).max(1) == 0).sum()) for k in range(3))
    assert 3000 - n_pad - 3 * (3 + 1 + 5) <= len(data.valid) <= 3000 - n_pad
    # cursor straddles are excluded (check_transitions would catch a jump in steps)
    assert data.n_actions == 6


def test_dqn_replay_fraction_takes_the_first_rows_of_each_chosen_checkpoint(replay_dir):
    data = m.load_dqn_replay(str(replay_dir), 0.1, "0,2", progress=False)
    assert data.frames.shape == (200, 84, 84)
    for chunk, k in enumerate((0, 2)):
        stored = read_gz(replay_dir / f"$store$_observation_ckpt.{k}.gz")
        np.testing.assert_array_equal(data.frames[chunk * 100:(chunk + 1) * 100], stored[:100])
        np.testing.assert_array_equal(
            data.dones[chunk * 100:(chunk + 1) * 100],
            read_gz(replay_dir / f"$store$_terminal_ckpt.{k}.gz")[:100])
    check_transitions(data)
    assert all(v % 100 >= 3 for v in data.valid)  # a stack never reaches outside its chunk
    assert all(v % 100 <= 98 for v in data.valid)  # the next frame lies inside the chunk
    assert m.parse_checkpoint_list("0-1", [0, 1, 2]) == [0, 1]
    with pytest.raises(SystemExit, match="checkpoints \\[7\\] not found"):
        m.load_dqn_replay(str(replay_dir), 0.1, "7", progress=False)


def test_read_npy_gz_partial(tmp_path):
    arr = np.arange(5 * 3 * 2, dtype=np.int16).reshape(5, 3, 2)
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        np.save(f, arr)
    np.testing.assert_array_equal(m._read_npy_gz(tmp_path / "a.gz", 2), arr[:2])
    np.testing.assert_array_equal(m._read_npy_gz(tmp_path / "a.gz"), arr)
    with gzip.open(tmp_path / "s.gz", "wb") as f:
        np.save(f, np.array(1234))
    assert int(m._read_npy_gz(tmp_path / "s.gz")) == 1234


def _load_ckpt(directory: Path, k: int) -> dict[str, np.ndarray]:
    arrays = {}
    for name in DQN_REPLAY_ELEMENTS:
        with gzip.GzipFile(directory / f"{name}_ckpt.{k}.gz") as f:
            arrays[name.removeprefix("$store$_")] = np.load(f, allow_pickle=False)
    return arrays


def test_dqn_replay_dir_format(tmp_path: Path) -> None:
    """The synthetic writer itself (tests/dqn_replay.py): dopamine's file set, dtypes, shapes,
    a wrapped circular buffer with its invalid range, and the encoded agent-step stream."""
    cap = 300
    directory = make_dqn_replay_dir(tmp_path / "Pong" / "1", num_checkpoints=2,
                                             steps_per_checkpoint=cap, seed=3)
    assert len(list(directory.glob("*.gz"))) == 12
    last_step = 0
    for k in range(2):
        a = _load_ckpt(directory, k)
        assert a["observation"].shape == (cap, 84, 84) and a["observation"].dtype == np.uint8
        assert a["action"].shape == (cap,) and a["action"].dtype == np.int32
        assert a["reward"].shape == (cap,) and a["reward"].dtype == np.float32
        assert a["terminal"].shape == (cap,) and a["terminal"].dtype == np.uint8
        assert a["add_count"].shape == () and a["add_count"].dtype == np.int64
        assert a["invalid_range"].shape == (5,) and a["invalid_range"].dtype == np.int64
        count = int(a["add_count"])
        assert count > (k + 1) * cap  # padding made the circular buffer wrap
        cursor = count % cap
        assert sorted(a["invalid_range"]) == sorted((cursor - 1 + i) % cap for i in range(5))
        steps = np.array([dqn_frame_step(f) for f in a["observation"]])
        real = steps > 0
        np.testing.assert_array_equal(a["action"][real], steps[real] % 6)
        np.testing.assert_array_equal(a["reward"][real], steps[real] % 3 - 1)
        assert not a["terminal"][~real].any() and not a["observation"][~real].any()
        newest = steps[(cursor - 1) % cap]
        assert newest == (k + 1) * cap and newest > last_step
        last_step = newest
        _check_stream(steps, a["terminal"], cursor)
    assert 0 < np.sum(_load_ckpt(directory, 1)["terminal"]) < cap // 40 + 2


def _check_stream(steps: np.ndarray, terminal: np.ndarray, cursor: int) -> None:
    """Walk the buffer from oldest to newest: steps go up by one; 3 zero frames after ends."""
    order = [(cursor + i) % len(steps) for i in range(len(steps))]
    seq, term = steps[order], terminal[order]
    real = np.flatnonzero(seq > 0)
    for i, j in zip(real[:-1], real[1:], strict=True):
        assert seq[j] == seq[i] + 1
        gap = j - i - 1
        assert gap == (3 if term[i] else 0)


# --- Minari Atari: preprocessing equals the evaluation env's observations -----------------------


def test_minari_atari_frames_equal_eval_env_observations(local_dataset):
    """Replaying the dataset's actions in the evaluation env (same reset seed, no no-ops) gives
    exactly the loaded, preprocessed and stacked frames of the data."""
    ds_id = local_dataset("pong-random")
    data = m.minari_data(m.load_minari_dataset(ds_id), progress=False)
    assert data.stack == 4 and data.atari_internal_frameskip
    assert data.frames.dtype == np.uint8 and data.frames.shape[1:] == (84, 84)
    env = m.make_eval_env(m.atari_eval_env("pong", internal_frameskip=True, noop_max=0))
    obs, _ = env.reset(seed=0)  # benchmark/datasets.py: episode k resets with seed + k
    first = int(data.valid[0])
    buf = m.ReplayBuffer(data, torch.device("cpu"), 0, clip_reward=False)
    np.testing.assert_array_equal(np.asarray(obs), buf.stacked(torch.tensor([first]))[0].numpy())
    for t in range(300):
        i = first + t
        obs, r, term, trunc, _ = env.step(int(data.actions[i]))
        np.testing.assert_array_equal(np.asarray(obs),
                                      buf.stacked(torch.tensor([i + 1]))[0].numpy(), err_msg=t)
        assert r == data.rewards[i]
    env.close()


def test_preprocess_rgb_equals_ale_grayscale_resize():
    import ale_py

    gym.register_envs(ale_py)
    env = gym.make("ALE/Breakout-v5", repeat_action_probability=0.0)
    env.reset(seed=3)
    for _ in range(20):
        rgb, *_ = env.step(env.action_space.sample())
    import cv2

    gray = env.unwrapped.ale.getScreenGrayscale()
    np.testing.assert_array_equal(m.preprocess_rgb(rgb),
                                  cv2.resize(gray, (84, 84), interpolation=cv2.INTER_AREA))
    env.close()


def test_eval_env_settings():
    env = m.make_eval_env(m.atari_eval_env("breakout"))
    env.reset(seed=0)
    base = env.unwrapped
    assert base._frameskip == 1  # frame skip (with max-pooling) done by AtariPreprocessing
    assert env.observation_space.shape == (4, 84, 84)
    assert base.ale.getFloat("repeat_action_probability") == pytest.approx(0.25)
    assert base.ale.getInt("max_num_frames_per_episode") == 108_000
    obs, _ = env.reset(seed=1)
    assert (np.asarray(obs)[:3] == 0).all()  # zero-padded stack at reset
    env.close()


# --- data validated once, when loaded (issue 19 items 2-4) ----------------------------------------


def edited_dataset(root: Path, name: str, edit_h5=None, edit_env_spec=None) -> str:
    """A tiny CartPole Minari dataset (conftest.write_dataset, 2 episodes) in `root`, its HDF5
    file edited with h5py (edit_h5(file)) and/or its metadata's env spec (edit_env_spec(dict))."""
    import json

    import h5py
    from conftest import write_dataset

    dataset_id = f"test/cartpole/{name}-v0"
    write_dataset(root, dataset_id, "CartPole-v1")
    data = root / "test" / "cartpole" / f"{name}-v0" / "data"
    if edit_h5:
        with h5py.File(data / "main_data.hdf5", "r+") as f:
            edit_h5(f)
    if edit_env_spec:
        meta = json.loads((data / "metadata.json").read_text())
        spec = json.loads(meta["env_spec"])
        edit_env_spec(spec)
        meta["env_spec"] = json.dumps(spec)
        (data / "metadata.json").write_text(json.dumps(meta))
    return dataset_id


def no_steps(episode) -> None:
    """Episode group -> an episode of zero steps (its reset observation only)."""
    obs = episode["observations"][:1]
    for key in ("actions", "rewards", "terminations", "truncations", "observations"):
        old = episode[key][:0] if key != "observations" else obs
        del episode[key]
        episode.create_dataset(key, data=old)
    episode.attrs["total_steps"] = 0


def load_error(dataset_id: str, tmp_path) -> str:
    from conftest import error_of

    return error_of(m, ["--dataset-id", dataset_id, "--total-steps", "2", "--eval-every", "2",
                        "--no-progress", "--run-dir", str(tmp_path / "run")])


def test_dataset_actions_outside_the_action_space_are_refused_at_load(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "ds"))

    def bad(f):
        f["episode_1"]["actions"][3] = 7
        f["episode_0"]["actions"][0] = -1

    line = load_error(edited_dataset(tmp_path / "ds", "badact", bad), tmp_path)
    assert "dataset test/cartpole/badact-v0: 2 of " in line and "outside [0, 2)" in line
    assert not (tmp_path / "run").exists()  # refused before the run started


def test_zero_step_episodes_are_skipped_and_none_left_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "ds"))
    one = edited_dataset(tmp_path / "ds", "onezero", lambda f: no_steps(f["episode_0"]))
    data = m.minari_data(m.load_minari_dataset(one), progress=False)
    full = edited_dataset(tmp_path / "ds", "full")
    ref = m.minari_data(m.load_minari_dataset(full), progress=False)
    n1 = len(list(m.load_minari_dataset(full).iterate_episodes())[1].actions)
    assert len(data.valid) == n1 < len(ref.valid)  # only episode 1's transitions remain
    np.testing.assert_array_equal(data.actions[data.valid], ref.actions[ref.valid][-n1:])

    def both(f):
        no_steps(f["episode_0"])
        no_steps(f["episode_1"])

    line = load_error(edited_dataset(tmp_path / "ds", "allzero", both), tmp_path)
    assert line == "error: dataset test/cartpole/allzero-v0 has no episode with at least one step"


@pytest.mark.parametrize("edit, names", [
    (lambda s: s.update(id="NoSuchEnv-v0", entry_point="no_such_package.envs:Env"),
     "NoSuchEnv-v0"),
    (lambda s: s.update(entry_point="no_such_package.envs:Env"), "no_such_package")])
def test_an_env_that_cannot_be_created_is_named(edit, names, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "ds"))
    dataset_id = edited_dataset(tmp_path / "ds", "noenv", edit_env_spec=edit)
    line = load_error(dataset_id, tmp_path)
    assert line.startswith(f"error: dataset {dataset_id}: cannot create its environment")
    assert names in line, line


# --- a dataset that is not there ---------------------------------------------------------------


def test_a_mistyped_game_id_gives_the_download_error_and_the_closest_known_id(
        offline_minari, tmp_path):
    pytest.importorskip("ale_py")  # the games' ids come from ale-py's ROMs
    line = load_error("atari/pongg/expert-v0", tmp_path)
    root = tmp_path / "datasets"
    assert line == (f"error: dataset atari/pongg/expert-v0 is not under {root} and could not be "
                    "downloaded (ConnectionError: [Errno -2] Name or service not known); no "
                    "preset names it: did you mean atari/pong/expert-v0? (get it with `minari "
                    "download atari/pong/expert-v0` on a machine with network and copy its "
                    f"~/.minari/datasets/atari/pong/expert-v0 to {root}/atari/pong/expert-v0 "
                    "here; `minari list remote` (with network) lists Minari's ids)")
    assert offline_minari == ["atari/pongg/expert-v0"]
    assert "atari/spaceinvaders/expert-v0" in m.atari_dataset_ids()  # any ALE game, as --env


def test_a_mistyped_local_id_gives_the_closest_one_and_a_build_command_that_works(
        offline_minari, datasets_cli, tmp_path):
    line = load_error("local/cartpole/expret-v0", tmp_path)
    assert line.endswith("no preset names it: did you mean local/cartpole/expert-v0? (build it "
                         "with: python benchmark/datasets.py local/cartpole/expert-v0; `python "
                         "benchmark/datasets.py --list` lists the local datasets it builds)"), line
    assert offline_minari == []  # a local id is never downloaded
    command = "build it with: python benchmark/datasets.py "
    names = [m.how_to_get(ds).removeprefix(command) for ds in m.LOCAL_ENVS.values()]
    assert datasets_cli(*names) == list(m.LOCAL_ENVS.values())


@pytest.mark.parametrize("game", ["pong", "space_invaders"])
def test_the_gsutil_command_of_a_missing_replay_dir_puts_the_run_where_it_says(game, tmp_path):
    """`gsutil cp -R SRC DEST` into an existing folder DEST writes DEST/<SRC's last name>: the
    hint's mkdir, gsutil copy and path to pass agree, and the game is read from that path."""
    pytest.importorskip("ale_py")
    with pytest.raises(SystemExit) as stop:
        m.load_dqn_replay(str(tmp_path / "missing"), 1.0, game=game)
    line = str(stop.value.code).replace("DIR", str(tmp_path))
    made, src, dest = re.search(r"`mkdir -p (\S+) && gsutil -m cp -R (gs://\S+) (\S+)`",
                                line).groups()
    assert made == dest and src.startswith("gs://atari-replay-datasets/dqn/")
    copied = make_dqn_replay_dir(Path(dest) / src.rsplit("/", 1)[1] / "replay_logs",
                                 num_checkpoints=1, steps_per_checkpoint=200)
    passed = re.search(r"and pass (\S+)$", line).group(1)
    assert Path(passed) == copied and m.dqn_replay_game(passed) == game
    data = m.load_dqn_replay(passed, 1.0, progress=False, game=game)
    assert len(data.valid) > 0
