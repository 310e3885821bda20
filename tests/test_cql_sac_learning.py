"""Learning check on local Pendulum data: the CQL paper's central claims (Table 4, Table 1).

On two datasets of different quality (pendulum-medium: the controller with 55 % random
actions; pendulum-medium-replay: a learning agent's buffer), CQL's predicted value of its
policy is a lower bound of the discounted return it obtains (value_gap <= 0), while the same
script with the CQL weight set to 0 (naive offline SAC) over-estimates its value by far and
scores far lower. The pendulum preset (64x64 networks, learning rates 1e-3, rewards x0.1,
Polyak rate 0.05), 3000 steps. `benchmark/results/claims.md` measures the same on all five
local Pendulum datasets over 5 seeds (value gap at the end <= 0 on 5 of 5 for CQL, naive SAC
above 0 on 4 of 5), and shows the condition under which the bound does not hold here: the
paper's Polyak rate 5e-3 with Eq. 4's data term.
"""

import json

import numpy as np
import pytest

import cql_sac_continuous as cql

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = dict(total_steps=3000, eval_every=1000, eval_episodes=5, progress=False, seed=0)
DATASETS = ("pendulum-medium", "pendulum-medium-replay")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, local_dataset):
    root = tmp_path_factory.mktemp("learning")
    out = {}
    for env in DATASETS:
        local_dataset(env)
        for name, weight in (("cql", 5.0), ("naive", 0.0)):
            run_dir = root / env / name
            args = cql.replace(cql.preset_args(env), **SETTINGS, cql_weight=weight,
                               run_dir=str(run_dir))
            summary = cql.main(args)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
            out[env, name] = dict(summary=summary, rows=rows)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("env", DATASETS)
def test_cql_value_is_a_lower_bound_and_the_policy_is_good(runs, env):
    cql_run = runs[env, "cql"]
    assert cql_run["summary"]["value_gap"] <= 0, cql_run["rows"]
    assert cql_run["summary"]["final_normalized_score"] >= 80, cql_run["rows"]


@pytest.mark.slow
@pytest.mark.parametrize("env", DATASETS)
def test_naive_offline_sac_overestimates_and_scores_lower(runs, env):
    naive, conservative = runs[env, "naive"], runs[env, "cql"]
    assert naive["summary"]["value_gap"] > 10.0, naive["rows"]  # predicted >> obtained
    scores = [r["summary"]["final_normalized_score"] for r in (naive, conservative)]
    assert scores[0] < scores[1] - 20, (naive["rows"], conservative["rows"])
    assert np.isfinite(scores).all()
