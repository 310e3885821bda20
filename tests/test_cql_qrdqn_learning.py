"""CQL-QR-DQN learning check on local CartPole data: CQL against plain offline QR-DQN (CQL
paper, Sec. 6 / Table 3, in small). A regression check of what the local suite measures over
seeds (benchmark/results/local.md), on one seed."""

import dataclasses

import pytest

import cql_qrdqn_atari as m


def args_for(env, **overrides):
    """The env's preset with overrides."""
    return dataclasses.replace(m.preset_args(env), **overrides)


@pytest.mark.slow
def test_cql_beats_plain_qrdqn_on_narrow_cartpole_data(tmp_path, local_dataset):
    """Expert CartPole data (balancing controller, 10% random actions): CQL reaches near-expert
    return; plain offline QR-DQN (CQL weight 0) overestimates the rare actions and fails."""
    local_dataset("cartpole-expert")
    kw = dict(env="cartpole-expert", total_steps=4000, eval_every=4000, eval_episodes=5,
              progress=False)
    cql = m.main(args_for(run_dir=str(tmp_path / "cql"), **kw))
    plain = m.main(args_for(run_dir=str(tmp_path / "plain"), cql_weight=0.0, **kw))
    print(f"CQL normalized {cql['final_score']:.1f} (return {cql['final_return']}), "
          f"CQL weight 0: {plain['final_score']:.1f} ({plain['final_return']})")
    assert cql["final_score"] >= 90.0
    assert plain["final_score"] <= cql["final_score"] - 40.0
