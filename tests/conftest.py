"""Shared fixtures: local Minari datasets are built once per checkout into .cache/minari; the
three scripts as the run-contract tests drive them; hand-made bad datasets and bad inputs."""

import collections
import importlib
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests never touch the user's ~/.minari: every dataset they need is built locally, once.
os.environ.setdefault("MINARI_DATASETS_PATH", str(ROOT / ".cache" / "minari"))
os.environ.setdefault("WANDB_MODE", "disabled")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: more threads oversubscribe
    os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run order for `--dist loadfile` (pyproject.toml): the learning checks' modules (marked
    slow; each a module-scoped run of minutes) first, then the others by number of tests, most
    first. xdist orders by count alone (its --loadscope-reorder, turned off in addopts), which
    sent the learning modules, a few tests each, last: one worker then ran the 3-minute CQL-SAC
    fixture alone at the end (2026-12-07, 2 cores: 578 s, the other worker idle the last 175).
    With this order no worker idles, but CI took 568 s: the fixture took 270 s next to a busy
    worker against 175 s alone, so the two CPUs here do not run two workers at full speed.
    What brought CI to 405 s (fresh clone and venv, cold caches) was less work: run_script
    forks from a process with torch imported (tests/preloaded.py), saving 1.6 s per command."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    count = collections.Counter(item.path for item in items)
    items.sort(key=lambda item: (item.path not in slow, -count[item.path], str(item.path)))


