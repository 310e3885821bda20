"""Speed of the three scripts' real training steps, and of their data loading.

    python benchmark/speed.py                       # writes benchmark/results/speed_<device>.md
    python benchmark/speed.py --device cuda --seconds 10

Update speed: one update of each script's main loop, `trainer.step(buffer.sample(B))`
(its own Agent, Trainer and replay buffer, the buffer filled with random transitions of the
right shapes), the same code path for the three scripts, at paper size and at the small size
of the local suite, eager, with `--compile` (the whole update compiled: losses, backward, Adam,
target update) and, on CUDA, `--compile --cudagraphs` (that update replayed as one CUDA graph).
Warm-up steps (compilation, graph capture) are not timed; then steps run for `--seconds` (at
least --min-steps). Per mode also: the memory of one update (CUDA: peak
torch.cuda.max_memory_allocated above what was allocated before it; CPU: growth of the
process RSS over one update, since tracemalloc does not see torch's allocator), and the
share of the step spent outside the compiled graph: the batch sampling, `buffer.sample(B)`,
which runs eagerly in every mode (timed alone the same way, median over blocks).

Matmul share: the CQL-SAC update's matmul FLOPs, counted analytically (`cql_sac_flops`,
cross-checked with torch's FlopCounterMode), times its updates/s, over a large float32
matmul's throughput measured in the same run.

Data loading: a fresh process per dataset turns a local Minari dataset into the script's
device replay buffer; time and peak memory (RSS growth on CPU, allocated device memory on
CUDA), scaled to 100k transitions.

Atari replay buffer memory: cql_qrdqn_atari.py's buffer of Atari frames with
`--buffer-device device` and `--buffer-device cpu` (pinned host frames, batches moved to the
device), host and device memory per 100k transitions, analytic (the buffer's tensors) and
measured (RSS growth; torch.cuda.max_memory_allocated), and what 10% of a game needs on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # `python benchmark/speed.py`: make `benchmark` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import REPO, HelpFormatter, command_line, machine_info, machine_lines
from benchmark.suites import ALGORITHM, CALQL, CQL_QRDQN, CQL_SAC

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import calql_finetune as calql  # noqa: E402
import cql_qrdqn_atari as qrdqn  # noqa: E402
import cql_sac_continuous as sac  # noqa: E402

RESULTS = REPO / "benchmark" / "results"


# ------------------------------------------------------------------------ update-step cases
@dataclass(frozen=True)
class Case:
    """A script's update step at one size: its preset for `env` with `overrides`, and the
    shapes of the data (obs_dim: a tuple for QR-DQN's observations, frames included)."""

    script: str
    size: str
    description: str
    env: str
    obs_dim: int | tuple[int, ...]
    action_dim: int
    overrides: tuple[tuple[str, Any], ...] = ()


def widths(actor: tuple[int, ...], critic: tuple[int, ...]) -> tuple[tuple[str, Any], ...]:
    return (("actor_hidden_dims", actor), ("critic_hidden_dims", critic))


CASES = (
    Case(CQL_SAC, "paper", "hopper dims, 3x256 twin critics, batch 256, N=10", "hopper-medium",
         11, 3, widths((256,) * 3, (256,) * 3)),
    Case(CQL_SAC, "small", "pendulum, 64x64, batch 256, N=10 (local suite)", "pendulum-expert",
         3, 1, widths((64, 64), (64, 64))),
    Case(CQL_QRDQN, "paper", "Nature DQN on 4x84x84 frames, 200 quantiles, batch 32", "pong",
         (4, 84, 84), 6),
    Case(CQL_QRDQN, "small", "cartpole MLP 128x128, 50 quantiles, batch 64", "cartpole-expert",
         (4,), 2),
    Case(CALQL, "paper", "pen dims, actor 2x512, critic 3x512, batch 256", "pen-binary", 45, 24),
    Case(CALQL, "small", "pointmaze, 64x64, batch 64 (local suite)", "pointmaze-binary", 8, 2,
         (*widths((64, 64), (64, 64)), ("batch_size", 64))),
)
MODULES = {CQL_SAC: sac, CALQL: calql, CQL_QRDQN: qrdqn}


def random_buffer(case: Case, device: torch.device, n: int = 4096):
    """The script's own replay buffer holding n random transitions of the case's shapes."""
    module, rng = MODULES[case.script], np.random.default_rng(0)
    dones = (rng.random(n) < 0.01).astype(np.float32)
    if case.script == CQL_QRDQN:  # frames (a stack of `stack` per state) or vectors
        stack, shape = (case.obs_dim[0], case.obs_dim[1:]) if len(case.obs_dim) > 1 \
            else (1, case.obs_dim)
        frames = (rng.integers(0, 256, (n, *shape), np.uint8) if stack > 1
                  else rng.standard_normal((n, *shape), np.float32))
        data = module.Data(frames=frames, actions=rng.integers(0, case.action_dim, n),
                           rewards=rng.standard_normal(n, np.float32), dones=dones,
                           valid=np.arange(stack - 1, n - 1), stack=stack,
                           n_actions=case.action_dim, ref_scores=None)
        return module.ReplayBuffer(data, device, 0, clip_reward=True)
    keys = getattr(module, "KEYS", ("obs", "next_obs", "actions", "rewards", "dones"))
    shapes = dict(obs=(n, case.obs_dim), next_obs=(n, case.obs_dim), actions=(n, case.action_dim))
    data = {k: rng.standard_normal(shapes.get(k, (n,)), np.float32) for k in keys}
    data.update(actions=np.tanh(data["actions"]), dones=dones)
    return module.ReplayBuffer(data, device, 0)


def build_parts(case: Case, mode: str, device: torch.device) -> tuple[Any, Any, int]:
    """The script's own Trainer (its Agent inside) and replay buffer (random transitions) in
    `mode`, past any BC warm start (bc_steps 0), and the batch size."""
    module = MODULES[case.script]
    preset = module.preset_args(case.env)
    over = dict(case.overrides, device=str(device), compile=mode != "eager",
                cudagraphs=mode == "compile+cudagraphs")
    args = replace(preset, **over, **({"bc_steps": 0} if hasattr(preset, "bc_steps") else {}))
    buffer = random_buffer(case, device)
    agent = module.Agent(case.obs_dim, case.action_dim, args).to(device)
    return module.Trainer(agent, args, device), buffer, args.batch_size


def build_step(case: Case, mode: str, device: torch.device) -> Callable[[], Any]:
    """One update of the script's main loop, `trainer.step(buffer.sample(B))`, as a
    no-argument callable (build_parts)."""
    trainer, buffer, batch_size = build_parts(case, mode, device)
    return lambda: trainer.step(buffer.sample(batch_size))


def update_memory_bytes(step: Callable[[], Any], device: torch.device) -> int:
    """Memory one (warm) update needs: on CUDA its peak allocation above what was allocated
    before it; on CPU the growth of the process RSS over it (0 once the allocator reuses)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    before = rss_bytes()
    step()
    return max(0, rss_bytes() - before)


def time_mode(case: Case, mode: str, device: torch.device, warmup: int, seconds: float,
              min_steps: int) -> dict[str, float]:
    """time_steps of the update, its memory, and the share of its time spent outside the
    compiled graph: the eager batch sampling, timed alone over as many steps."""
    torch.compiler.reset()  # Dynamo's per-code cache (Optimizer.step's frames) is per process
    trainer, buffer, batch_size = build_parts(case, mode, device)
    step = lambda: trainer.step(buffer.sample(batch_size))
    r = time_steps(step, device, warmup, seconds, min_steps)
    memory = update_memory_bytes(step, device)
    sample = time_steps(lambda: buffer.sample(batch_size), device, 1, 0.0, r["steps"])
    return dict(r, update_memory_bytes=memory, memory_kind="device peak" if
                device.type == "cuda" else "RSS growth",
                outside_share=r["updates_per_sec"] / sample["updates_per_sec"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, seconds: float,
               min_steps: int) -> dict[str, float]:
    """Warm-up (compilation) time, then blocks of steps (1 on CPU, 10 on CUDA, synchronized
    at each block's end) for at least min_steps and `seconds`. updates/s = 1 / the median
    time per step over blocks: robust to the occasional stall of a shared machine."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    t1 = time.perf_counter()
    block = 10 if device.type == "cuda" else 1
    times: list[float] = []
    while len(times) * block < min_steps or time.perf_counter() - t1 < seconds:
        tb = time.perf_counter()
        for _ in range(block):
            step()
        sync(device)
        times.append((time.perf_counter() - tb) / block)
    elapsed = time.perf_counter() - t1
    n = len(times) * block
    return dict(warmup_s=t1 - t0, steps=n, updates_per_sec=1.0 / statistics.median(times),
                mean_updates_per_sec=n / elapsed)


# ----------------------------------------------------------------------------------- FLOPs
def mlp_flops(n: int, dims: Sequence[int], weight_grad: bool, input_grad: bool,
              first_input_grad: bool = False) -> int:
    """Matmul FLOPs of an MLP (layer widths `dims`) on n samples: forward, plus backward
    weight gradients and input gradients (the first layer's only if its input needs one)."""
    layers = [a * b for a, b in zip(dims[:-1], dims[1:], strict=False)]
    fwd = 2 * n * sum(layers)
    bwd_w = fwd if weight_grad else 0
    bwd_in = 2 * n * (sum(layers[1:]) + (layers[0] if first_input_grad else 0)) \
        if input_grad else 0
    return fwd + bwd_w + bwd_in


def cql_sac_flops(obs_dim: int, action_dim: int, actor_hidden: Sequence[int],
                  critic_hidden: Sequence[int], batch: int, n_actions: int,
                  ensemble: int = 2, max_backup: bool = False) -> int:
    """Matmul FLOPs of one CQL-SAC update (compute_losses forward + backward), by call:
    actor on s (trained); twin critics at (s, pi(s)) with detached weights (gradient to the
    action only); target actor and critics at s' (no grad; N samples with the max backup);
    critics at (s, a_D) (trained); CQL: actor on N copies of s and s' (no grad) and critics
    on the 3N actions at s (trained). Elementwise ops and Adam are not counted."""
    actor = [obs_dim, *actor_hidden, 2 * action_dim]
    critic = [obs_dim + action_dim, *critic_hidden, 1]
    b, bn, k = batch, batch * n_actions, n_actions if max_backup else 1
    return (mlp_flops(b, actor, True, True)
            + ensemble * mlp_flops(b, critic, False, True, first_input_grad=True)
            + mlp_flops(b * k, actor, False, False)
            + ensemble * mlp_flops(b * k, critic, False, False)
            + ensemble * mlp_flops(b, critic, True, True)
            + 2 * mlp_flops(bn, actor, False, False)
            + ensemble * mlp_flops(3 * bn, critic, True, True))


def counted_flops(step: Callable[[], Any]) -> int:
    """Matmul FLOPs of one step as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_gflops(device: torch.device, n: int = 4096, reps: int = 3) -> float:
    """Throughput of an n x n float32 matmul (best of reps), GFLOP/s."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# ---------------------------------------------------------------------------- data loading
LOAD_CASES = ((CQL_SAC, "pendulum-medium-expert"), (CQL_QRDQN, "cartpole-mixed"),
              (CQL_QRDQN, "pong-random"), (CALQL, "pointmaze-binary"))


def load_buffer(script: str, dataset_id: str, device: torch.device) -> int:
    """Dataset -> the script's own device replay buffer; returns its transitions."""
    if script == CQL_QRDQN:
        data = qrdqn.minari_data(qrdqn.load_minari_dataset(dataset_id), progress=False)
        buffer = qrdqn.ReplayBuffer(data, device, 0, clip_reward=False)
        n = len(buffer)
    else:
        module = sac if script == CQL_SAC else calql
        env = next(k for k, (ds, _) in module.ENV_PRESETS.items() if ds == dataset_id)
        data = module.load_data(module.preset_args(env)).transitions
        n = module.ReplayBuffer(data, device, 0).size
    sync(device)
    return n


def load_probe(script: str, name: str, device: torch.device) -> dict[str, Any]:
    """In this (fresh) process: time one load (untraced), then trace a second one's peak
    memory: host (tracemalloc: Python and numpy allocations; CPU tensors share numpy's
    memory) and, on CUDA, peak allocated device memory."""
    import tracemalloc

    from benchmark import datasets

    dataset_id = datasets.ensure(name)
    t0 = time.perf_counter()
    n = load_buffer(script, dataset_id, device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tracemalloc.start()
    load_buffer(script, dataset_id, device)
    host_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    device_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return dict(script=script, dataset=dataset_id, transitions=n, seconds=seconds,
                host_peak_mib=host_peak, device_peak_mib=device_peak)


def measure_loading(device: torch.device) -> list[dict[str, Any]]:
    """load_probe for each LOAD_CASE, each in a fresh interpreter."""
    rows = []
    for script, name in LOAD_CASES:
        proc = subprocess.run([sys.executable, __file__, "--load-probe", script, name,
                               "--device", str(device)], capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append(dict(script=script, dataset=name, error=proc.stderr[-300:]))
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


# ------------------------------------------------------------- Atari replay buffer memory
MEMORY_DATASET = "pong-random"  # local Atari frames (benchmark/datasets.py), real 84x84 stacks
PLACEMENTS = ("device", "cpu")  # cql_qrdqn_atari.py --buffer-device


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def atari_memory_probe(name: str, placement: str, device: torch.device) -> dict[str, Any]:
    """In this (fresh) process: an Atari dataset into cql_qrdqn_atari.py's replay buffer with
    --buffer-device `placement`, then one sampled batch. Memory where the buffer's tensors live
    counted analytically (their bytes) and measured: host = peak RSS growth over the load
    (getrusage ru_maxrss minus the RSS before; it includes the loader's transient host copy),
    device = torch.cuda.max_memory_allocated on CUDA; on a CPU the device memory is host memory."""
    import resource

    from benchmark import datasets

    dataset_id = datasets.ensure(name)
    cpu = torch.device("cpu")
    storage = device if placement == "device" else cpu
    rss_before = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    data = qrdqn.minari_data(qrdqn.load_minari_dataset(dataset_id), progress=False,
                             pin=storage.type == "cpu" and device.type == "cuda")
    buffer = qrdqn.ReplayBuffer(data, device, 0, clip_reward=True, storage=storage)
    buffer.sample(32)
    sync(device)
    nbytes = buffer.nbytes()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return dict(dataset=dataset_id, placement=placement, device=str(device),
                transitions=len(buffer), buffer_bytes=nbytes,
                host_buffer_bytes=nbytes if storage.type == "cpu" else 0,
                device_buffer_bytes=nbytes if storage.type == "cuda" else None,
                host_peak_growth_bytes=max(0, peak_rss - rss_before),
                device_peak_bytes=(torch.cuda.max_memory_allocated()
                                   if device.type == "cuda" else None))


def measure_atari_memory(device: torch.device) -> list[dict[str, Any]]:
    """atari_memory_probe for both placements, each in a fresh interpreter."""
    rows = []
    for placement in PLACEMENTS:
        proc = subprocess.run([sys.executable, __file__, "--memory-probe", MEMORY_DATASET,
                               placement, "--device", str(device)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            rows.append(dict(placement=placement, error=proc.stderr[-300:]))
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def memory_lines(memory: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown table of the Atari buffer memory: the buffer per 100k transitions (analytic),
    the measured peaks of the whole load (not scaled: they include fixed costs)."""
    mib = 2**20
    lines = ["", "## Atari replay buffer memory (cql_qrdqn_atari.py --buffer-device)", "",
             f"{MEMORY_DATASET} frames (84x84 uint8, a 4-frame stack per state built at sampling "
             "time) in the script's replay buffer, one batch sampled; a fresh process per "
             "placement. Per 100k transitions: the bytes of the buffer's tensors (analytic). "
             "Measured, for the whole load (not scaled: it includes fixed costs such as the raw "
             "RGB episodes being decoded and the evaluation env): host = RSS growth, device = "
             "torch.cuda.max_memory_allocated; on a CPU the training device is the host. "
             "10% of a DQN Replay game = 5M transitions.", "",
             "| --buffer-device | transitions | host MiB per 100k | device MiB per 100k | "
             "host peak growth MiB | device peak MiB | 10% of a game on the device, GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in memory:
        if "error" in r:
            lines.append(f"| {r['placement']} | failed: {r['error']!r} |")
            continue
        scale = 1e5 / r["transitions"]
        if r["device_peak_bytes"] is None:  # CPU: the training device is the host
            on_device = r["buffer_bytes"] if r["placement"] == "device" else 0
            device, device_peak = f"{on_device * scale / mib:.1f} (host)", "= host"
        else:
            on_device = r["device_buffer_bytes"] or 0
            device, device_peak = (f"{on_device * scale / mib:.1f}",
                                   f"{r['device_peak_bytes'] / mib:.1f}")
        lines.append(f"| {r['placement']} | {r['transitions']} | "
                     f"{r['host_buffer_bytes'] * scale / mib:.1f} | {device} | "
                     f"{r['host_peak_growth_bytes'] / mib:.1f} | {device_peak} | "
                     f"{on_device * 5e6 / r['transitions'] / 2**30:.1f} |")
    return lines


# ------------------------------------------------------------------------------------ main
def modes_for(device: torch.device, requested: Sequence[str]) -> list[str]:
    modes = list(requested)
    if device.type != "cuda":
        modes = [m for m in modes if m != "compile+cudagraphs"]
    return modes


def markdown(results: list[dict[str, Any]], flops: dict[str, Any], loading: list[dict],
             info: dict[str, Any], command: str, memory: Sequence[dict] = ()) -> str:
    lines = ["# Speed", "", f"- Command: `{command}`", *machine_lines(info),
             f"- torch threads: {info['torch_threads']}; device: {flops['device']}", "",
             "## Gradient updates per second", "",
             "Each script's own update step on a random batch (warm-up steps, compilation "
             "included, not timed; torch's compile cache makes a repeated run's warm-up "
             "shorter). updates/s = 1 / median step time; `mean` = steps / total time "
             "(lower when the machine is shared). MiB/update: the memory of one update "
             "(CUDA: peak allocation above the resident state; CPU: RSS growth, 0 once the "
             "allocator reuses its memory). Outside graph: the share of the step in the eager "
             "batch sampling (the same in eager mode, where nothing is compiled).", "",
             "| script | size | setup | mode | updates/s | mean | h per 1M updates | warm-up s | "
             "timed steps | MiB/update | outside graph |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {ALGORITHM[r['script']]} | {r['size']} | {r['description']} | "
                     f"{r['mode']} | {r['updates_per_sec']:.2f} | "
                     f"{r['mean_updates_per_sec']:.2f} | "
                     f"{1e6 / max(r['updates_per_sec'], 1e-9) / 3600:.1f} | {r['warmup_s']:.1f} | "
                     f"{r['steps']} | {r['update_memory_bytes'] / 2**20:.1f} "
                     f"({r['memory_kind']}) | {100 * r['outside_share']:.1f}% |")
    lines += ["", "## CQL-SAC update vs. float32 matmul throughput", "",
              f"Reference: {flops['matmul_n']}x{flops['matmul_n']} float32 matmul, "
              f"{flops['matmul_gflops']:.1f} GFLOP/s (best of 3, before and after the "
              "update timings, in this run).", "",
              "| size | mode | GFLOP/update (analytic) | GFLOP/update (FlopCounterMode) | "
              "updates/s | GFLOP/s | share of matmul |", "|---|---|---|---|---|---|---|"]
    for row in flops["rows"]:
        lines.append(f"| {row['size']} | {row['mode']} | {row['gflop']:.3f} | "
                     f"{row['gflop_counted']:.3f} | {row['updates_per_sec']:.2f} | "
                     f"{row['gflops']:.1f} | {100 * row['share']:.0f}% |")
    lines += ["", "## Data loading: Minari dataset -> device replay buffer", "",
              "A fresh process per dataset; seconds from a first load, peak memory from a "
              "second: host = tracemalloc peak (Python and numpy), device = peak CUDA "
              "allocation.", "",
              "| script | dataset | transitions | seconds | host peak MiB | device peak MiB "
              "| s per 100k | host MiB per 100k |", "|---|---|---|---|---|---|---|---|"]
    for r in loading:
        if "error" in r:
            lines.append(f"| {r['script']} | {r['dataset']} | failed: {r['error']!r} |")
            continue
        scale = 1e5 / r["transitions"]
        dev = "—" if r["device_peak_mib"] is None else f"{r['device_peak_mib']:.1f}"
        lines.append(f"| {r['script']} | {r['dataset']} | {r['transitions']} | "
                     f"{r['seconds']:.2f} | {r['host_peak_mib']:.1f} | {dev} | "
                     f"{r['seconds'] * scale:.2f} | {r['host_peak_mib'] * scale:.1f} |")
    if memory:
        lines += memory_lines(memory)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="device to measure on")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per case")
    p.add_argument("--min-steps", type=int, default=3, help="timed steps per case, at least")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--matmul-n", type=int, default=4096, help="size of the reference matmul")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--modes", nargs="+", default=["eager", "compile", "compile+cudagraphs"],
                   help="execution modes to time")
    p.add_argument("--sizes", nargs="+", default=["paper", "small"],
                   help="network sizes to time")
    p.add_argument("--no-loading", action="store_true", help="skip the data-loading table")
    p.add_argument("--out", type=Path, default=None,
                   help="output file (default: benchmark/results/speed_<device>.md)")
    p.add_argument("--load-probe", nargs=2, metavar=("SCRIPT", "DATASET"), help=argparse.SUPPRESS)
    p.add_argument("--memory-probe", nargs=2, metavar=("DATASET", "PLACEMENT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = sac.pick_device(args.device)
    if args.load_probe:
        print(json.dumps(load_probe(*args.load_probe, device)))
        return 0
    if args.memory_probe:
        print(json.dumps(atari_memory_probe(*args.memory_probe, device)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    info, command = machine_info(), command_line()
    results, flop_rows = [], []
    gflops_before = matmul_gflops(device, args.matmul_n)
    for case in (c for c in CASES if c.size in args.sizes):
        for mode in modes_for(device, args.modes):
            torch.manual_seed(0)
            r = time_mode(case, mode, device, args.warmup, args.seconds, args.min_steps)
            results.append(dict(script=case.script, size=case.size,
                                description=case.description, mode=mode, **r))
            print(f"{case.script} {case.size} {mode}: {r['updates_per_sec']:.2f} updates/s "
                  f"(warm-up {r['warmup_s']:.1f}s)", flush=True)
            if case.script == CQL_SAC:
                args_ = replace(sac.preset_args(case.env), **dict(case.overrides))
                flop = cql_sac_flops(case.obs_dim, case.action_dim, args_.actor_hidden_dims,
                                     args_.critic_hidden_dims, args_.batch_size,
                                     args_.cql_n_actions, max_backup=args_.max_backup)
                eager = build_step(replace(case), "eager", device)
                flop_rows.append(dict(size=case.size, mode=mode, gflop=flop / 1e9,
                                      gflop_counted=counted_flops(eager) / 1e9,
                                      updates_per_sec=r["updates_per_sec"],
                                      gflops=flop * r["updates_per_sec"] / 1e9))
    # the reference: the best of a measurement before and after the updates (a shared
    # machine's load changes); the shares are computed against it
    gflops = max(gflops_before, matmul_gflops(device, args.matmul_n))
    for row in flop_rows:
        row["share"] = row["gflops"] / gflops
    flops = dict(device=str(device), matmul_n=args.matmul_n, matmul_gflops=gflops, rows=flop_rows)
    loading = [] if args.no_loading else measure_loading(device)
    memory = [] if args.no_loading else measure_atari_memory(device)
    out = args.out or RESULTS / f"speed_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results, flops, loading, info, command, memory))
    (out.with_suffix(".json")).write_text(json.dumps(
        dict(machine=info, command=command, updates=results, flops=flops, loading=loading,
             atari_memory=memory), indent=2))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
