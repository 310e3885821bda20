"""cql_qrdqn_atari.py presets against the official values, typed here independently of the script,
and the command line: `--env X --help` prints the values that run, `--presets` the table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cql_qrdqn_atari as m

ROOT = Path(__file__).resolve().parents[1]

# Official values, each with where it is written. GIN = github.com/aviralkumar2907/CQL
# atari/batch_rl/fixed_replay/configs/quantile.gin; README = that repository's README.md.
GIN = "CQL atari/batch_rl/fixed_replay/configs/quantile.gin"
OFFICIAL_ATARI = {
    "batch_size": (32, f"{GIN}: WrappedFixedReplayBuffer.batch_size = 32"),
    "qf_lr": (0.00005, f"{GIN}: tf.train.AdamOptimizer.learning_rate = 0.00005"),
    "adam_eps": (0.0003125, f"{GIN}: tf.train.AdamOptimizer.epsilon = 0.0003125"),
    "gamma": (0.99, f"{GIN}: FixedReplayQuantileAgent.gamma = 0.99"),
    "num_quantiles": (200, f"{GIN}: FixedReplayQuantileAgent.num_atoms = 200"),
    "kappa": (1.0, "CQL atari/batch_rl/multi_head/quantile_agent.py: kappa=1.0"),
    # target_update_period = 8000 agent steps, update_period = 4 agent steps per gradient step
    "target_update_every": (8000 // 4, f"{GIN}: target_update_period = 8000, update_period = 4"),
    "eval_epsilon": (0.001, f"{GIN}: epsilon_eval = 0.001"),
    "max_episode_steps": (27000, f"{GIN}: FixedReplayRunner.max_steps_per_episode = 27000"),
    # README command: FixedReplayRunner.num_iterations=1000; an iteration is training_steps =
    # 250000 agent steps with a gradient step every update_period = 4 (dopamine _train_step)
    "total_steps": (1000 * 250000 // 4, "README: num_iterations=1000; GIN: training_steps = "
                                        "250000, update_period = 4"),
    "eval_every": (250000 // 4, "one iteration (GIN: training_steps = 250000 / 4)"),
    "noop_max": (0, "dopamine atari_lib.create_atari_environment: no NoopReset"),
    "clip_reward": (True, "dopamine dqn_agent: reward = np.clip(reward, -1, 1)"),
    "torso_padding": ("same", "dopamine NatureDQNNetwork, Keras Conv2D padding='same'"),
}
OFFICIAL_DQN_REPLAY = {
    # README: "For 1% data, use minq_weight=4.0 and for 10% data, use minq_weight=1.0"
    0.01: {"cql_weight": (4.0, "README"), "sticky_prob": (0.25, f"{GIN}: sticky_actions = True")},
    0.1: {"cql_weight": (1.0, "README"), "sticky_prob": (0.25, f"{GIN}: sticky_actions = True")},
}
# Minari atari/<game>/expert-v0: collected with repeat_action_probability 0 (dataset page)
MINARI_ATARI_STICKY = 0.0


@pytest.mark.parametrize("fraction", [0.01, 0.1])
def test_dqn_replay_presets_are_the_official_values(fraction):
    args = m.preset_args("breakout", dqn_replay_dir="/d/Breakout/1/replay_logs",
                         data_fraction=fraction)
    expected = {**OFFICIAL_ATARI, **OFFICIAL_DQN_REPLAY[fraction]}
    for field, (value, source) in expected.items():
        assert getattr(args, field) == value, f"{field}: {getattr(args, field)} != {source}"


def test_minari_atari_preset_evaluates_with_the_datas_sticky_setting():
    args = m.preset_args("breakout")
    assert args.dataset_id is None and args.sticky_prob == MINARI_ATARI_STICKY
    for field, (value, source) in OFFICIAL_ATARI.items():
        assert getattr(args, field) == value, f"{field}: {getattr(args, field)} != {source}"


def test_every_preset_value_has_a_source_and_is_what_preset_args_gives():
    for group, preset in m.PRESETS.items():
        for field, (_value, source) in preset.items():
            assert field in m.Args.__dataclass_fields__, (group, field)
            assert isinstance(source, str) and len(source) > 10, (group, field)
    vector = m.preset_args("cartpole-expert")
    for field, (value, _) in m.PRESETS["vector"].items():
        assert getattr(vector, field) == value, field
    assert vector.cql_weight == 1.0 and vector.hidden_dims == (128, 128)
    # the 1% weight up to 5% of the data, the 10% weight above
    replay = m.resolve_source("pong", dqn_replay_dir="d")
    assert m.preset_groups(replay, data_fraction=0.05)[-1] == "dqn-replay-1pct"
    assert m.preset_groups(replay, data_fraction=0.2)[-1] == "dqn-replay-10pct"


def test_args_defaults_are_plain_literals():
    """Booleans are plain bools (--flag/--no-flag); presets leave no None to fill later."""
    for f in m.Args.__dataclass_fields__.values():
        if "bool" in str(f.type):
            assert f.type == "bool", f.name
    args = m.preset_args("pong", dqn_replay_dir="d")
    optional = {"dataset_id", "threads", "run_dir", "wandb_entity", "resume"}  # None = documented
    assert {k for k, v in vars(args).items() if v is None} == optional


def test_parse_args_flags_override_the_preset():
    args = m.parse_args(["--env", "pong", "--dqn-replay-dir", "d", "--data-fraction", "0.1",
                         "--no-clip-reward", "--lagrange", "--no-progress", "--cql-weight", "2"])
    assert (args.cql_weight, args.clip_reward, args.lagrange, args.progress) == (2.0, False, True,
                                                                                 False)
    assert args.data_fraction == 0.1 and args.sticky_prob == 0.25
    with pytest.raises(SystemExit, match="error: --data-fraction must be in"):
        m.parse_args(["--env", "pong", "--dqn-replay-dir", "d", "--data-fraction", "2"])
    with pytest.raises(SystemExit, match="error: --env is required"):
        m.parse_args(["--seed", "1"])
    for flag, value in (("--total-steps", "-5"), ("--eval-episodes", "0"), ("--batch-size", "0"),
                        ("--eval-every", "0"), ("--qf-lr", "0"), ("--gamma", "1.5"),
                        ("--checkpoints", "a-b")):
        with pytest.raises(SystemExit, match=f"^error: {flag} must be"):
            m.parse_args(["--env", "pong", "--dqn-replay-dir", "d", flag, value])


def test_dataset_id_alone_picks_the_preset_from_the_datas_observations(local_dataset):
    """--dataset-id with no --env: vector observations -> the vector preset, frames -> Atari;
    --env is a label derived from the id."""
    vector = m.parse_args(["--dataset-id", local_dataset("cartpole-expert")])
    assert vector.env == "cartpole-expert-v0" and vector.num_quantiles == 50
    frames = m.parse_args(["--dataset-id", local_dataset("pong-random")])
    assert frames.env == "ale-pong-random-v0" and frames.num_quantiles == 200
    assert frames.sticky_prob == 0.25  # the data's own setting (minari-atari)


def run_cli(*argv):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, str(ROOT / "cql_qrdqn_atari.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)


def test_help_shows_the_values_that_will_run():
    r = run_cli("--env", "pong", "--dqn-replay-dir", "/d/Pong/1/replay_logs", "--data-fraction",
                "0.1", "--help")
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    for flag, value in (("--cql-weight", "1.0"), ("--total-steps", "62500000"),
                        ("--sticky-prob", "0.25"), ("--noop-max", "0"), ("--qf-lr", "5e-05"),
                        ("--num-quantiles", "200"), ("--clip-reward", "True")):
        assert flag in out and f"(default: {value})" in out.split(flag, 1)[1], flag
    r = run_cli("--env", "cartpole-expert", "--help")
    out = " ".join(r.stdout.split())
    assert "(default: 20000)" in out.split("--total-steps", 1)[1]
    assert "(default: 128 128)" in out.split("--hidden-dims", 1)[1]


def test_presets_prints_the_table_with_sources():
    r = run_cli("--presets")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("| preset | field | value | source |")
    assert "| dqn-replay-1pct | `cql_weight` | `4.0` | CQL README" in r.stdout
    assert "| atari | `total_steps` | `62500000` |" in r.stdout
    assert len([line for line in r.stdout.splitlines() if line.startswith("| ")]) == \
        1 + sum(len(p) for p in m.PRESETS.values())  # the header, then one row per value


def test_env_groups_are_the_groups_preset_groups_resolves(local_dataset):
    """ENV_GROUPS (the table the docs show) agrees with what preset_groups resolves from the data
    of each --env name: the paper's games, the local CartPole sets and the local Pong frames."""
    import minari

    assert set(m.PAPER_GAMES) | {"pong-random"} <= set(m.ENV_GROUPS)
    for env, groups in m.ENV_GROUPS.items():
        source = m.resolve_source(env)
        spec = None
        if source.dataset_id.startswith("local/"):
            spec = minari.load_dataset(local_dataset(env)).spec
        assert m.preset_groups(source, spec=spec) == groups, env
    assert m.GROUP_RULE in m.presets_markdown()


def test_an_unknown_env_gets_the_closest_names():
    with pytest.raises(SystemExit) as stop:
        m.parse_args(["--env", "cartpol-expert"])
    assert "unknown --env 'cartpol-expert' (did you mean cartpole-expert" in str(stop.value)
