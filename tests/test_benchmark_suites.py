"""Every suite resolves to valid arguments of its scripts (parsed by the scripts' own
`parse_args`, presets included, without running anything)."""

import importlib
from collections import Counter
from pathlib import Path

import pytest

from benchmark import datasets, suites
from benchmark.report import REFERENCES
from benchmark.suites import CALQL, CQL_QRDQN, CQL_SAC, SCRIPTS, SUITES, suite_jobs

MODULES = {script: importlib.import_module(script.removesuffix(".py")) for script in SCRIPTS}
ALL_JOBS = [job for name in SUITES for job in suite_jobs(name, Path("/runs"), seeds=2)]


def parse(job, resume: bool = False):
    """The job's arguments through the script's own command-line parser."""
    return MODULES[job.entry.script].parse_args(job.argv(resume=resume))


@pytest.mark.parametrize("job", ALL_JOBS[::2], ids=lambda j: j.label)
def test_every_job_parses_with_the_scripts_args(job):
    args = parse(job)
    assert args.env == job.entry.env and args.seed == job.seed
    assert Path(args.run_dir) == job.run_dir and args.progress is False
    resumed = parse(job, resume=True)
    assert resumed.resume == str(job.run_dir)


def test_a_bad_flag_in_a_suite_would_be_caught():
    job = suite_jobs("smoke", Path("/runs"))[0]
    bad = type(job)(job.suite, type(job.entry)(job.entry.script, job.entry.env,
                                                args=("--no-such-flag", "1")), 0, job.run_dir)
    with pytest.raises(SystemExit):
        parse(bad)


def test_suite_structure():
    for name, suite in SUITES.items():
        jobs = suite_jobs(name, Path("/runs"))
        assert len(jobs) == sum(e.seeds or suite.seeds for e in suite.entries)
        assert len({j.run_dir for j in jobs}) == len(jobs), f"{name}: run dirs collide"
        assert {j.entry.script for j in jobs} <= set(SCRIPTS)
    # the CPU suites run on local data only; smoke, demo and local use all scripts
    for name in ("smoke", "demo", "local", "claims", "finetune", "umaze-finetune"):
        entries = SUITES[name].entries
        assert name not in ("smoke", "demo", "local") or {e.script for e in entries} == set(
            SCRIPTS)
        assert all(datasets.is_local(d) for e in entries for d in e.datasets)
    assert {e.variant for e in SUITES["local"].entries} == {"cql", "sac", "qrdqn", "calql",
                                                            "cql-reward-x1"}


def test_local_runs_the_presets_as_a_newcomer_does():
    """Issue 22: `python cql_sac_continuous.py --env pendulum-<level>` (and CartPole's) is a
    local suite entry, so a newcomer's run compares with benchmark/results/local.md."""
    levels = {j.entry.env for j in suite_jobs("local", Path("/r"), seeds=1)
              if j.entry.script == CQL_SAC}
    assert levels == {f"pendulum-{lv}" for lv in suites.PENDULUM_LEVELS}
    for job in suite_jobs("local", Path("/r"), seeds=1):
        if job.entry.script == CALQL:
            continue  # the corridor run's flags are the README's Cal-QL command
        module = MODULES[job.entry.script]
        args, preset = vars(parse(job)), vars(module.preset_args(job.entry.env))
        changed = {k for k in args if args[k] != preset[k]} - {"run_dir", "progress"}
        assert changed == {"cql": set(), "sac": {"cql_weight"}, "qrdqn": {"cql_weight"},
                           "cql-reward-x1": {"reward_scale"}}[job.entry.variant], job.label


def test_claims_put_each_method_next_to_its_baseline():
    """Issue 18: every local Pendulum dataset, CQL and naive SAC at the paper's Polyak rate run
    longest, both at 0.05 beside them, >= 3 seeds each (a CI); reward x1 vs x0.1."""
    jobs = suite_jobs("claims", Path("/runs"))
    count = Counter((j.entry.env, j.entry.variant) for j in jobs if j.entry.script == CQL_SAC)
    for level in ("random", "medium", "expert", "medium-replay", "medium-expert"):
        for variant in ("cql", "sac", "cql-polyak5e-3", "sac-polyak5e-3"):
            assert count[(f"pendulum-{level}", variant)] >= 3
    args = {(j.entry.env, j.entry.variant): parse(j) for j in suite_jobs("claims", Path("/r"),
                                                                         seeds=1)}
    paper, preset = args[("pendulum-medium", "cql-polyak5e-3")], args[("pendulum-medium", "cql")]
    assert paper.soft_target_update == 5e-3 and preset.soft_target_update == 0.05
    # 200 and 300 target time constants, 20 evaluations each
    assert paper.total_steps * paper.soft_target_update >= 200
    assert preset.total_steps * preset.soft_target_update >= 300
    assert paper.total_steps // paper.eval_every >= 20 <= preset.total_steps // preset.eval_every
    x1 = args[("pendulum-random", "cql-reward-x1")]
    assert x1.reward_scale == 1.0 and args[("pendulum-random", "cql")].reward_scale == 0.1
    # only the named change differs between a variant and the preset's CQL
    for (env, variant), a in args.items():
        base = vars(args[(env, "cql")])
        changed = {k for k, v in vars(a).items() if v != base[k]} - {"run_dir"}
        assert changed == {"cql-polyak5e-3": {"soft_target_update", "total_steps",
                                              "eval_every"},
                           "sac-polyak5e-3": {"soft_target_update", "total_steps",
                                              "eval_every", "cql_weight"},
                           "cql": set(), "sac": {"cql_weight"},
                           "cql-reward-x1": {"reward_scale"}}[variant], variant


