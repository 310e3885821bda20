"""Aggregation against hand-computed values; the report from a synthetic run root."""

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from benchmark import report
from benchmark.common import JOB_FILE, current_keys, current_metric, write_json
from benchmark.suites import CALQL, CQL_SAC


def test_mean_std_iqm_by_hand():
    agg = report.aggregate([1.0, 2.0, 3.0, 10.0], reps=500)
    assert agg.n == 4 and agg.mean == pytest.approx(4.0)
    assert agg.std == pytest.approx(np.sqrt((9 + 4 + 1 + 36) / 3))  # ddof 1
    assert agg.iqm == pytest.approx(2.5)  # 4 runs: drop 1 at each end, mean of 2 and 3
    agg8 = report.aggregate([100.0, 0, 5, 1, 4, 2, 6, 3], reps=500)
    assert agg8.iqm == pytest.approx((2 + 3 + 4 + 5) / 4)  # the middle half of 8 runs
    assert agg8.mean == pytest.approx(121 / 8)
    one = report.aggregate([7.0], reps=100)  # one seed: no spread, CI collapses
    assert (one.std, one.mean_ci, one.iqm_ci) == (0.0, (7.0, 7.0), (7.0, 7.0))


def exact_bootstrap(x: np.ndarray, stat) -> np.ndarray:
    """The statistic on every one of the n^n equally likely resamples (the bootstrap's
    exact distribution)."""
    return np.array([stat(x[list(idx)]) for idx in itertools.product(range(len(x)),
                                                                       repeat=len(x))])


def iqm(x: np.ndarray) -> float:
    """Interquartile mean by hand: sort, drop floor(n/4) runs at each end, average."""
    k = len(x) // 4
    return float(np.sort(x)[k:len(x) - k].mean())


def test_bootstrap_cis_match_the_exact_bootstrap_distribution():
    x = np.array([0.0, 1.0, 2.0, 4.0, 8.0])
    agg = report.aggregate(x, reps=4000, seed=1)
    for point, ci, stat in ((agg.mean, agg.mean_ci, np.mean), (agg.iqm, agg.iqm_ci, iqm)):
        dist = exact_bootstrap(x, stat)
        assert point == pytest.approx(stat(x))
        # 95% percentile interval: bounds near the exact 2.5% / 97.5% quantiles
        assert np.percentile(dist, 1.0) <= ci[0] <= np.percentile(dist, 4.0)
        assert np.percentile(dist, 96.0) <= ci[1] <= np.percentile(dist, 99.0)
        assert ci[0] < point < ci[1]


