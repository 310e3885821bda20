"""Run a benchmark suite: every (script, task, variant, seed) as its own process and run dir.

    python benchmark/run.py --suite demo                   # README's main job (~5 CPU min)
    python benchmark/run.py --suite smoke                  # everything runs (~30 s)
    python benchmark/run.py --suite local --jobs 2         # the committed CPU results
    python benchmark/run.py --suite d4rl-gym --launcher slurm --partition gpu --gpus 1

Run directories are <out>/<suite>/<script>__<variant>__<env>/s<seed>. A run with summary.json is
skipped, one with checkpoint.pt but no summary.json is resumed (`--resume RUN_DIR` with the
same arguments), and so is a finished one that the suite now runs longer (its --total-steps
or --online-steps above config.json's: the resume grows the run); anything else starts
fresh. Each run's output goes to its log.txt, which ends with the exit code; a failed run
is reported with the tail of that log and does not stop the others. At the end the report
(benchmark/report.py) of the suite is written to <out>/<suite>/<suite>.md, with its figures
<out>/<suite>/<suite>_*.png next to it.

Launchers: `local` (default) runs --jobs processes at once on this machine, each with
cores/jobs torch threads; `slurm` submits one Slurm job per run through submitit (a job
array, at most --jobs at once), requeued with --resume on timeout or preemption;
`submitit-local` runs the same submitit path on this machine (for tests and debugging).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmark/run.py`: make `benchmark` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from benchmark.common import (
    EXIT_MARK,
    JOB_FILE,
    LOG_FILE,
    REPO,
    SUITE_FILE,
    HelpFormatter,
    command_line,
    current_keys,
    current_metric,
    failure_reason,
    machine_info,
    read_json,
    read_jsonl,
    run_status,
    scrub,
    tail,
    write_json,
)
from benchmark.suites import SUITES, Job, suite_jobs

TAIL_LINES = 20


def say(message: str) -> None:
    """Print a progress line now (the runner's output is often a file)."""
    print(message, flush=True)


@dataclass
class Result:
    """Outcome of one job: ok (ran to its summary), skipped (already finished) or failed."""

    label: str
    status: str
    seconds: float = 0.0
    returncode: int | None = None
    resumed: bool = False
    log_tail: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    score: float | None = None


def final_score(job: Job) -> float | None:
    """The job's metric at its last evaluation (None before the first one; an older run's
    keys read as today's)."""
    rows = read_jsonl(job.run_dir / "metrics.jsonl")
    return current_keys(rows[-1]).get(current_metric(job.entry.metric)) if rows else None


def execute(job: Job, env: dict[str, str] | None = None,
            on_start: Callable[[subprocess.Popen], None] | None = None) -> Result:
    """Run one job to completion in a subprocess (skip it if finished, resume if interrupted).

    The script's stdout and stderr are appended to <run_dir>/log.txt. Never raises for a
    failing script: the failure is returned with the log's tail.
    """
    status = run_status(job.run_dir, job.argv())
    if status == "done":
        return Result(job.label, "skipped", summary=read_json(job.run_dir / "summary.json"),
                      score=final_score(job))
    resume = status == "resume"
    job.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(job.run_dir / JOB_FILE, job.to_dict())
    cmd = [sys.executable, str(REPO / job.entry.script), *job.argv(resume=resume)]
    t0 = time.perf_counter()
    with open(job.run_dir / LOG_FILE, "a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        try:
            # cwd: the run dir (MuJoCo writes MUJOCO_LOG.TXT into the working directory)
            proc = subprocess.Popen(cmd, cwd=job.run_dir, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})
        except OSError as exc:
            log.write(f"could not start: {exc}\n")
            return Result(job.label, "failed", log_tail=str(exc), resumed=resume)
        if on_start is not None:
            on_start(proc)
        returncode = proc.wait()
        seconds = time.perf_counter() - t0
        log.write(f"{EXIT_MARK}{returncode} after {seconds:.0f}s\n")  # the report reads it
    if returncode == 0 and run_status(job.run_dir, job.argv()) == "done":
        return Result(job.label, "ok", seconds, 0, resume,
                      summary=read_json(job.run_dir / "summary.json"), score=final_score(job))
    return Result(job.label, "failed", seconds, returncode, resume,
                  log_tail=tail(job.run_dir / LOG_FILE, TAIL_LINES))


class SubmititTask:
    """Picklable callable that submitit runs on a node: execute() the job; on timeout or
    preemption, forward SIGTERM to the script (it checkpoints) and requeue itself, so that
    the next attempt resumes from the checkpoint."""

    def __init__(self, job: Job, env: dict[str, str] | None = None):
        self.job, self.env = job, env
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> Result:
        return execute(self.job, self.env, on_start=self._remember)

    def _remember(self, proc: subprocess.Popen) -> None:
        self._proc = proc

    def __getstate__(self) -> dict[str, Any]:
        return dict(job=self.job, env=self.env, _proc=None)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit before a requeue: let the script save, then resubmit self."""
        import submitit

        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=120)
        return submitit.helpers.DelayedSubmission(SubmititTask(self.job, self.env))


# -------------------------------------------------------------------------------- datasets
def prepare_datasets(jobs: Iterable[Job], log: Callable[[str], None] = say) -> dict[str, str]:
    """Build (local) or download (Minari) every dataset the jobs need, once, in this process
    (never concurrently from several runs). Returns {dataset: error message} of failures."""
    from benchmark import datasets

    errors: dict[str, str] = {}
    for name in dict.fromkeys(d for job in jobs for d in job.entry.datasets):
        try:
            if datasets.is_local(name):
                if not datasets.is_built(datasets.dataset_id(name)):
                    log(f"building local dataset {name} ...")
                datasets.ensure(name)
            else:
                import minari

                try:
                    minari.load_dataset(name)
                except FileNotFoundError:
                    log(f"downloading Minari dataset {name} ...")
                    minari.download_dataset(name)
        except Exception as exc:  # noqa: BLE001 - reported per job, the others go on
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


# ------------------------------------------------------------------------------- launchers
class Progress:
    """Prints one line per finished job with a running count (thread-safe)."""

    def __init__(self, total: int, log: Callable[[str], None] = say):
        self.total, self.done, self.log = total, 0, log
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()

    def __call__(self, result: Result) -> None:
        with self.lock:
            self.done += 1
            score = f"  score {result.score:.1f}" if isinstance(result.score, float) else ""
            how = " (resumed)" if result.resumed else ""
            elapsed = time.perf_counter() - self.t0
            self.log(f"[{self.done}/{self.total} {elapsed:6.0f}s] {result.status:7s} "
                     f"{result.label}{how}  {result.seconds:.0f}s{score}")


def run_local(jobs: list[Job], n_parallel: int, env: dict[str, str],
              progress: Callable[[Result], None]) -> list[Result]:
    """Run the jobs on this machine, n_parallel subprocesses at a time."""
    results = []
    with ThreadPoolExecutor(max_workers=max(1, n_parallel)) as pool:
        futures = [pool.submit(execute, job, env) for job in jobs]
        for future in as_completed(futures):
            results.append(future.result())
            progress(results[-1])
    return results


def run_submitit(jobs: list[Job], executor, env: dict[str, str],
                 progress: Callable[[Result], None], poll_s: float = 2.0) -> list[Result]:
    """Submit one task per job to a submitit executor (a job array) and gather the results;
    a job that submitit reports as failed (killed, timed out for good) becomes a failed
    Result with its log tail."""
    with executor.batch():
        handles = [executor.submit(SubmititTask(job, env)) for job in jobs]
    pending = dict(zip(handles, jobs, strict=True))
    results = []
    while pending:
        for handle in [h for h in pending if h.done()]:
            job = pending.pop(handle)
            try:
                result = handle.result()
            except Exception as exc:  # noqa: BLE001 - submitit's errors: killed, timed out...
                text = tail(job.run_dir / LOG_FILE, TAIL_LINES)
                result = Result(job.label, "failed", log_tail=f"{text}\nsubmitit: {exc}"[-4000:])
            results.append(result)
            progress(result)
        if pending:
            time.sleep(poll_s)
    return results


def make_executor(args: argparse.Namespace, folder: Path):
    """submitit executor: Slurm (partition, GPUs, time, CPUs, memory) or local."""
    import submitit

    cluster = "local" if args.launcher == "submitit-local" else "slurm"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = dict(timeout_min=args.time_min, cpus_per_task=args.cpus_per_task,
                                  gpus_per_node=args.gpus, name=f"bench-{args.suite}",
                                  slurm_array_parallelism=args.jobs)
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    if args.slurm_extra:
        params["slurm_additional_parameters"] = dict(kv.split("=", 1) for kv in args.slurm_extra)
    executor.update_parameters(**params)
    return executor


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--suite", required=True, choices=sorted(SUITES),
                   help="which suite to run (benchmark/suites.py)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the suite's)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (Slurm: array parallelism)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="run root")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="--device of every run")
    p.add_argument("--compile", action="store_true", help="pass --compile to every run")
    p.add_argument("--data-root", type=Path, default=Path("dqn-replay"),
                   help="DQN Replay root holding <Game>/1/replay_logs (Atari suites)")
    p.add_argument("--only", default=None, help="run only jobs whose label contains this")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run, local launcher (default: cores // jobs)")
    p.add_argument("--no-report", action="store_true", help="do not write the report")
    g = p.add_argument_group("launcher")
    g.add_argument("--launcher", default="local", choices=["local", "slurm", "submitit-local"],
                   help="where the runs go (see above)")
    g.add_argument("--partition", default=None,
                   help="Slurm partition (default: the cluster's)")
    g.add_argument("--gpus", type=int, default=None,
                   help="GPUs per job (default: 1 on Slurm, 0 with submitit-local)")
    g.add_argument("--cpus-per-task", type=int, default=8, help="CPUs per Slurm job")
    g.add_argument("--mem-gb", type=int, default=None,
                   help="memory per Slurm job in GB (default: the partition's)")
    g.add_argument("--time-min", type=int, default=24 * 60,
                   help="Slurm time limit per job, minutes")
    g.add_argument("--slurm-extra", nargs="*", default=[], metavar="KEY=VALUE",
                   help="additional sbatch parameters, e.g. account=abc qos=high")
    return p.parse_args(argv)


def fail_result(job: Job, why: str) -> Result:
    """A job that could not start: recorded in its run dir (job.json, log.txt) as well, so
    that the report lists it with its reason."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(job.run_dir / JOB_FILE, job.to_dict())
    with open(job.run_dir / LOG_FILE, "a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} not started\n"
                  f"could not start: {why}\n")
    return Result(job.label, "failed", log_tail=f"could not start: {why}")


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns 0 when every run finished, 1 when any failed."""
    args = parse_args(argv)
    if args.gpus is None:
        args.gpus = 1 if args.launcher == "slurm" else 0
    out = args.out.resolve()
    common = ["--device", args.device] + (["--compile"] if args.compile else [])
    jobs = suite_jobs(args.suite, out, args.seeds, str(args.data_root.resolve()), tuple(common))
    if args.only:
        jobs = [j for j in jobs if args.only in j.label]
    statuses = [run_status(j.run_dir, j.argv()) for j in jobs]
    print(f"suite {args.suite}: {len(jobs)} runs ({statuses.count('done')} finished, "
          f"{statuses.count('resume')} to resume, {statuses.count('new')} new); "
          f"{args.jobs} at once, launcher {args.launcher}; run root {out / args.suite}; "
          f"needs {SUITES[args.suite].needs}", flush=True)
    t0 = time.time()
    invocation = dict(command=command_line(), machine=machine_info(), jobs=args.jobs,
                      launcher=args.launcher, started=time.strftime("%Y-%m-%d %H:%M:%S"))

    todo = [j for j in jobs if run_status(j.run_dir, j.argv()) != "done"]
    errors = prepare_datasets(todo)
    blocked = {j.label: errors[d] for j in todo for d in j.entry.datasets if d in errors}
    results = [fail_result(j, f"dataset not available: {blocked[j.label]}")
               for j in jobs if j.label in blocked]
    runnable = [j for j in jobs if j.label not in blocked]
    progress = Progress(len(jobs))
    for result in results:
        progress(result)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    if args.launcher == "local":
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        results += run_local(runnable, args.jobs, env, progress)
    else:
        env = ({"OMP_NUM_THREADS": str(threads)} if args.launcher == "submitit-local" else {})
        executor = make_executor(args, out / args.suite / ".submitit")
        results += run_submitit(runnable, executor, env, progress)

    failed = [r for r in results if r.status == "failed"]
    invocation.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), wall_s=time.time() - t0,
                      ok=sum(r.status == "ok" for r in results), failed=len(failed),
                      skipped=sum(r.status == "skipped" for r in results),
                      failures=[dict(label=r.label, returncode=r.returncode,
                                     reason=failure_reason(r.log_tail)) for r in failed])
    record_invocation(out / args.suite, args.suite, invocation)
    for r in failed:
        print(f"\nFAILED {r.label} (exit code {r.returncode}); last lines of its log:\n"
              + "\n".join("    " + line for line in r.log_tail.splitlines()), flush=True)
    print(f"\n{invocation['ok']} ran, {invocation['skipped']} skipped (finished before), "
          f"{len(failed)} failed; {invocation['wall_s']:.0f}s wall", flush=True)
    if not args.no_report:
        from benchmark import report

        # the command that writes the same report again, paths as a report shows them
        again = scrub(shlex.join(["python", "benchmark/report.py", str(out), "--suite",
                                  args.suite, "--out", str(out / args.suite)]), out)
        for path in report.write_report(out, out / args.suite, suites=[args.suite],
                                        command=again):
            print(f"report: {path}")
    return 1 if failed else 0


def record_invocation(suite_dir: Path, suite: str, invocation: dict[str, Any]) -> None:
    """Append this invocation (command, machine, times, counts) to <suite_dir>/suite.json."""
    path = suite_dir / SUITE_FILE
    data = read_json(path) if path.exists() else dict(suite=suite, invocations=[])
    data["invocations"].append(invocation)
    write_json(path, data)


if __name__ == "__main__":
    sys.exit(main())