@pytest.fixture(scope="session")
def local_dataset():
    """Return a builder `local_dataset(name) -> dataset_id` that builds the dataset if missing."""
    from benchmark import datasets

    return datasets.ensure


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Scripts' main() may set torch's thread count (a preset's `threads`); tests run in one
    process, so put it back after each test."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for tests of small networks: with two, a shared CPU
    oversubscribes and steps get many times slower (restored by the fixture above)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def twin(monkeypatch):
    """Return `twin(dataset_id) -> dataset_id` for a REAL Minari id (tests/twins.py TWINS).

    Builds the schema twin once per checkout into .cache/twins/<hash of tests/twins.py> (a
    cheap no-op when present) and points MINARI_DATASETS_PATH there for this test, so the
    scripts' `minari.load_dataset(dataset_id)` finds it (Minari reads the variable at each
    call). Skips the test when the twin's environment cannot be built here."""
    import twins

    root = twins.cache_root(ROOT)

    def make(dataset_id: str) -> str:
        try:
            twins.build_twin(dataset_id, root)
        except twins.TwinUnavailable as err:
            pytest.skip(str(err))
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
        return dataset_id

    return make


# ======================================================================================
# The three scripts, as the run-contract tests (tests/test_run_contract.py) drive them
# ======================================================================================
TIMING_KEYS = ("updates_per_sec", "wall_time_s")  # the only summary values that vary per run
ROW_TIMING_KEYS = ("wall_time_s",)  # the only metrics-row value that varies per run
# The run-file keys the three scripts share (docs/run_files.md): every metrics row has
# ROW_KEYS (Cal-QL also phase and env_steps; then each script's training metrics), every
# summary.json SUMMARY_KEYS; none has one of the keys they replace (issue 22 item 4).
ROW_KEYS = frozenset({"step", "wall_time_s", "return_mean", "return_std", "score",
                      "success_rate", "episode_length", "value_gap", "value_gap_return",
                      "value_gap_steps", "value_gap_tail_bound", "q_pred_s0"})
SUMMARY_KEYS = frozenset({"final_score", "final_return", "final_success_rate", "value_gap",
                          "value_gap_return", "score_definition", "updates_per_sec",
                          "wall_time_s"})
OLD_ROW_KEYS = frozenset({"normalized_score", "length_mean"})
OLD_SUMMARY_KEYS = frozenset({"final_normalized_score", "score", "success_rate"})


@dataclass(frozen=True)
class Script:
    """One script and the tiny run the contract tests give it (hidden 16, batch 32, one
    evaluation episode). `schedule`: the reference run's lengths (a few hundred gradient
    steps); `length`: the flag a finished run may be extended by (LENGTH_FIELD)."""

    key: str
    file: str
    dataset: str                 # benchmark/datasets.py name of its local dataset
    argv: tuple[str, ...]        # --env, tiny sizes, no progress bar
    schedule: dict[str, str]     # flag -> value of the reference run
    length: str                  # --total-steps / --online-steps (RESUME_FREE's length)
    short: str                   # value of `length` for a run to be extended to `schedule`'s
    steps: str                   # the flag of the number of gradient steps (Cal-QL: offline)
    eval_every: str              # the flag of the evaluation period of those steps
    no_online: tuple[str, ...]   # what makes the run gradient steps only
    first_steps: tuple[int, ...]  # the reference run's first evaluation steps
    signal_stops: tuple[tuple[int, int | None], ...]  # (Trainer.step calls after which a
    # session is stopped, the step its checkpoint must have; None: a later boundary)
    config: dict[str, Any]       # config.json "section.key" -> value, for the tiny run
    finite: tuple[str, ...]      # row keys finite in every row after step 0
    summary_of_last_row: dict[str, str]  # summary key -> the last row's key it repeats
    scored: bool                 # score = 100 (return - ref_min) / (ref_max - ref_min)

    @property
    def path(self) -> str:
        return str(ROOT / self.file)

    @property
    def module(self):
        return importlib.import_module(Path(self.file).stem)

    def args(self, run_dir: Path, *extra: str, **schedule: str) -> list[str]:
        """The command line of a tiny run in `run_dir`: the reference schedule, with
        `schedule` (flag name with underscores -> value) and `extra` flags on top."""
        flags = {**self.schedule, **{f"--{k.replace('_', '-')}": v for k, v in schedule.items()}}
        return [*self.argv, *(x for kv in flags.items() for x in kv), "--run-dir",
                str(run_dir), *extra]


SUMMARY_OF_LAST_ROW = {"final_score": "score", "final_return": "return_mean",
                       "final_success_rate": "success_rate", "value_gap": "value_gap",
                       "value_gap_return": "value_gap_return"}
SAC_WIDTHS = ("--actor-hidden-dims", "16", "16", "--critic-hidden-dims", "16", "16")
TINY = ("--batch-size", "32", "--eval-episodes", "1",
        "--log-every", "25", "--no-progress")
SCRIPTS = {s.key: s for s in (
    Script("cql_sac", "cql_sac_continuous.py", "pendulum-medium",
           ("--env", "pendulum-medium", *SAC_WIDTHS, *TINY, "--cql-n-actions", "3"),
           {"--total-steps": "400", "--eval-every": "100"}, "--total-steps", "200",
           "--total-steps", "--eval-every", (), (100, 200, 300, 400), ((150, 150),),
           {"args.env": "pendulum-medium", "args.cql_weight": 5.0,
            "args.actor_hidden_dims": [16, 16], "args.critic_hidden_dims": [16, 16],
            "dataset.dataset_id": "local/pendulum/medium-v0", "eval_env.id": "Pendulum-v1",
            "eval_env.max_episode_steps": 200},
           ("score", "return_mean", "value_gap", "critic_loss", "actor_loss",
            "alpha", "alpha_prime", "cql_gap", "bellman_loss"), SUMMARY_OF_LAST_ROW, True),
    # Cal-QL: offline 100 gradient steps, then 200 environment steps at UTD 1; evaluation at
    # step 0 (before any update), every 50 offline steps, every 100 environment steps.
    Script("calql", "calql_finetune.py", "pointmaze-sparse",
           ("--env", "pointmaze-binary", *SAC_WIDTHS, *TINY, "--cql-n-actions", "3"),
           {"--offline-steps": "100", "--offline-eval-every": "50", "--online-steps": "200",
            "--eval-every": "100"}, "--online-steps", "0",
           "--offline-steps", "--offline-eval-every", ("--online-steps", "0"), (0, 50, 100),
           ((45, 45), (100, None)),  # the second session stops online, at a trajectory's end
           {"args.env": "pointmaze-binary", "args.actor_hidden_dims": [16, 16],
            "args.critic_hidden_dims": [16, 16], "dataset.dataset_id": "local/pointmaze/sparse-v0",
            "eval_env.id": "PointMaze_UMaze-v3", "eval_env.max_episode_steps": 100},
           ("score", "success_rate", "value_gap", "critic_loss", "actor_loss", "cql_gap"),
           SUMMARY_OF_LAST_ROW, False),
    Script("qrdqn", "cql_qrdqn_atari.py", "cartpole-medium",
           ("--env", "cartpole-medium", "--hidden-dims", "16", "16", *TINY, "--num-quantiles", "8"),
           {"--total-steps": "400", "--eval-every": "100"}, "--total-steps", "200",
           "--total-steps", "--eval-every", (), (100, 200, 300, 400), ((150, 150),),
           {"args.env": "cartpole-medium", "args.cql_weight": 1.0, "args.hidden_dims": [16, 16],
            "dataset.dataset_id": "local/cartpole/medium-v0", "eval_env.id": "CartPole-v1",
            "eval_env.max_episode_steps": 500, "eval_env.kwargs": {}},
           ("return_mean", "score", "qr_loss", "cql_loss", "cql_gap",
            "alpha_prime", "q_pred_s0", "value_gap"), SUMMARY_OF_LAST_ROW, True),
)}


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows; strict JSON (NaN/Infinity refused)."""
    return [strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def untimed(rows: list[dict]) -> list[dict]:
    """Metrics rows without their wall time (ROW_TIMING_KEYS), to compare two runs."""
    return [{k: v for k, v in r.items() if k not in ROW_TIMING_KEYS} for r in rows]


def read_json(path: Path) -> Any:
    return strict_json(path.read_text())


def strict_json(text: str) -> Any:
    def refuse(constant: str):
        raise ValueError(f"not valid JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def run_script(script: str, *argv: str, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """`python SCRIPT argv` to the end, one torch thread, stdout and stderr captured: forked
    from a process with torch imported (tests/preloaded.py; the same process, status and
    output, 1.6 s sooner), or a fresh interpreter with TESTS_FRESH_PYTHON=1."""
    if os.environ.get("TESTS_FRESH_PYTHON") == "1":
        return fresh_python(script, *argv, env=env, timeout=timeout)
    return PRELOADED.run(script, list(argv), script_env(env), timeout)


def fresh_python(script: str, *argv: str, env: dict[str, str] | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=script_env(env))


class PreloadedPython:
    """This test process's tests/preloaded.py server, started on first use, ended with it."""

    def __init__(self) -> None:
        self.server: subprocess.Popen | None = None
        self.sys_path: list[str] = []
        self.pending = b""

    def start(self) -> None:
        # a fresh interpreter's sys.path after its first entry (the script's directory)
        probe = "import json, sys; print(json.dumps(sys.path[1:]))"
        self.sys_path = json.loads(subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
            env=script_env(), check=True).stdout)
        self.server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "preloaded.py")],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       cwd=ROOT, env=script_env())

    def reply(self, timeout: float | None) -> dict | None:
        """The server's next reply line; None: none within `timeout` seconds."""
        fd = self.server.stdout.fileno()
        while b"\n" not in self.pending:
            if not select.select([fd], [], [], timeout)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("tests/preloaded.py ended; TESTS_FRESH_PYTHON=1 bypasses it")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, script: str, argv: list[str], env: dict[str, str], timeout: float
            ) -> subprocess.CompletedProcess:
        if self.server is None or self.server.poll() is not None:
            self.start()
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            path = Path(script) if Path(script).is_absolute() else ROOT / script
            request = dict(script=script, path=str(path), argv=argv, env=env, cwd=str(ROOT),
                           sys_path=[str(path.parent), *self.sys_path], stdout=str(out),
                           stderr=str(err))
            self.server.stdin.write((json.dumps(request) + "\n").encode())
            self.server.stdin.flush()
            pid = self.reply(None)["pid"]
            done = self.reply(timeout)
            if done is None:  # past its time: killed, as subprocess.run(timeout=) does
                os.kill(pid, signal.SIGKILL)
                self.reply(None)
                raise subprocess.TimeoutExpired([script, *argv], timeout, text_of(out),
                                                text_of(err))
            return subprocess.CompletedProcess([sys.executable, script, *argv],
                                               done["returncode"], text_of(out), text_of(err))