def test_demo_and_finetune_put_each_method_next_to_its_baseline():
    for suite in ("demo", "finetune", "umaze-finetune"):
        pairs: dict[str, dict[str, object]] = {}  # side condition -> method -> args
        for job in suite_jobs(suite, Path("/runs"), seeds=1):
            args = parse(job)
            if job.entry.script == CQL_SAC and job.entry.variant in ("cql", "sac"):
                assert args.cql_weight == (0.0 if job.entry.variant == "sac" else 5.0)
            if job.entry.script == CALQL:  # the paper's protocol: only the flag differs
                method = "calql" if job.entry.variant.startswith("calql") else "cql"
                pairs.setdefault(job.entry.variant.removeprefix(method), {})[method] = args
        assert pairs
        for pair in pairs.values():
            calql, cql = pair["calql"], pair["cql"]
            assert calql.enable_calql and not cql.enable_calql
            assert {k for k in vars(calql) if getattr(calql, k) != getattr(cql, k)} == {
                "enable_calql", "run_dir"}
    scripts = {j.entry.script for j in suite_jobs("demo", Path("/runs"))}
    assert scripts == set(SCRIPTS) and SUITES["demo"].seeds == 1


def test_paper_suites_use_the_scripts_datasets_and_known_references():
    for name in ("d4rl-gym", "antmaze", "adroit-binary"):
        for entry in SUITES[name].entries:
            preset_id = MODULES[entry.script].ENV_PRESETS[entry.env][0]
            assert entry.datasets == (preset_id,), entry
            assert entry.args in ((), ("--no-enable-calql",)), "paper suites: presets only"
    for name in SUITES:
        for entry in SUITES[name].entries:
            assert entry.reference is None or entry.reference in REFERENCES, entry.reference
    refs = {e.reference for e in SUITES["atari-1pct"].entries}
    assert len(refs) == 10 and REFERENCES["cql-1pct/pong"]["paper"] == 19.3
    assert REFERENCES["qrdqn-10pct/breakout"]["paper"] == 151.2
    assert REFERENCES["cql-sac/hopper-medium"] == {"paper": 58.0, "reimpl": 59.1}


def test_atari_suites_pass_the_paper_data_fraction():
    for name, fraction, alpha in (("atari-1pct", 0.01, 4.0), ("atari-10pct", 0.1, 1.0)):
        jobs = suite_jobs(name, Path("/runs"), seeds=1, data_root="/data")
        for job in jobs:
            args = parse(job)
            assert args.data_fraction == fraction and args.dqn_replay_dir.startswith("/data/")
            assert args.cql_weight == (alpha if job.entry.variant == "cql" else 0.0)
            assert args.num_quantiles == 200 and args.batch_size == 32


def test_variants_change_what_they_claim():
    local = {(j.entry.script, j.entry.variant): parse(j)
             for j in suite_jobs("local", Path("/runs"), seeds=1)}
    assert local[(CQL_SAC, "sac")].cql_weight == 0 and local[(CQL_SAC, "cql")].cql_weight > 0
    assert local[(CQL_QRDQN, "qrdqn")].cql_weight == 0
    assert local[(CALQL, "calql")].enable_calql and not local[(CALQL, "cql")].enable_calql


def test_umaze_proposal_parses_and_differs_only_by_the_calibration_flag():
    parsed = {}
    umaze = suites.UMAZE_FINETUNE  # a proposal, not in SUITES yet
    for entry in umaze.entries:
        args = parse(suites.Job(umaze.name, entry, 0, Path("/runs") / entry.name))
        assert args.dataset_id == "local/pointmaze/umaze-v0" and args.horizon == 300
        assert all(datasets.is_local(d) for d in entry.datasets)
        parsed[entry.variant] = args
    calql, cql = parsed["calql-umaze"], parsed["cql-umaze"]
    assert calql.enable_calql and not cql.enable_calql and calql.offline_steps >= 10_000
    assert {k for k in vars(calql) if getattr(calql, k) != getattr(cql, k)} == {
        "enable_calql", "run_dir"}
