"""Learning check on a local Pendulum dataset: the paper's central claims (Table 4, Table 1).

On narrow, expert-only data, CQL learns a near-expert policy whose predicted value is a lower
bound of its true return (value_gap <= 0), while the same script with the CQL weight set to 0
(naive offline SAC) over-estimates its value and scores clearly lower. Small networks and
larger learning rates (the pendulum preset) make this a two-minute CPU check.
"""

import json

import numpy as np
import pytest

import cql_sac_continuous as cql

# The pendulum preset (64x64 networks, learning rates 1e-3, rewards x0.1), 3000 steps.
SETTINGS = dict(total_steps=3000, log_every=500, progress=False, seed=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, local_dataset):
    local_dataset("pendulum-expert")
    root = tmp_path_factory.mktemp("learning")
    out = {}
    for name, weight in (("cql", 5.0), ("naive", 0.0)):
        args = cql.replace(cql.preset_args("pendulum-expert"), **SETTINGS, cql_weight=weight,
                           run_dir=str(root / name))
        summary = cql.main(args)
        rows = [json.loads(line) for line in (root / name / "metrics.jsonl").open()]
        out[name] = dict(summary=summary, rows=rows,
                         late_score=float(np.mean([r["normalized_score"] for r in rows[-3:]])))
    return out


@pytest.mark.slow
def test_cql_reaches_expert_level_and_is_conservative(runs):
    summary = runs["cql"]["summary"]
    assert summary["final_normalized_score"] >= 80, runs["cql"]["rows"]
    assert summary["value_gap"] <= 0, runs["cql"]["rows"]


@pytest.mark.slow
def test_naive_offline_sac_overestimates_and_scores_lower(runs):
    naive, conservative = runs["naive"], runs["cql"]
    assert naive["late_score"] < conservative["late_score"] - 20, (naive["rows"],
                                                                   conservative["rows"])
    assert naive["summary"]["value_gap"] > 0, naive["rows"]  # predicted > obtained
    assert naive["summary"]["value_gap"] > conservative["summary"]["value_gap"]