def text_of(path: Path) -> str:
    """A captured stream's text ('' where the child never wrote it)."""
    return path.read_bytes().decode("utf-8", "replace") if path.exists() else ""


PRELOADED = PreloadedPython()


def start_script(script: str, *argv: str) -> subprocess.Popen:
    """`python SCRIPT argv` in the background (to be signalled)."""
    return subprocess.Popen([sys.executable, script, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=script_env())


def script_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


def one_line_error(text: str) -> str:
    """The one-line error a script stopped with (`error: ...`, no traceback)."""
    assert "Traceback" not in text, text[-3000:]
    line = text.strip().splitlines()[-1]
    assert line.startswith("error: "), text[-3000:]
    return line


def help_entries(out: str) -> dict[str, str]:
    """A script's --help (Part III's grouped_help) -> {flag: its entry on one line, usage and
    help text, ending in `(default: X)`}."""
    entries, flag = {}, None
    for line in out.splitlines():
        if line.startswith("  --"):
            flag = line.split()[0]
            entries[flag] = line.strip()
        elif line.startswith("      ") and flag is not None:
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return entries


def help_default(entry: str) -> str:
    """The value an entry of help_entries shows: `(default: X)` -> X."""
    return entry.rsplit("(default: ", 1)[1].removesuffix(")")


def error_of(module, argv: list[str]) -> str:
    """`main(parse_args(argv))` in this process must stop with a one-line error (exit 1)."""
    try:
        module.main(module.parse_args(argv))
    except SystemExit as exc:
        assert isinstance(exc.code, str), f"exit {exc.code!r} without a message"
        assert "\n" not in exc.code, exc.code
        return one_line_error(exc.code)
    raise AssertionError(f"{argv} ran without an error")



@pytest.fixture
def offline_minari(monkeypatch, tmp_path):
    """Minari with no network: MINARI_DATASETS_PATH an empty folder, and every download failing
    with a two-line message (as httpx's do; a one-line error keeps only the first line).
    Returns the ids a download was tried for (a local/ id must never be one)."""
    import minari

    local_only, tried = minari.load_dataset, []

    def load_dataset(dataset_id: str, download: bool = False):
        if not download:
            return local_only(dataset_id)  # FileNotFoundError: the folder is empty
        tried.append(dataset_id)
        raise ConnectionError("[Errno -2] Name or service not known\n"
                              "while requesting GET https://huggingface.co/api/datasets")

    monkeypatch.setattr(minari, "load_dataset", load_dataset)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    return tried


@pytest.fixture
def datasets_cli(monkeypatch):
    """Return `datasets_cli(*argv) -> names`: `python benchmark/datasets.py argv` as its main()
    takes it (unknown names exit 2), with each build recorded instead of run."""
    from benchmark import datasets

    built: list[str] = []
    monkeypatch.setattr(datasets, "is_built", lambda name: False)
    monkeypatch.setattr(datasets, "build", lambda name, force=False: built.append(name))

    def run(*argv: str) -> list[str]:
        datasets.main(list(argv))
        return built

    return run


# ---------------------------------------------------------------- hand-made bad datasets
def write_dataset(root: Path, dataset_id: str, env_id: str, episodes: int = 2,
                  steps: int = 10, nan_reward: bool = False, success: bool | None = None) -> None:
    """A tiny Minari dataset in `root` (random actions, episodes cut after `steps`);
    nan_reward: a NaN reward at t=3; success: a per-step `success` info of that value."""
    import gymnasium as gym
    import minari
    import numpy as np
    from minari.data_collector import EpisodeBuffer

    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        env = gym.make(env_id)
        env.action_space.seed(0)
        buffers = []
        for k in range(episodes):
            obs, _ = env.reset(seed=k)
            rows = dict(observations=[obs], actions=[], rewards=[], terminations=[],
                        truncations=[])
            for t in range(steps):
                action = env.action_space.sample()
                obs, reward, term, _, _ = env.step(action)
                for key, value in (("observations", obs), ("actions", action),
                                   ("rewards", np.nan if nan_reward and t == 3 else reward),
                                   ("terminations", term),
                                   ("truncations", t == steps - 1 and not term)):
                    rows[key].append(value)
                if term:
                    break
            infos = (None if success is None else
                     {"success": np.full(len(rows["observations"]), success)})
            buffers.append(EpisodeBuffer(**{k: np.asarray(v) for k, v in rows.items()},
                                         infos=infos))
        minari.create_dataset_from_buffers(dataset_id, buffers, env=env_id)
    finally:
        os.environ["MINARI_DATASETS_PATH"] = old or ""


def edit_dataset(root: Path, source: str, dataset_id: str, empty: tuple[int, ...] = (),
                 **meta: Any) -> None:
    """A copy of dataset `source` in `root` as `dataset_id`, its episodes `empty` left with no
    step and the metadata's `meta` entries (action_space, env_spec: dicts) replaced."""
    import h5py

    src, dst = root / source, root / dataset_id
    shutil.copytree(src, dst)
    (dst / "data" / "metadata.json").write_text(json.dumps({
        **json.loads((src / "data" / "metadata.json").read_text()), "dataset_id": dataset_id,
        **{k: json.dumps(v) for k, v in meta.items()}}))
    with h5py.File(dst / "data" / "main_data.hdf5", "a") as f:
        for k in empty:
            ep = f[f"episode_{k}"]
            for name in list(ep):
                data = ep[name][()]
                del ep[name]
                ep.create_dataset(name, data=data[:1 if name == "observations" else 0])
            ep.attrs["total_steps"] = 0


@pytest.fixture(scope="session")
def bad_root(tmp_path_factory) -> Path:
    """A datasets root with hand-made datasets and nothing else (no local datasets)."""
    root = tmp_path_factory.mktemp("bad-datasets")
    write_dataset(root, "test/cartpole/tiny-v0", "CartPole-v1")
    write_dataset(root, "test/cartpole/nan-v0", "CartPole-v1", nan_reward=True)
    write_dataset(root, "test/pendulum/nan-v0", "Pendulum-v1", nan_reward=True)
    write_dataset(root, "test/pendulum/dense-v0", "Pendulum-v1")
    write_dataset(root, "test/pendulum/fail-v0", "Pendulum-v1", success=False)
    # issue 19: zero-step episodes, actions outside the bounds, an env that cannot be made
    dense, box = "test/pendulum/dense-v0", dict(type="Box", dtype="float32", shape=[1])
    edit_dataset(root, dense, "test/pendulum/one-empty-v0", empty=(0,))
    edit_dataset(root, dense, "test/pendulum/all-empty-v0", empty=(0, 1))
    edit_dataset(root, dense, "test/pendulum/narrow-v0", action_space={**box, "low": [-0.5],
                                                                      "high": [0.5]})
    edit_dataset(root, dense, "test/pendulum/unbounded-v0",
                 action_space={**box, "low": [-math.inf], "high": [math.inf]})
    spec = json.loads(json.loads((root / dense / "data" / "metadata.json").read_text())[
        "env_spec"])
    edit_dataset(root, dense, "test/pendulum/unregistered-v0",
                 env_spec={**spec, "id": "NoSuchEnv-v0", "entry_point": None})
    edit_dataset(root, dense, "test/pendulum/no-module-v0",
                 env_spec={**spec, "id": "NoSuchEnv-v0", "entry_point": "nosuchpkg.envs:Env"})
    return root


# Bad continuous-action data (issue 19), the same cases and messages for CQL-SAC and Cal-QL.
_CONTINUOUS_DATA: dict[str, tuple[list[str], tuple[str, ...], str]] = {
    "no-stepped-episode": (["--dataset-id", "test/pendulum/all-empty-v0"], (
        "test/pendulum/all-empty-v0 has no episode with at least one step",), "main"),
    "actions-outside-bounds": (["--dataset-id", "test/pendulum/narrow-v0"], (
        "narrow-v0: 16 of 20 actions are outside", "(low [-0.5], high [0.5])"), "main"),
    "unbounded-actions": (["--dataset-id", "test/pendulum/unbounded-v0"],
                          ("unbounded-v0: its action space", "not finite"), "main"),
    "unregistered-env": (["--dataset-id", "test/pendulum/unregistered-v0"], (
        "unregistered-v0: cannot build the evaluation env NoSuchEnv-v0",
        "install the package that registers it"), "main"),
    # the entry point config.json records (spec_dict) names the missing module
    "missing-entry-point": (["--dataset-id", "test/pendulum/no-module-v0"], (
        "no-module-v0: cannot build", "install the package with the module nosuchpkg"), "main"),
}


# Per script, bad inputs on the datasets of `bad_root` (MINARI_DATASETS_PATH) with no
# network (HF_HUB_OFFLINE=1): case -> (flags after the tiny run's, what the error line says
# (substrings, or regular expressions), "main" (main(parse_args) in the test's process) or
# "cli" (the command line: needed where an import-time setting matters, HF_HUB_OFFLINE)).
BAD_INPUTS: dict[str, dict[str, tuple[list[str], tuple[str | re.Pattern, ...], str]]] = {
    "cql_sac": {
        "unknown-env": (["--env", "hopper-mediun"], ("unknown --env 'hopper-mediun'",), "cli"),
        "missing-local": (["--env", "pendulum-medium-replay"], (
            "build it with: python benchmark/datasets.py local/pendulum/medium-replay-v0",),
            "main"),
        "discrete": (["--dataset-id", "test/cartpole/tiny-v0"], ("use cql_qrdqn_atari.py",),
                     "main"),
        "nan": (["--dataset-id", "test/pendulum/nan-v0"], ("non-finite values in 'rewards'",),
                "main"),
        "no-cuda": (["--device", "cuda"], ("no CUDA device",), "main"),
        "no-network": (["--dataset-id", "D4RL/pen/human-v2"], (
            "could not be downloaded (OfflineModeIsEnabled: Cannot reach https://huggingface.co/",
            "get it with `minari download D4RL/pen/human-v2` on a machine with network"), "cli"),
        **_CONTINUOUS_DATA,
        "gamma-one": (["--gamma", "1.0"], ("--gamma must be in [0, 1), got 1.0",), "main"),
    },
    "calql": {
        "no-success-info": (["--env", "pen-binary", "--dataset-id", "test/pendulum/dense-v0"],
                            ("has no per-step 'success' info; --env pen-binary needs it "
                             "(binary",), "cli"),
        "all-failures": (["--env", "pen-binary", "--dataset-id", "test/pendulum/fail-v0"],
                         ("none of its 2 trajectories reaches success",), "main"),
        "dense-as-binary": (["--env", "hopper-binary"], ("hopper is a dense-reward task",),
                            "main"),
        "mixing-ratio": (["--mixing-ratio", "1.5"], ("--mixing-ratio must be in [0, 1]",),
                         "cli"),
        "negative-mixing": (["--mixing-ratio", "-0.1"], ("must be in [0, 1]",), "main"),
        "unknown-env": (["--env", "antmaze-umazee"], ("unknown --env 'antmaze-umazee' (did "
                                                       "you mean antmaze-umaze",), "main"),
        "adroit-level": (["--env", "pen-cloned"], ("--env pen-cloned: Cal-QL runs pen as its "
                                                   "binary task: use --env pen-binary",), "cli"),
        "missing-local": (["--env", "pointmaze-binary"], (
            "build it with: python benchmark/datasets.py local/pointmaze/sparse-v0",), "main"),
        "no-network": (["--env", "pen-binary"], (
            "could not be downloaded (OfflineModeIsEnabled: Cannot reach https://huggingface.co/",
            "get it with `minari download D4RL/pen/cloned-v2` on a machine with network"), "cli"),
        **_CONTINUOUS_DATA,
        "gamma-one": (["--gamma", "1.0"], ("--gamma must be in [0, 1), got 1.0",), "main"),
    },
    "qrdqn": {
        "unknown-env": (["--env", "walker"], ("unknown --env 'walker'; valid: pong, breakout",),
                        "main"),
        "unknown-env-cli": (["--env", "notagame"], ("error: unknown --env 'notagame'",), "cli"),
        "continuous": (["--dataset-id", "test/pendulum/dense-v0"],
                       (re.compile("continuous action space.*cql_sac_continuous.py"),), "main"),
        "missing-replay-dir": (["--env", "pong", "--dqn-replay-dir", "/nonexistent/dqn"],
                               (re.compile("--dqn-replay-dir .* does not exist.*gsutil"),),
                               "main"),
        "empty-replay-dir": (["--env", "pong", "--dqn-replay-dir", "{tmp}"],
                             ("no $store$_observation_ckpt",), "main"),
        "unknown-game": (["--env", "pongg", "--dqn-replay-dir", "{tmp}"],
                         ("Atari game as --env: 'pongg' unknown; valid: pong",), "main"),
        "local-as-game": (["--env", "cartpole-expert", "--dqn-replay-dir", "{tmp}"],
                          ("'cartpole-expert' is a local dataset, not an Atari",), "main"),
        "missing-local": (["--env", "cartpole-expert"], (
            "dataset local/cartpole/expert-v0 is not under",
            "build it with: python benchmark/datasets.py local/cartpole/expert-v0"), "cli"),
        "no-network": (["--env", "breakout"], (
            "error: dataset atari/breakout/expert-v0 is not under",
            "(OfflineModeIsEnabled: Cannot reach https://huggingface.co/",
            "minari download atari/breakout/expert-v0"), "cli"),
        "nan": (["--dataset-id", "test/cartpole/nan-v0"], ("test/cartpole/nan-v0 contains NaN",),
                "main"),
        "gamma-one": (["--gamma", "1.0"], ("--gamma must be in [0, 1), got 1.0",), "main"),
    },
}
