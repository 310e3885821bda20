"""Report of a run root: a Markdown table per suite and learning curves, one PNG per suite.

    python benchmark/report.py runs/bench                          # every suite found
    python benchmark/report.py runs/bench --suite local --out benchmark/results

Every finished run (summary.json) contributes its metric at the last evaluation (the job's
`metric`: the family's `score`, D4RL-normalized for CQL-SAC and QR-DQN, success rate x 100
for Cal-QL's tasks; or the return). Runs written before the run-file keys were unified
(`normalized_score`, `final_normalized_score`, `length_mean`) read as today's. Over seeds:
mean with a 95% bootstrap CI, sample standard deviation (ddof 1), and the interquartile
mean (IQM) with a 95% percentile bootstrap CI (rliable, Agarwal et al. 2021), side by side
with the papers' numbers (REFERENCES below) where the task matches. Cal-QL rows add the
offline score (end of pre-training), cumulative regret (mean over online evaluations of
1 - success rate) and the largest drop below the offline score during fine-tuning
("unlearning"); their curves are two panels, pre-training (gradient steps) and fine-tuning
(env steps from the switch). Curves: mean over seeds with the 95% bootstrap CI of the mean as
band (the tables' interval), variants in words, one colour per method in every figure.
Runs without summary.json are listed with the exit code and reason their log.txt ends with;
a pair gets a verdict only with 3 or more seeds of each; no absolute path of the machine
appears (the run root is shown relative to the repository, else as `<run root>`).

Each method next to its baseline (suites.PAIRS: CQL-SAC vs naive SAC, CQL vs plain QR-DQN,
Cal-QL vs CQL): one sentence per pair, written from the numbers, says what the runs show;
for CQL-SAC a table of the value gap at several training steps (CQL paper Table 4) and a
figure of it (<suite>_value_gap.png); for Cal-QL the largest drop below the pre-trained score
and when, the regret and the calibration share with CIs, and their figure
(<suite>_calibration.png).

Writes <out>/<suite>.md and <out>/<suite>_curves.png (out defaults to RUN_ROOT).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
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
from benchmark.suites import ALGORITHM, CALQL, CQL_QRDQN, CQL_SAC, PAIRS, SCRIPTS, SUITES

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

MIN_VERDICT_SEEDS = 3  # below this a pair line gives its numbers and no verdict
CALQL_COLUMNS = (("offline score", "offline_score"), ("cum. regret", "cumulative_regret"),
                 ("largest drop", "max_drop_below_offline"))
METRIC_NAMES = {"return_mean": "return", "value_gap": "value gap (predicted - obtained)",
                "calib_below_share": "share of states with Q(s,pi(s)) < V_mu(s)"}
# The rows' `score` is each family's own (docs/run_files.md): its name per script.
SCORE_NAMES = {CQL_SAC: "normalized score", CQL_QRDQN: "normalized score",
               CALQL: "score (success % or normalized)"}
# Extra figures: file suffix -> (metric, scripts, symlog y); drawn where such runs exist.
FIGURES = {"value_gap": ("value_gap", (CQL_SAC,), True),
           "calibration": ("calib_below_share", (CALQL,), False)}


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
        job = read_json(job_file)  # an older run's keys, as today's (common.current_keys)
        job["metric"] = common.current_metric(job["metric"])
        rows = [common.current_keys(r) for r in read_jsonl(d / "metrics.jsonl")]
        suites[job["suite"]].append(Run(d, job, rows, summary and common.current_keys(summary),
                                        config))
    return dict(suites)


# ----------------------------------------------------------------------------------- tables
def metric_name(script: str, metric: str) -> str:
    """A metric in words (the score: the script's family's)."""
    if metric == "score":
        return SCORE_NAMES.get(script, "score")
    return METRIC_NAMES.get(metric, metric)


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
                  f"{metric_name(script, metric)}:", "",
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


# ------------------------------------------------------------------- claims: pairs, tables
def finished(runs: list[Run], script: str, env: str, variant: str) -> list[Run]:
    return [r for r in runs if r.key == (script, env, variant) and r.summary is not None
            and r.rows]


def row_at(run: Run, step: int) -> dict[str, Any] | None:
    """The evaluation row of a run at a gradient step (offline rows for Cal-QL)."""
    return next((r for r in run.rows if r.get("step") == step
                 and r.get("phase", "offline") == "offline"), None)


def largest_drop(run: Run) -> tuple[float, float | None]:
    """Largest fall of the score below the pre-trained (last offline) score during online
    fine-tuning, and the env step of the lowest online evaluation (None: no drop)."""
    offline = [r for r in run.rows if r.get("phase") == "offline"]
    online = [r for r in run.rows if r.get("phase") == "online"]
    if not offline or not online:
        return 0.0, None
    low = min(online, key=lambda r: r["score"])
    drop = offline[-1]["score"] - low["score"]
    return (float(drop), float(low["env_steps"])) if drop > 0 else (0.0, None)


def online_mean(run: Run, key: str) -> float | None:
    """Mean of a logged training metric over the online evaluations."""
    vals = [r[key] for r in run.rows if r.get("phase") == "online" and r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def ci_cell(values: Sequence[float | None], digits: int = 1, signed: bool = False) -> str:
    """Mean [95% bootstrap CI] over seeds of the values that exist."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return "—"
    agg = aggregate(vals, reps=1000)
    f = f"{{:{'+' if signed else ''}.{digits}f}}".format
    return f"{f(agg.mean)} [{f(agg.mean_ci[0])}, {f(agg.mean_ci[1])}]"


