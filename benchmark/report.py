"""Report of a run root: a Markdown table per suite and learning curves, one PNG per suite.

    python benchmark/report.py runs/bench                          # every suite found
    python benchmark/report.py runs/bench --suite local --out benchmark/results

Every finished run (summary.json) contributes its metric at the last evaluation (the job's
`metric`: normalized score, return, or Cal-QL's score = success rate x 100). Over seeds:
mean with a 95% bootstrap CI, sample standard deviation (ddof 1), and the interquartile
mean (IQM) with a 95% percentile bootstrap CI (rliable, Agarwal et al. 2021), side by side
with the papers' numbers (REFERENCES below) where the task matches. Cal-QL rows add the
offline score (end of pre-training), cumulative regret (mean over online evaluations of
1 - success rate) and the largest drop below the offline score during fine-tuning
("unlearning"); their curves mark the end of pre-training.

Writes <out>/<suite>.md and <out>/<suite>_curves.png (out defaults to RUN_ROOT).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # `python benchmark/report.py`: make `benchmark` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import common
from benchmark.common import read_json, read_jsonl
from benchmark.suites import ALGORITHM, CALQL, CQL_SAC, SUITES

# ------------------------------------------------------------------------ reference numbers
# Key "<variant key>/<task>" -> {source: value}. Sources:
#   paper:  CQL(H), Kumar et al. 2020: normalized D4RL scores, Tables 1-2 (average of 4
#           seeds); Atari final returns, Table 3 (QR-DQN and CQL(H) columns).
#   reimpl: the well-known PyTorch reimplementation's final normalized scores on D4RL v2
#           (as listed in REFERENCE.md section 1).
# The local Minari MuJoCo datasets (mujoco/<robot>/<level>-v0) are newer data than D4RL's;
# their numbers compare in kind, not exactly.
SOURCES = {"paper": "paper", "reimpl": "reimpl."}
REFERENCES: dict[str, dict[str, float]] = {
    **{f"cql-sac/{task}": dict(paper=v) for task, v in {
        "halfcheetah-medium": 44.4, "hopper-medium": 58.0, "walker2d-medium": 79.2,
        "halfcheetah-medium-expert": 62.4, "hopper-medium-expert": 111.0,
        "walker2d-medium-expert": 98.7, "halfcheetah-expert": 104.8, "hopper-expert": 109.9,
        "walker2d-expert": 153.9, "antmaze-umaze": 74.0, "antmaze-medium-play": 61.2,
        "antmaze-large-play": 15.8, "pen-human": 37.5, "pen-cloned": 39.2,
        "kitchen-complete": 43.8, "kitchen-partial": 49.8}.items()},
}
for _task, _v in {"halfcheetah-medium": 47.0, "hopper-medium": 59.1, "walker2d-medium": 80.8,
                  "halfcheetah-medium-replay": 45.0, "hopper-medium-replay": 95.1,
                  "walker2d-medium-replay": 73.1, "halfcheetah-medium-expert": 95.6,
                  "hopper-medium-expert": 99.3, "walker2d-medium-expert": 109.6}.items():
    REFERENCES.setdefault(f"cql-sac/{_task}", {})["reimpl"] = _v
# Atari, Table 3: (QR-DQN, CQL(H)) final returns.
for _pct, _table in {
    "1pct": dict(pong=(-13.8, 19.3), breakout=(7.9, 61.1), qbert=(383.6, 14012.0),
                 seaquest=(672.9, 779.4), asterix=(166.3, 592.4)),
    "10pct": dict(pong=(15.1, 18.5), breakout=(151.2, 269.3), qbert=(7091.3, 13855.6),
                  seaquest=(2984.8, 3674.1), asterix=(189.2, 156.3)),
}.items():
    for _game, (_qr, _cql) in _table.items():
        REFERENCES[f"qrdqn-{_pct}/{_game}"] = dict(paper=_qr)
        REFERENCES[f"cql-{_pct}/{_game}"] = dict(paper=_cql)

CALQL_COLUMNS = (("offline score", "offline_score"), ("cum. regret", "cumulative_regret"),
                 ("largest drop", "max_drop_below_offline"))
METRIC_NAMES = {"normalized_score": "normalized score", "return_mean": "return",
                "score": "score (success % or normalized)"}


# ------------------------------------------------------------------------------ aggregation
@dataclass
class Aggregate:
    """Statistics of one score per seed."""

    n: int
    mean: float
    mean_ci: tuple[float, float]
    std: float
    iqm: float
    iqm_ci: tuple[float, float]


def aggregate(scores: Sequence[float], reps: int = 2000, seed: int = 0) -> Aggregate:
    """Mean, sample std (ddof 1; 0 for one seed), IQM and their 95% percentile bootstrap
    CIs over seeds, with rliable (one task: the runs are the bootstrap units)."""
    from rliable import library as rly
    from rliable import metrics

    x = np.asarray(scores, dtype=float).reshape(-1, 1)  # (runs, tasks=1)
    stat = lambda s: np.array([metrics.aggregate_mean(s), metrics.aggregate_iqm(s)])
    with warnings.catch_warnings():  # arch: "random_state is deprecated" (rliable passes it)
        warnings.simplefilter("ignore", FutureWarning)
        point, interval = rly.get_interval_estimates(
            {"x": x}, stat, reps=reps, random_state=np.random.RandomState(seed))
    (mean, iqm), ci = point["x"], interval["x"]
    std = float(np.std(x, ddof=1)) if len(x) > 1 else 0.0
    return Aggregate(len(x), float(mean), (float(ci[0, 0]), float(ci[1, 0])), std, float(iqm),
                     (float(ci[0, 1]), float(ci[1, 1])))


# ------------------------------------------------------------------------------- run loading
@dataclass
class Run:
    """A run directory as the report sees it."""

    path: Path
    job: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None
    config: dict[str, Any]

    @property
    def final(self) -> float | None:
        value = self.rows[-1].get(self.job["metric"]) if self.rows else None
        return float(value) if value is not None else None

    @property
    def key(self) -> tuple[str, str, str]:
        return self.job["script"], self.job["env"], self.job["variant"]


def load_runs(root: Path) -> dict[str, list[Run]]:
    """Every run under root (a folder with job.json), grouped by suite."""
    suites: dict[str, list[Run]] = defaultdict(list)
    for job_file in sorted(Path(root).rglob(common.JOB_FILE)):
        d = job_file.parent
        summary = read_json(d / "summary.json") if (d / "summary.json").exists() else None
        config = read_json(d / "config.json") if (d / "config.json").exists() else {}
        job = read_json(job_file)
        suites[job["suite"]].append(Run(d, job, read_jsonl(d / "metrics.jsonl"), summary,
                                        config))
    return dict(suites)


# ----------------------------------------------------------------------------------- tables
def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def fmt_ci(point: float, ci: tuple[float, float]) -> str:
    return f"{fmt(point)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def mean_std(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return f"{fmt(float(np.mean(vals)), 2)} ± {fmt(std, 2)}"


def suite_table(runs: list[Run]) -> list[str]:
    """Markdown tables (one per script) of a suite's runs."""
    lines: list[str] = []
    by_script: dict[str, dict[tuple[str, str], list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        by_script[run.job["script"]][(run.job["env"], run.job["variant"])].append(run)
    for script in sorted(by_script):
        groups = by_script[script]
        metric = next(iter(groups.values()))[0].job["metric"]
        extra = CALQL_COLUMNS if script == CALQL else (
            (("value gap", "value_gap"),) if script == CQL_SAC else ())
        header = ["task", "variant", "seeds", "mean [95% CI]", "std", "IQM [95% CI]",
                  *(name for name, _ in extra), *SOURCES.values(), "updates/s"]
        lines += [f"**{ALGORITHM.get(script, script)}** (`{script}`), final "
                  f"{METRIC_NAMES.get(metric, metric)}:", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (env, variant), group in sorted(groups.items()):
            done = [r for r in group if r.summary is not None and r.final is not None]
            cells = [env, variant, f"{len(done)}/{len(group)}"]
            if done:
                agg = aggregate([r.final for r in done])
                cells += [fmt_ci(agg.mean, agg.mean_ci), fmt(agg.std), fmt_ci(agg.iqm, agg.iqm_ci)]
            else:
                cells += ["—"] * 3
            cells += [mean_std([r.summary.get(k) for r in done]) for _, k in extra]
            ref = REFERENCES.get(group[0].job.get("reference") or "", {})
            cells += [fmt(ref.get(source)) for source in SOURCES]
            cells.append(fmt(float(np.mean([r.summary["updates_per_sec"] for r in done]))
                             if done else None))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------------- curves
def _num(value: Any) -> float:
    """A metric value as a float; None (no reference scores, no success info) -> NaN."""
    return np.nan if value is None else float(value)


def curve_x(run: Run) -> tuple[np.ndarray, float | None]:
    """x of each evaluation, and the pre-training boundary for Cal-QL runs: offline rows at
    their gradient step, online rows at offline_steps + env steps."""
    if run.job["script"] != CALQL:
        return np.array([r["step"] for r in run.rows], float), None
    offline = run.config.get("args", {}).get("offline_steps")
    if offline is None:
        offline = max([r["step"] for r in run.rows if r.get("phase") == "offline"], default=0)
    x = [r["step"] if r.get("phase") == "offline" else offline + r["env_steps"]
         for r in run.rows]
    return np.array(x, float), float(offline)


def plot_suite(suite: str, runs: list[Run], path: Path) -> Path:
    """One figure: a panel per (script, task), a line per variant (mean over seeds, band =
    min..max over seeds); Cal-QL panels mark the end of pre-training and the offline score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.rows:
            panels[(run.job["script"], run.job["env"])][run.job["variant"]].append(run)
    keys = sorted(panels)
    cols = min(3, max(1, len(keys)))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        script, env = key
        for variant, group in sorted(panels[key].items()):
            xs = [curve_x(r) for r in group]
            # seeds may evaluate at slightly different x (Cal-QL evaluates after whole
            # trajectories): interpolate every seed onto the shortest run's x
            x = min((x for x, _ in xs), key=len)
            y = np.array([np.interp(x, xr, [_num(row.get(r.job["metric"])) for row in r.rows])
                          for r, (xr, _) in zip(group, xs, strict=True)], float)
            (line,) = ax.plot(x, np.nanmean(y, 0), marker=".", label=f"{variant} ({len(group)})")
            ax.fill_between(x, np.nanmin(y, 0), np.nanmax(y, 0), alpha=0.2,
                            color=line.get_color())
            boundary = xs[0][1]
            if boundary is not None and boundary in x:  # the offline score, dotted
                ax.axhline(float(np.nanmean(y[:, list(x).index(boundary)])),
                           color=line.get_color(), ls=":", lw=1)
        if script == CALQL:
            ax.axvline(xs[0][1], color="k", ls="--", lw=1, label="end of pre-training")
            ax.set_xlabel("offline gradient steps, then online env steps")
        else:
            ax.set_xlabel("gradient steps")
        metric = group[0].job["metric"]
        ax.set_ylabel(METRIC_NAMES.get(metric, metric))
        ax.set_title(f"{ALGORITHM.get(script, script)}: {env}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"suite {suite}: mean over seeds, band = min..max", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------- report
def suite_header(suite: str, suite_dir: Path) -> list[str]:
    """Title, description and how the runs were produced (from the runner's suite.json)."""
    lines = [f"# Suite `{suite}`", ""]
    if suite in SUITES:
        lines += [SUITES[suite].description + ".", ""]
    path = suite_dir / common.SUITE_FILE
    if path.exists():
        for inv in read_json(path)["invocations"]:
            lines += [f"- Command: `{inv['command']}` ({inv['launcher']} launcher, "
                      f"{inv['jobs']} at once): {inv['ok']} ran, {inv['skipped']} skipped, "
                      f"{inv['failed']} failed, {inv['wall_s'] / 60:.1f} min wall",
                      *common.machine_lines(inv["machine"])]
        lines.append("")
    lines += [f"Report: `{common.command_line()}`", ""]
    return lines


def write_report(root: Path, out: Path | None = None, suites: Sequence[str] | None = None
                 ) -> list[Path]:
    """Write <out>/<suite>.md and <out>/<suite>_curves.png for each suite under root."""
    root = Path(root)
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for suite, runs in sorted(load_runs(root).items()):
        if suites and suite not in suites:
            continue
        figure = plot_suite(suite, runs, out / f"{suite}_curves.png")
        suite_dir = runs[0].path.parents[1]
        lines = [*suite_header(suite, suite_dir),
                 "Final score over seeds: mean and IQM with 95% percentile bootstrap CIs "
                 "(rliable), std with ddof 1; `seeds` = finished/all runs. Reference columns: "
                 "CQL paper (Kumar et al. 2020, Tables 1-3) and a PyTorch reimplementation "
                 "(D4RL v2), where the task matches.", "",
                 *suite_table(runs), f"![learning curves]({figure.name})", ""]
        path = out / f"{suite}.md"
        path.write_text("\n".join(lines))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_root", type=Path)
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_ROOT)")
    p.add_argument("--suite", action="append", default=None, help="only these suites")
    args = p.parse_args(argv)
    paths = write_report(args.run_root, args.out, args.suite)
    if not paths:
        print(f"no runs (job.json) under {args.run_root}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