def fake_run(root: Path, suite: str, script: str, env: str, variant: str, seed: int,
             rows: list[dict], summary: dict | None, metric: str = "score",
             reference: str | None = None, config: dict | None = None) -> Path:
    """A run directory as the runner and a script leave it."""
    d = root / suite / f"{Path(script).stem}__{variant}__{env}" / f"s{seed}"
    write_json(d / JOB_FILE, dict(suite=suite, script=script, env=env, variant=variant,
                                  seed=seed, metric=metric, reference=reference))
    write_json(d / "config.json", dict(args=config or {}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        write_json(d / "summary.json", dict(updates_per_sec=50.0, **summary))
    return d


@pytest.fixture
def run_root(tmp_path):
    root = tmp_path / "runs"
    for seed, final in enumerate([10.0, 20.0, 60.0]):
        fake_run(root, "local", CQL_SAC, "pendulum-expert", "cql", seed,
                 [dict(step=500, score=0.0), dict(step=1000, score=final)],
                 dict(value_gap=-1.0 - seed))
    # an interrupted run: counted as not finished, not aggregated
    fake_run(root, "local", CQL_SAC, "pendulum-expert", "cql", 3,
             [dict(step=500, score=99.0)], None)
    for seed, (offline, final) in enumerate([(40.0, 80.0), (60.0, 100.0)]):
        rows = [dict(step=100, phase="offline", env_steps=0, score=offline / 2),
                dict(step=200, phase="offline", env_steps=0, score=offline),
                dict(step=300, phase="online", env_steps=100, score=offline - 30),
                dict(step=400, phase="online", env_steps=200, score=final)]
        fake_run(root, "local", CALQL, "pointmaze-binary", "calql", seed, rows,
                 dict(offline_score=offline, cumulative_regret=0.5 + 0.1 * seed,
                      max_drop_below_offline=30.0), config=dict(offline_steps=200))
    fake_run(root, "d4rl-gym", CQL_SAC, "hopper-medium", "cql", 0,
             [dict(step=1000, score=55.0)], dict(value_gap=-3.0),
             reference="cql-sac/hopper-medium")
    return root


def table_row(text: str, *prefix: str) -> list[str]:
    """Cells of the Markdown table row that starts with the given cells."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:len(prefix)] == list(prefix):
            return cells
    raise AssertionError(f"no row {prefix} in\n{text}")


def test_report_from_a_synthetic_run_root(run_root, tmp_path):
    out = tmp_path / "report"
    assert report.main([str(run_root), "--out", str(out)]) == 0
    local = (out / "local.md").read_text()
    # CQL-SAC: 3 finished seeds of 4, finals 10, 20, 60
    row = table_row(local, "pendulum-expert", "cql")
    assert row[2] == "3/4"
    assert row[3].startswith("30.0 [")  # mean
    assert row[4] == f"{np.std([10, 20, 60], ddof=1):.1f}"  # 26.5
    assert row[5].startswith("30.0 [")  # IQM of 3 runs = mean (nothing trimmed)
    assert row[6] == "-2.00 ± 1.00"  # value gap
    # Cal-QL: offline score, regret, largest drop from summary.json
    row = table_row(local, "pointmaze-binary", "calql")
    assert row[2] == "2/2" and row[3].startswith("90.0 [")
    assert row[6:9] == ["50.00 ± 14.14", "0.55 ± 0.07", "30.00 ± 0.00"]
    # reference numbers next to a matching task; one figure per suite
    row = table_row((out / "d4rl-gym.md").read_text(), "hopper-medium", "cql")
    assert row[3].startswith("55.0") and row[7:9] == ["58.0", "59.1"]
    for suite in ("local", "d4rl-gym"):
        png = out / f"{suite}_curves.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"({suite}_curves.png)" in (out / f"{suite}.md").read_text()


def test_calql_curves_split_at_the_switch(run_root):
    runs = report.load_runs(run_root)["local"]
    calql = next(r for r in runs if r.job["script"] == CALQL and r.job["seed"] == 0)
    x, y = report.phase_curve(calql, "score", "offline")
    assert list(x) == [100, 200] and list(y) == [20, 40]
    x, y = report.phase_curve(calql, "score", "online")  # from the switch, in env steps
    assert list(x) == [0, 100, 200] and list(y) == [40, 10, 80]
    sac = next(r for r in runs if r.job["script"] == CQL_SAC)
    assert list(report.phase_curve(sac, "score", None)[0]) == [500, 1000]


def test_empty_root_is_an_error(tmp_path):
    assert report.main([str(tmp_path)]) == 1


def claims_root(tmp_path: Path, cql_gap: float, seeds: int = 3) -> Path:
    """A synthetic `claims` run root: CQL-SAC vs SAC on one dataset (CQL's last value gap
    `cql_gap` + seed, SAC's +50 + seed), Cal-QL vs CQL where CQL dips to 60 at env step 500."""
    root = tmp_path / "runs"
    for seed in range(seeds):
        for variant, last_gap in (("cql", cql_gap), ("sac", 50.0)):
            rows = [dict(step=s, score=90.0 - (variant == "sac") * 60,
                         value_gap=last_gap * s / 3000 + seed) for s in (1000, 2000, 3000)]
            fake_run(root, "claims", CQL_SAC, "pendulum-medium", variant, seed, rows,
                     dict(value_gap=rows[-1]["value_gap"]))
        for variant, dip in (("calql", 100.0), ("cql", 60.0)):
            rows = [dict(step=3000, phase="offline", env_steps=0, score=100.0,
                         calib_below_share=0.1 if variant == "calql" else 0.7),
                    dict(step=3100, phase="online", env_steps=250, score=100.0,
                         calib_below_share=0.2),
                    dict(step=3200, phase="online", env_steps=500, score=dip,
                         calib_below_share=0.4),
                    dict(step=3300, phase="online", env_steps=750, score=100.0)]
            regret = float(np.mean([1 - r["score"] / 100 for r in rows[1:]]))
            fake_run(root, "claims", CALQL, "pointmaze-binary", variant, seed, rows,
                     dict(offline_score=100.0, cumulative_regret=regret,
                          calib_below_share_offline_end=rows[0]["calib_below_share"]),
                     config=dict(offline_steps=3000))
    return root


def test_claims_report_states_each_pair_and_the_tables(tmp_path):
    out = tmp_path / "report"
    assert report.main([str(claims_root(tmp_path, -6.0)), "--out", str(out)]) == 0
    text = (out / "claims.md").read_text()
    # one line per pair, from the numbers: CQL gap mean (-6 - 5 - 4) / 3, SAC (50 + 51 + 52) / 3
    assert ("(3 seeds each): value gap -5.0 vs +51.0" in text and "normalized score 90.0 vs "
            "30.0: CQL's" in text and "CQL's predicted value is a lower bound"
            in text and "naive SAC over-estimates" in text)
    assert "CQL unlearns and Cal-QL does not" in text
    assert "largest drop after the switch to online 0.0 vs 40.0" in text
    assert "cumulative regret 0.00 vs 0.13" in text and "Cal-QL's regret is lower" in text
    assert "pre-training 0.10 vs 0.70" in text
    # Table 4 style: gap at each evaluated step, mean [CI] over 3 seeds, and the sign count
    bound, finetune = text.split("**Lower bound**")[1], text.split("**Fine-tuning**")[1]
    row = table_row(bound, "pendulum-medium", "cql")
    assert row[3].startswith("-1.0 [") and row[5].startswith("-5.0 [") and row[6] == "3/3"
    row = table_row(bound, "pendulum-medium", "sac")
    assert row[5].startswith("+51.0 [") and row[6] == "0/3"
    # fine-tuning: the drop and when it happened, calibration at the end of pre-training
    row = table_row(finetune, "pointmaze-binary", "cql")
    assert row[3].startswith("100 [") and row[4].startswith("40 [")
    assert row[5] == "500, 500, 500" and row[8].startswith("0.70 [")
    row = table_row(finetune, "pointmaze-binary", "calql")
    assert row[4].startswith("0 [") and row[5] == "—, —, —"
    for name in ("claims_curves", "claims_value_gap", "claims_calibration"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG" and f"({name}.png)" in text


def test_a_failed_bound_is_reported_as_such(tmp_path):
    assert report.main([str(claims_root(tmp_path, 4.0)), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "claims.md").read_text()
    assert "CQL over-estimates here: the lower bound does not hold" in text
    assert "lower bound of the return" not in text


def test_largest_drop_and_gap_steps_by_hand(tmp_path):
    runs = report.load_runs(claims_root(tmp_path, -6.0))["claims"]
    cql = next(r for r in runs if r.key == (CALQL, "pointmaze-binary", "cql"))
    assert report.largest_drop(cql) == (40.0, 500.0)
    calql = next(r for r in runs if r.key == (CALQL, "pointmaze-binary", "calql"))
    assert report.largest_drop(calql) == (0.0, None)
    sac = [r for r in runs if r.job["script"] == CQL_SAC]
    assert report.gap_steps(sac) == [1000, 2000, 3000]
    assert report.gap_steps(sac, n=1) == [3000]


@pytest.mark.parametrize("seeds", [1, 2])
def test_below_three_seeds_the_numbers_come_without_a_verdict(tmp_path, seeds):
    assert report.main([str(claims_root(tmp_path, -6.0, seeds)), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "claims.md").read_text()
    few = "one seed" if seeds == 1 else "fewer than 3 seeds"
    assert text.count(f": {few}, too few for a verdict.") == 2  # CQL-SAC and Cal-QL pairs
    for verdict in ("lower bound of the return", "unlearns", "regret is"):
        assert verdict not in text
    assert f"({seeds} seed{'s' if seeds > 1 else ''} each): value gap" in text


def test_figure_reads_without_the_code(tmp_path):
    """Words for variants, seeds in every legend entry, one colour per method in every
    panel, CI bands only with 2+ seeds, units on the axes, Cal-QL's switch on its own axis."""
    root = claims_root(tmp_path, -6.0)
    fake_run(root, "claims", CQL_SAC, "pendulum-medium", "cql-eq1-polyak5e-3", 0,
             [dict(step=s, score=50.0, value_gap=5.0) for s in (1000, 2000, 3000)],
             dict(value_gap=5.0))
    runs = report.load_runs(root)["claims"]
    fig = report.suite_figure("claims", runs)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == [
        "CQL-SAC: pendulum-medium", "Cal-QL fine-tuning: pointmaze-binary, offline pre-training",
        "Cal-QL fine-tuning: pointmaze-binary, online fine-tuning"]
    colour = {}
    for ax in axes:
        assert "(" in ax.get_ylabel() and "steps" in ax.get_xlabel()
        lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        labels = [line.get_label() for line in lines]
        assert labels == [t.get_text() for t in ax.get_legend().get_texts()]  # all in it
        for line in lines:
            if "seed" in line.get_label():
                method = line.get_label().rsplit(" (", 1)[0]
                assert colour.setdefault(method, line.get_color()) == line.get_color()
        assert len(ax.collections) == sum("3 seeds" in label for label in labels)  # bands
    sac_labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert sac_labels == ["CQL (3 seeds)", "CQL, without the data term (Eq. 1), Polyak rate "
                          "5e-3 (the paper's) (1 seed, no band)", "naive SAC (CQL weight 0) "
                          "(3 seeds)"]
    assert axes[2].get_xlabel() == "fine-tuning: environment steps after the switch"
    assert "dotted: score at the switch" in [t.get_text() for t in axes[2].get_legend().get_texts()]
    gap = report.suite_figure("claims", runs, "value_gap", (CQL_SAC,), symlog=True)
    assert "symlog" in gap.axes[0].get_ylabel() and "discounted return" in gap.axes[0].get_ylabel()
    gap_colour = {line.get_label().rsplit(" (", 1)[0]: line.get_color()
                  for line in gap.axes[0].get_lines()}
    assert gap_colour["CQL"] == colour["CQL"]  # the same colour in every figure of a suite
    report.plot_suite("claims", runs, tmp_path / "claims_curves.png")
    assert (tmp_path / "claims_curves.png").stat().st_size > 20_000


def test_verdict_lines_name_the_metric_they_compare(tmp_path):
    from benchmark.suites import CQL_QRDQN

    root = tmp_path / "runs"
    for seed in range(3):
        for variant, final in (("cql", 80.0), ("qrdqn", 20.0)):
            fake_run(root, "demo", CQL_QRDQN, "cartpole-expert", variant, seed,
                     [dict(step=500, score=final)], {})
    text = report.pair_lines(report.load_runs(root)["demo"])[2]
    assert "(3 seeds each): normalized score 80.0 vs 20.0: CQL's is higher" in text
    assert "return" not in text


def gap_rows(gaps: list[float], discounted_return: float = -100.0) -> list[dict]:
    """Evaluation rows every 1000 steps with these value gaps; Q(s0) = return + gap."""
    return [dict(step=1000 * (i + 1), score=50.0, value_gap=g,
                 q_pred_s0=discounted_return + g) for i, g in enumerate(gaps)]


def test_settled_gap_and_convergence_by_hand(tmp_path):
    root = tmp_path / "runs"
    # 10 evaluations: window = 2; band = 5% of |return| = 5
    flat = [9.0, 7, 5, 3, 1, 0, -1, 1, -1, -3]  # last 2 mean -2, the 2 before mean 0: drift -2
    moving = [30.0, 28, 26, 24, 22, 20, 18, 16, 6, 4]  # last 2 mean 5, before 17: drift -12
    for seed, gaps in enumerate((flat, moving)):
        fake_run(root, "claims", CQL_SAC, "pendulum-medium", "cql", seed, gap_rows(gaps),
                 dict(value_gap=gaps[-1]), config=dict(reward_mode="scale_bias",
                                                       reward_scale=0.1))
    a, b = sorted(report.load_runs(root)["claims"], key=lambda r: r.job["seed"])
    sa, sb = report.settle(a), report.settle(b)
    assert (sa.gap, sa.drift, sa.band, sa.converged) == (-2.0, -2.0, 5.0, True)
    assert (sb.gap, sb.drift, sb.band, sb.converged) == (5.0, -12.0, 5.0, False)
    assert report.return_units(a) == pytest.approx(10.0)  # x0.1 rewards: gap x 10 in returns
    row = table_row("\n".join(report.lower_bound_table([a, b])), "pendulum-medium", "cql")
    assert row[-2:] == ["1/2", "-2.0/5.0, -12.0/5.0"], row  # converged; drift / band per run
    one = fake_run(root, "x", CQL_SAC, "e", "v", 0, gap_rows([3.0]), dict(value_gap=3.0))
    assert report.settle(report.load_runs(one.parents[2])["x"][0]).converged is None


def test_wilson_interval_by_hand():
    # Wilson (1927): centre (k + z^2/2) / (n + z^2), half-width z sqrt(k(n-k)/n + z^2/4) / (n+z^2)
    z = 1.96
    for k, n in ((3, 3), (0, 5), (7, 15)):
        centre = (k + z * z / 2) / (n + z * z)
        half = z * np.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
        low, high = report.wilson(k, n)
        assert low == pytest.approx(max(0, centre - half)) and high == pytest.approx(
            min(1, centre + half))
    assert report.wilson(3, 3)[0] == pytest.approx(0.4385, abs=1e-4)
    assert report.count_cell(2, 3) == "2/3 [0.21, 0.94]"


def test_bound_line_counts_runs_not_the_sign_of_a_mean(tmp_path):
    """Two datasets: on one CQL's mean gap is below 0 but one of its 3 runs is above."""
    root = tmp_path / "runs"
    for env, cql in (("pendulum-medium", (-20.0, -20.0, 4.0)), ("pendulum-expert", (-1.0,) * 3)):
        for seed in range(3):
            for variant, gap in (("cql", cql[seed]), ("sac", 30.0)):
                fake_run(root, "claims", CQL_SAC, env, variant, seed, gap_rows([gap] * 5),
                         dict(value_gap=gap))
    text = report.bound_line(report.load_runs(root)["claims"])
    assert "`cql` (CQL): 5/6 [" in text and "(expert 3/3, medium 2/3)" in text
    assert "converged 6/6: gap <= 0 on 5 of 6 runs, not on every run" in text
    assert "`sac` (naive SAC (CQL weight 0)): 0/6 [" in text and "on no run" in text
    line = report.pair_line(report.load_runs(root)["claims"], CQL_SAC, "pendulum-medium")
    assert "value gap -12.0 vs +30.0" in line and "2/3 [0.21, 0.94] vs 0/3" in line
    assert "the lower bound holds on 2 of 3 runs only, not on every run." in line
    assert "converged 3/3 vs 3/3" in line and "by the end of the budget" not in line
    # CQL's gaps still moving on one run (the last two evaluations far from the two before):
    # the verdict says it is the end of the budget
    fake_run(root, "claims", CQL_SAC, "pendulum-medium", "cql", 3,
             gap_rows([-20.0, -20, -20, -20, -40]), dict(value_gap=-40.0))
    line = report.pair_line(report.load_runs(root)["claims"], CQL_SAC, "pendulum-medium")
    assert "converged 3/4 vs 3/3" in line
    assert line.endswith("(by the end of the budget; CQL's gap had stopped moving on 3 of 4 "
                         "runs).")
    line = report.pair_line(report.load_runs(root)["claims"], CQL_SAC, "pendulum-expert")
    assert line.endswith("CQL's predicted value is a lower bound of the return it obtains on "
                         "every run and naive SAC over-estimates on every run.")
    fake_run(root, "claims", CQL_SAC, "pendulum-expert", "sac", 3, gap_rows([-5.0] * 5),
             dict(value_gap=-5.0))
    line = report.pair_line(report.load_runs(root)["claims"], CQL_SAC, "pendulum-expert")
    assert line.endswith("CQL's predicted value is a lower bound on every run, naive SAC's on "
                         "1 of 4.")


def test_every_suite_variant_has_a_label_in_words():
    """Issue 22: no jargon labels such as `cql-reward-x1` in legends."""
    from benchmark.suites import SUITES

    for suite in SUITES.values():
        for entry in suite.entries:
            label = report.variant_label(entry.script, entry.variant)
            assert not re.search(r"\b[a-z]+-[a-z]", label), label  # no `cql-umaze` left
    assert report.variant_label(report.CQL_SAC, "cql-reward-x1") == "CQL, raw rewards (x1)"


def test_runs_written_with_the_old_keys_read_as_today(tmp_path):
    """Runs from before the run-file keys were unified (issue 22 item 4): job metric and rows
    `normalized_score`, summary `final_normalized_score` and a text `score`, no
    value_gap_return and no wall_time_s in the rows: the report reads them as today's keys,
    the gap in return units from the reward scale. A run of today takes value_gap_return."""
    root = tmp_path / "runs"
    old_rows = [dict(step=1000 * (i + 1), normalized_score=40.0 + i, value_gap=g,
                     q_pred_s0=g - 100.0) for i, g in enumerate([-3.0] * 5)]
    fake_run(root, "claims", CQL_SAC, "pendulum-medium", "cql", 0, old_rows,
             dict(final_normalized_score=44.0, score="100 * (return - ref_min) / ...",
                  value_gap=-3.0), metric="normalized_score",
             config=dict(reward_mode="scale_bias", reward_scale=0.1))
    new_rows = [dict(r, value_gap_return=-7.0, wall_time_s=float(i))  # not -3 x 10: read
                for i, r in enumerate(gap_rows([-3.0] * 5))]
    fake_run(root, "claims", CQL_SAC, "pendulum-medium", "cql", 1, new_rows,
             dict(final_score=50.0, value_gap=-3.0, value_gap_return=-7.0),
             config=dict(reward_mode="locomotion"))  # return_units: unknown
    a, b = sorted(report.load_runs(root)["claims"], key=lambda r: r.job["seed"])
    assert a.job["metric"] == "score" and a.final == 44.0 and a.rows[-1]["score"] == 44.0
    assert "normalized_score" not in a.rows[-1] and a.summary["final_score"] == 44.0
    assert a.summary["score_definition"].startswith("100 * (return")
    assert report.settled_return_gap(a) == pytest.approx(-30.0)  # -3 / 0.1
    assert report.settled_return_gap(b) == -7.0 and report.return_units(b) is None
    assert report.main([str(root), "--out", str(tmp_path / "r")]) == 0
    row = table_row((tmp_path / "r" / "claims.md").read_text().split("**Lower bound**")[1],
                    "pendulum-medium", "cql")
    assert row[-4].startswith("-18.5 [")  # the return-units column: mean of -30 and -7
    assert current_metric("normalized_score") == "score"
    assert current_keys(dict(step=1, score=50.0, normalized_score=None)) == dict(
        step=1, score=50.0)  # Cal-QL's old rows: the score kept, the null dropped