def mean_of(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def gap_sign(gap: float) -> str:
    return "below" if gap <= 0 else "above"


# CQL's lower bound at convergence (issue 18). A run's settled gap is the mean value gap over
# its last 20 % of evaluations (at least one); the run has converged when that mean differs
# from the mean over the 20 % before it by at most 5 % of the obtained discounted return's
# magnitude over the last window (|Q(s0, pi(s0)) - gap|). Stated before the runs were seen.
CONVERGENCE = ("settled gap = mean value gap over the last 20% of evaluations; converged = it "
               "differs from the mean over the 20% before by at most 5% of the obtained "
               "discounted return's magnitude")
WINDOW, BAND_SHARE = 0.2, 0.05


@dataclass
class Settled:
    """The value gap a run settled at, and whether it had stopped moving."""

    gap: float
    converged: bool | None  # None: too few evaluations or no Q(s0) logged to judge
    drift: float | None
    band: float | None


def gap_windows(run: Run) -> tuple[list[dict], list[dict]] | None:
    """The (offline) rows with a value gap: the last WINDOW of them and the window before."""
    rows = [r for r in run.rows if r.get("value_gap") is not None
            and r.get("phase", "offline") == "offline"]
    if not rows:
        return None
    w = max(1, int(np.ceil(WINDOW * len(rows))))
    return rows[-w:], rows[-2 * w:-w]


def settle(run: Run) -> Settled | None:
    """The settled value gap of a run and the convergence test (CONVERGENCE)."""
    if (windows := gap_windows(run)) is None:
        return None
    last, prev = windows
    w = len(last)
    gap = float(np.mean([r["value_gap"] for r in last]))
    if len(prev) < w or any(r.get("q_pred_s0") is None for r in last):
        return Settled(gap, None, None, None)
    drift = gap - float(np.mean([r["value_gap"] for r in prev]))
    band = BAND_SHARE * float(np.mean([abs(r["q_pred_s0"] - r["value_gap"]) for r in last]))
    return Settled(gap, abs(drift) <= band, drift, band)


def settled_return_gap(run: Run) -> float | None:
    """The settled value gap in return units: the rows' value_gap_return over the same
    window; a run written without it, its settled gap x return_units (None: unknown)."""
    if (windows := gap_windows(run)) is None:
        return None
    last = windows[0]
    if all(r.get("value_gap_return") is not None for r in last):
        return float(np.mean([r["value_gap_return"] for r in last]))
    units = return_units(run)
    return None if units is None else settle(run).gap * units


def return_units(run: Run) -> float | None:
    """Factor from training-reward units to return units (1 / reward scale), None when the
    rewards were not only scaled; for runs whose rows lack value_gap_return (older runs)."""
    args = run.config.get("args", {})
    if args.get("reward_mode", "none") == "none":
        return 1.0
    if args.get("reward_mode") == "scale_bias" and not args.get("reward_bias", 0.0):
        return 1.0 / float(args.get("reward_scale", 1.0))
    return None


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def count_cell(k: int, n: int) -> str:
    """'k/n [low, high]' with the Wilson interval of the share."""
    low, high = wilson(k, n)
    return f"{k}/{n} [{low:.2f}, {high:.2f}]"


def settled_gaps(group: list[Run]) -> list[float]:
    return [s.gap for r in group if (s := settle(r)) is not None]


def pair_line(runs: list[Run], script: str, env: str, tag: str = "") -> str | None:
    """One sentence, from the numbers, on what a method shows next to its baseline; `tag`
    names a side condition run for both (variants <method><tag> and <baseline><tag>)."""
    method, base = (v + tag for v in PAIRS[script])
    where = f"`{env}`" + (f", condition `{tag.lstrip('-')}`" if tag else "")
    a, b = finished(runs, script, env, method), finished(runs, script, env, base)
    if not a or not b:
        return None
    seeds = (f"{len(a)} seed{'s' if len(a) > 1 else ''} each" if len(a) == len(b) else
             f"{len(a)} and {len(b)} seeds")
    name = metric_name(script, a[0].job["metric"])
    few = min(len(a), len(b)) < MIN_VERDICT_SEEDS
    no_verdict = (f": {'one seed' if max(len(a), len(b)) == 1 else 'fewer than 3 seeds'}, "
                  "too few for a verdict.")
    if script == CQL_SAC:
        da, db = settled_gaps(a), settled_gaps(b)
        sa, sb = (mean_of([r.final for r in g]) for g in (a, b))
        if not da or not db:
            return None
        ga, gb = float(np.mean(da)), float(np.mean(db))
        ka, kb = sum(g <= 0 for g in da), sum(g <= 0 for g in db)
        ca, cb = (sum(bool(s and s.converged) for s in map(settle, g)) for g in (a, b))
        verdict = ("CQL's predicted value is a lower bound of the return it obtains on every "
                   "run and naive SAC over-estimates on every run" if ka == len(da)
                   and kb == 0 else
                   "both under-estimate on every run (the data cover what either policy does)"
                   if ka == len(da) and kb == len(db) else
                   f"CQL's predicted value is a lower bound on every run, naive SAC's on {kb} "
                   f"of {len(db)}" if ka == len(da) else
                   "CQL over-estimates here: the lower bound does not hold (on any run)"
                   if ka == 0 else
                   f"the lower bound holds on {ka} of {len(da)} runs only, not on every run")
        return (f"- **CQL vs naive offline SAC**, {where} ({seeds}): value gap {ga:+.1f} vs "
                f"{gb:+.1f} (predicted minus obtained discounted return, settled: mean over "
                f"the last 20% of evaluations; CQL {gap_sign(ga)}, SAC {gap_sign(gb)} the "
                f"truth on average), runs with gap <= 0: {count_cell(ka, len(da))} vs "
                f"{count_cell(kb, len(db))}, converged {ca}/{len(a)} vs {cb}/{len(b)}, "
                f"{name} {fmt(sa)} vs {fmt(sb)}" + (no_verdict if few else f": {verdict}"
                + ("." if ca == len(a) else f" (by the end of the budget; CQL's gap had "
                   f"stopped moving on {ca} of {len(a)} runs).")))
    if script == CQL_QRDQN:
        sa, sb = (mean_of([r.final for r in g]) for g in (a, b))
        if sa is None or sb is None:
            return None
        word = "higher than" if sa > sb else "lower than" if sa < sb else "equal to"
        return (f"- **CQL vs plain QR-DQN**, {where} ({seeds}): {name} {fmt(sa)} vs {fmt(sb)}"
                + (no_verdict if few else f": CQL's is {word} the unregularized learner's on "
                   "the same data."))
    off_a, off_b = (mean_of([r.summary.get("offline_score") for r in g]) for g in (a, b))
    drop_a, drop_b = (mean_of([largest_drop(r)[0] for r in g]) for g in (a, b))
    reg_a, reg_b = (mean_of([r.summary.get("cumulative_regret") for r in g]) for g in (a, b))
    cal_a, cal_b = (mean_of([r.summary.get("calib_below_share_offline_end") for r in g])
                    for g in (a, b))
    if None in (off_a, off_b, drop_a, drop_b, reg_a, reg_b):
        return None
    further = ("CQL further" if drop_b > drop_a else "Cal-QL further" if drop_a > drop_b
               else "equally")
    unlearn = ("CQL unlearns and Cal-QL does not" if drop_b > 0 == drop_a else
               f"both dip, {further}" if drop_a > 0 and drop_b > 0 else
               "Cal-QL dips and CQL does not" if drop_a > 0 else
               "neither dips below its pre-trained score")
    regret = ("lower" if reg_a < reg_b else "higher" if reg_a > reg_b else "the same")
    calib = ("" if cal_a is None or cal_b is None else
             f"; share of batch states with Q(s, pi(s)) < V_mu(s) at the end of pre-training "
             f"{cal_a:.2f} vs {cal_b:.2f}")
    return (f"- **Cal-QL vs CQL fine-tuning**, {where} ({seeds}): offline score "
            f"{fmt(off_a)} vs {fmt(off_b)}, largest drop after the switch to online "
            f"{fmt(drop_a)} vs {fmt(drop_b)}, cumulative regret {reg_a:.2f} vs {reg_b:.2f}"
            f"{calib}" + (no_verdict if few else
                          f": {unlearn}, and Cal-QL's regret is {regret}."))


def bound_line(runs: list[Run]) -> str | None:
    """Across datasets, per CQL-SAC variant: the runs whose settled gap is <= 0 out of all
    runs (Wilson 95% CI), per dataset, and how many converged (CONVERGENCE)."""
    ours = [r for r in runs if r.job["script"] == CQL_SAC and r.summary is not None and r.rows]
    envs = sorted({r.job["env"] for r in ours})
    if len(envs) < 2:
        return None
    method, base = PAIRS[CQL_SAC]
    variants = sorted({r.job["variant"] for r in ours},
                      key=lambda v: (v not in (method, base), v != method, v))
    lines = [f"- **Lower bound across {len(envs)} datasets** (runs with settled value gap "
             "<= 0 out of all runs, Wilson 95% CI; per dataset; runs that converged):"]
    for v in variants:
        per = {e: [settle(r) for r in ours if r.key == (CQL_SAC, e, v)] for e in envs}
        per = {e: [s for s in group if s is not None] for e, group in per.items() if group}
        n = sum(len(g) for g in per.values())
        k = sum(s.gap <= 0 for g in per.values() for s in g)
        conv = sum(bool(s.converged) for g in per.values() for s in g)
        each = ", ".join(f"{e.removeprefix('pendulum-')} {sum(s.gap <= 0 for s in g)}/{len(g)}"
                         for e, g in per.items())
        word = ("on every run" if k == n else "on no run" if k == 0 else
                f"on {k} of {n} runs, not on every run")
        lines.append(f"  - `{v}` ({variant_label(CQL_SAC, v)}): {count_cell(k, n)} ({each}); "
                     f"converged {conv}/{n}: gap <= 0 {word}.")
    return "\n".join(lines)


def pair_lines(runs: list[Run]) -> list[str]:
    """A line per (script, task) of the suite that has both a method and its baseline."""
    lines = []
    for script in PAIRS:  # CQL-SAC, QR-DQN, Cal-QL: the order of the README
        envs = sorted({r.job["env"] for r in runs if r.job["script"] == script})
        method = PAIRS[script][0]
        for env in envs:
            tags = sorted({r.job["variant"][len(method):] for r in runs
                           if r.job["script"] == script and r.job["env"] == env
                           and r.job["variant"].startswith(method)})
            lines += [line for tag in tags if (line := pair_line(runs, script, env, tag))]
        if script == CQL_SAC and (line := bound_line(runs)):
            lines.append(line)
    return ["What it shows (each method next to its baseline; means over seeds; a verdict "
            f"only with {MIN_VERDICT_SEEDS} or more seeds of each):", "",
            *lines, ""] if lines else []


def gap_steps(group: list[Run], n: int = 3) -> list[int]:
    """n evaluation steps shared by every run of a group, evenly spaced, ending at the last."""
    common = sorted(set.intersection(*({r["step"] for r in run.rows if r["step"] > 0}
                                       for run in group)))
    if len(common) <= n:
        return common
    return [common[round((i + 1) * len(common) / n) - 1] for i in range(n)]


def lower_bound_table(runs: list[Run]) -> list[str]:
    """Paper Table 4's measurement: value gap of CQL-SAC runs at several steps, per dataset
    and variant, mean [95% CI] over seeds, next to the final normalized score."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        if run.job["script"] == CQL_SAC and run.summary is not None and run.rows:
            groups[(run.job["env"], run.job["variant"])].append(run)
    if not groups:
        return []
    steps = gap_steps([r for g in groups.values() for r in g])
    head = ["dataset", "variant", "seeds", *(f"value gap @{s}" for s in steps),
            "runs with gap <= 0 (last)", "final normalized score", "settled gap",
            "settled gap, return units", "runs with settled gap <= 0 [95% CI]", "converged",
            "drift / band, per run"]
    lines = ["**Lower bound** (CQL paper Table 4): value gap = min over twins of "
             "Q(s0, pi(s0)) minus the discounted return obtained from s0 (training-reward "
             "units: x0.1 for the pendulum preset), mean [95% CI] over seeds at gradient "
             "steps " + ", ".join(map(str, steps)) + "; <= 0: the predicted value is a lower "
             f"bound. {CONVERGENCE[0].upper()}{CONVERGENCE[1:]}; return units = the rows' "
             "value_gap_return (older runs: the gap divided by the reward scale). Runs: "
             "Wilson 95% CI of the share. Drift / band: each run's settled gap minus the mean "
             "of the window before, and its band (converged: |drift| <= band).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (env, variant), group in sorted(groups.items()):
        gaps = [ci_cell([(row_at(r, s) or {}).get("value_gap") for r in group], signed=True)
                for s in steps]
        below = sum(r.summary.get("value_gap", 1.0) <= 0 for r in group)
        settled = [(settle(r), settled_return_gap(r)) for r in group]
        settled = [(s, g) for s, g in settled if s is not None]
        k = sum(s.gap <= 0 for s, _ in settled)
        conv = sum(bool(s.converged) for s, _ in settled)
        lines.append("| " + " | ".join([
            env, variant, str(len(group)), *gaps, f"{below}/{len(group)}",
            ci_cell([r.final for r in group]), ci_cell([s.gap for s, _ in settled], signed=True),
            ci_cell([g for _, g in settled if g is not None], signed=True),
            count_cell(k, len(settled)), f"{conv}/{len(settled)}",
            ", ".join(f"{s.drift:+.1f}/{s.band:.1f}" for s, _ in settled
                      if s.converged is not None) or "—"]) + " |")
    return [*lines, ""]


def finetune_table(runs: list[Run]) -> list[str]:
    """Cal-QL vs CQL through the start of fine-tuning: offline score, the largest drop
    below it and when, cumulative regret, final score, calibration, mean [95% CI]."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        if run.job["script"] == CALQL and run.summary is not None:
            groups[(run.job["env"], run.job["variant"])].append(run)
    if not groups:
        return []
    head = ["task", "variant", "seeds", "offline score", "largest drop", "at env step (each)",
            "cum. regret", "final score", "Q < V_mu share, end of offline",
            "Q < V_mu share, online mean"]
    lines = ["**Fine-tuning** (Cal-QL paper Fig. 1, 4): scores are success rates x100; "
             "largest drop = pre-trained score minus the lowest online score (0 if none); "
             "cumulative regret = mean over online evaluations of 1 - success rate; Q < V_mu "
             "share = share of a training batch's states with min_j Q_j(s, a~pi(s)) below "
             "the Monte-Carlo return-to-go V_mu(s). Mean [95% CI] over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (env, variant), group in sorted(groups.items()):
        drops = [largest_drop(r) for r in group]
        when = ", ".join("—" if w is None else str(int(w)) for _, w in drops)
        lines.append("| " + " | ".join([
            env, variant, str(len(group)),
            ci_cell([r.summary.get("offline_score") for r in group], 0),
            ci_cell([d for d, _ in drops], 0), when,
            ci_cell([r.summary.get("cumulative_regret") for r in group], 2),
            ci_cell([r.final for r in group], 0),
            ci_cell([r.summary.get("calib_below_share_offline_end") for r in group], 2),
            ci_cell([online_mean(r, "calib_below_share") for r in group], 2)]) + " |")
    return [*lines, ""]


# ----------------------------------------------------------------------------------- curves
def _num(value: Any) -> float:
    """A metric value as a float; None (no reference scores, no success info) -> NaN."""
    return np.nan if value is None else float(value)


# Axis labels: what the number is, its units and scale.
AXIS_LABELS = {"return_mean": "episode return (mean over evaluation episodes)",
               "value_gap": "value gap: predicted minus obtained\ndiscounted return "
                            "(training rewards)",
               "calib_below_share": "share of batch states with\nQ(s, π(s)) < V_μ(s)  (0 to 1)"}
SCORE_AXES = {CQL_SAC: "normalized score (0 = random, 100 = expert)",
              CQL_QRDQN: "normalized score (0 = random, 100 = expert)",
              CALQL: "score (success rate, %)"}  # the axis of each script's `score`
# Variant labels in words: (script or None for any, variant base) -> words; suffix -> words.
VARIANT_WORDS = {(CQL_SAC, "cql"): "CQL", (CQL_SAC, "sac"): "naive SAC (CQL weight 0)",
                 (CQL_QRDQN, "cql"): "CQL", (CQL_QRDQN, "qrdqn"): "QR-DQN (CQL weight 0)",
                 (CALQL, "calql"): "Cal-QL", (CALQL, "cql"): "CQL (no calibration)"}
SUFFIX_WORDS = {"-eq1": "without the data term (Eq. 1)",
                "-polyak5e-3": "Polyak rate 5e-3 (the paper's)",
                "-conservative": "conservative settings", "-reward-x1": "raw rewards (x1)",
                "-umaze": "U-maze"}
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
           "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
BAND = "band = 95% bootstrap CI of the mean over seeds (as in the tables)"


def variant_label(script: str, variant: str) -> str:
    """`cql-eq1-polyak5e-3` -> 'CQL, without the data term (Eq. 1), Polyak rate 5e-3 ...'."""
    words = []
    rest = variant
    while suffix := next((s for s in SUFFIX_WORDS if rest.endswith(s)), None):
        words.insert(0, SUFFIX_WORDS[suffix])
        rest = rest.removesuffix(suffix)
    return ", ".join([VARIANT_WORDS.get((script, rest), rest), *words])


def variant_colours(runs: list[Run]) -> dict[str, str]:
    """One colour per method (its label) across every panel and figure of a suite."""
    labels = sorted({variant_label(*r.key[::2]) for r in runs},
                    key=lambda label: (not label.startswith(("CQL", "Cal-QL")), label))
    return {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(labels)}


def phase_curve(run: Run, key: str, phase: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one run: all rows at their gradient step (phase None), Cal-QL's offline rows
    at their gradient step, or its online rows at their env step, starting from the last
    offline evaluation at env step 0 (the switch)."""
    rows = run.rows if phase is None else [r for r in run.rows if r.get("phase") == phase]
    if phase != "online":
        return (np.array([r["step"] for r in rows], float),
                np.array([_num(r.get(key)) for r in rows], float))
    offline = [r for r in run.rows if r.get("phase") == "offline"][-1:]
    x = [0.0] * len(offline) + [float(r["env_steps"]) for r in rows]
    return np.array(x), np.array([_num(r.get(key)) for r in [*offline, *rows]], float)


def mean_band(y: np.ndarray, reps: int = 1000, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Mean over seeds (rows) at each x and its 95% percentile bootstrap CI over seeds (the
    tables' interval; None for one seed). NaN where a seed has no value (step 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(y, 0)
        if len(y) < 2:
            return mean, None, None
        idx = np.random.default_rng(seed).integers(len(y), size=(reps, len(y)))
        means = np.nanmean(y[idx], 1)  # (reps, x)
        return mean, np.nanpercentile(means, 2.5, 0), np.nanpercentile(means, 97.5, 0)


def draw_panel(ax, script: str, env: str, groups: dict[str, list[Run]], key: str,
               phase: str | None, colours: dict[str, str], symlog: bool) -> None:
    """One panel: a line per variant (mean over seeds) with its CI band."""
    for variant, group in sorted(groups.items()):
        curves = [phase_curve(r, key, phase) for r in group]
        # seeds may evaluate at slightly different x (Cal-QL evaluates after whole
        # trajectories): interpolate every seed onto the shortest run's x
        x = min((c[0] for c in curves), key=len)
        if not len(x):
            continue
        y = np.array([np.interp(x, cx, cy) for cx, cy in curves], float)
        mean, low, high = mean_band(y)
        label = variant_label(script, variant)
        seeds = f"{len(group)} seed{'s' if len(group) > 1 else ', no band'}"
        ax.plot(x, mean, marker=".", color=colours[label], label=f"{label} ({seeds})")
        if low is not None:
            ax.fill_between(x, low, high, alpha=0.2, color=colours[label], lw=0)
        if phase == "online":  # where each method starts fine-tuning from
            ax.axhline(mean[0], color=colours[label], ls=":", lw=1)
    if phase == "online":
        ax.plot([], [], color="0.4", ls=":", lw=1, label="dotted: score at the switch")
    scale = ""
    if symlog:
        ax.set_yscale("symlog", linthresh=10)
        ax.axhline(0, color="k", lw=0.8, label="0: prediction = outcome")
        scale = "\n(symlog scale: linear in ±10)"
    label = SCORE_AXES.get(script, "score") if key == "score" else AXIS_LABELS.get(key, key)
    ax.set_ylabel(label + scale, fontsize=9)
    ax.set_xlabel({None: "gradient steps", "offline": "pre-training: gradient steps",
                   "online": "fine-tuning: environment steps after the switch"}[phase])
    what = {None: "", "offline": ", offline pre-training", "online": ", online fine-tuning"}
    ax.set_title(f"{ALGORITHM.get(script, script)}: {env}{what[phase]}", fontsize=10)
    ax.grid(alpha=0.3)
    # below the panel: long labels never cover the curves
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)


def suite_figure(suite: str, runs: list[Run], metric: str | None = None,
                 scripts: tuple[str, ...] | None = None, symlog: bool = False):
    """The figure: a panel per (script, task), two for Cal-QL (pre-training, then
    fine-tuning on its own x axis so that the switch is large enough to see); `metric`
    plots that key of the rows instead of each job's metric; `scripts` filters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = variant_colours(runs)  # from the whole suite: the same in every figure
    panels: dict[tuple[str, str], dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.rows and (scripts is None or run.job["script"] in scripts):
            panels[(run.job["script"], run.job["env"])][run.job["variant"]].append(run)
    order = lambda key: (SCRIPTS.index(key[0]) if key[0] in SCRIPTS else len(SCRIPTS), key)
    slots = [(key, phase) for key in sorted(panels, key=order)  # the README's order
             for phase in (("offline", "online") if key[0] == CALQL else (None,))]
    cols = min(3, max(1, len(slots)))
    rows = (len(slots) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 5.0 * rows), squeeze=False)
    for ax, ((script, env), phase) in zip(axes.flat, slots, strict=False):
        groups = panels[(script, env)]
        key = metric or next(iter(groups.values()))[0].job["metric"]
        draw_panel(ax, script, env, groups, key, phase, colours, symlog)
    for ax in list(axes.flat)[len(slots):]:
        ax.axis("off")
    what = f"{METRIC_NAMES.get(metric, metric)}; " if metric else ""
    title = f"suite {suite}: {what}lines = mean over seeds, {BAND}"
    fig.suptitle(textwrap.fill(title, 60 * cols), fontsize=11)
    fig.tight_layout()
    return fig


def plot_suite(suite: str, runs: list[Run], path: Path, metric: str | None = None,
               scripts: tuple[str, ...] | None = None, symlog: bool = False) -> Path:
    """Write suite_figure() to a PNG."""
    import matplotlib.pyplot as plt

    fig = suite_figure(suite, runs, metric, scripts, symlog)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------- report
def suite_header(suite: str, suite_dir: Path, root: Path, command: str) -> list[str]:
    """Title, description and how the runs were produced (from the runner's suite.json);
    `command`: the one that writes this report. Paths relative to the repository or to the
    run root, never the machine's own."""
    lines = [f"# Suite `{suite}`", ""]
    if suite in SUITES:
        lines += [SUITES[suite].description + ".", ""]
    path = suite_dir / common.SUITE_FILE
    if path.exists():
        for inv in read_json(path)["invocations"]:
            lines += [f"- Command: `{common.scrub(inv['command'], root)}` ({inv['launcher']} "
                      "launcher, "
                      f"{inv['jobs']} at once): {inv['ok']} ran, {inv['skipped']} skipped, "
                      f"{inv['failed']} failed, {inv['wall_s'] / 60:.1f} min wall",
                      *common.machine_lines(inv["machine"])]
        lines.append("")
    lines += [f"Report: `{common.scrub(command, root)}`", ""]
    return lines


def unfinished_lines(runs: list[Run], root: Path) -> list[str]:
    """Every run without summary.json, with the exit code and the reason its log.txt ends
    with (the runner writes both there)."""
    rows = []
    for run in sorted((r for r in runs if r.summary is None), key=lambda r: r.path):
        log = run.path / common.LOG_FILE
        text = log.read_text(errors="replace") if log.exists() else ""
        code = common.exit_code(text)
        reason = common.failure_reason(text) if text else "no log.txt: never started"
        where = run.path.relative_to(root) if run.path.is_relative_to(root) else run.path.name
        rows.append(f"| `{where}` | {'— (not recorded)' if code is None else code} | "
                    f"{common.scrub(reason, root).replace('|', '/')} |")
    if not rows:
        return []
    return [f"**Runs that did not finish** ({len(rows)} of {len(runs)}; not in the statistics "
            "below; reason: the end of the run's log.txt):", "",
            "| run (under the run root) | exit code | reason |", "|---|---|---|", *rows, ""]


def write_report(root: Path, out: Path | None = None, suites: Sequence[str] | None = None,
                 command: str | None = None) -> list[Path]:
    """Write <out>/<suite>.md and <out>/<suite>_curves.png for each suite under root;
    `command` (default: this process's) is recorded as the one that writes the report."""
    root = Path(root).resolve()
    command = command or common.command_line()
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for suite, runs in sorted(load_runs(root).items()):
        if suites and suite not in suites:
            continue
        figure = plot_suite(suite, runs, out / f"{suite}_curves.png")
        extra = [plot_suite(suite, runs, out / f"{suite}_{name}.png", metric, scripts, symlog)
                 for name, (metric, scripts, symlog) in FIGURES.items()
                 if any(r.job["script"] in scripts and r.rows for r in runs)]
        suite_dir = runs[0].path.parents[1]
        lines = [*suite_header(suite, suite_dir, root, command),
                 *unfinished_lines(runs, root),
                 "Final score over seeds: mean and IQM with 95% percentile bootstrap CIs "
                 "(rliable), std with ddof 1; `seeds` = finished/all runs. Reference columns: "
                 "CQL paper (Kumar et al. 2020, Tables 1-3) and a PyTorch reimplementation "
                 "(D4RL v2), where the task matches.", "",
                 *pair_lines(runs), *suite_table(runs), *lower_bound_table(runs),
                 *finetune_table(runs), f"![learning curves]({figure.name})", "",
                 *(f"![{f.stem}]({f.name})" for f in extra), ""]
        path = out / f"{suite}.md"
        path.write_text(common.scrub("\n".join(lines), root))  # no machine's paths
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=common.HelpFormatter)
    p.add_argument("run_root", type=Path, help="folder holding <suite>/<entry>/s<seed> runs")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_ROOT)")
    p.add_argument("--suite", action="append", default=None,
                   help="only this suite, repeatable (default: every suite found)")
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
