"""Cal-QL presets against an independent table of the official values (issue 9), the
command line (`--env X --help` shows literal values, `--presets`, `--no-enable-calql`)."""

import json
import math
import re
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import pytest
import torch
from conftest import help_default, help_entries

import calql_finetune as calql

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "calql_finetune.py")

# ---- the official values, typed here independently of the script --------------------------
# Sources (github.com/nakamotoo/Cal-QL, commit ac6eafe):
#   run_adroit.sh: --cql_min_q_weight=1.0 --policy_arch=512-512 --qf_arch=512-512-512
#     --offline_eval_every_n_epoch=2 --online_eval_every_n_env_steps=2000 --eval_n_trajs=20
#     --n_train_step_per_epoch_offline=1000 --n_pretrain_epochs=20 --mixing_ratio=0.5
#     --reward_scale=10.0 --reward_bias=5.0 --enable_calql=True;
#     max_online_env_steps 2e5 (pen), 1e6 (door, relocate)
#   run_antmaze.sh: --cql_min_q_weight=5.0 --cql.cql_target_action_gap=0.8
#     --cql.cql_lagrange=True --policy_arch=256-256 --qf_arch=256-256-256-256
#     --offline_eval_every_n_epoch=50 --online_eval_every_n_env_steps=2000 --eval_n_trajs=20
#     --n_train_step_per_epoch_offline=1000 --n_pretrain_epochs=1000
#     --max_online_env_steps=1e6 --mixing_ratio=0.5 --reward_scale=10.0 --reward_bias=-5
#   JaxCQL/conservative_sac.py get_default_config: discount 0.99, policy_lr 1e-4, qf_lr 3e-4,
#     soft_target_update_rate 5e-3, cql_n_actions 10, cql_importance_sample True, cql_temp
#     1.0, cql_max_target_backup True, clip_diff -inf/inf, backup_entropy False,
#     cql_target_action_gap 1.0, cql_lagrange False; log_alpha_prime = Scalar(1.0)
#     (optimizer lr qf_lr). CORL algorithms/finetune/cal_ql.py: log_alpha_prime Scalar(1.0).
#   JaxCQL/model.py TanhGaussianPolicy: log_std_multiplier 1.0 and log_std_offset -1.0 as
#     learnable `Scalar`s; jnp.clip(log_std, -20.0, 2.0), no mean clamp (L121, L134).
#   JaxCQL/conservative_sac.py L176-186: max backup = min over critics, then max over actions.
#   JaxCQL/conservative_sac_main.py FLAGS: batch_size 256, orthogonal_init True,
#     online_utd_ratio 1, cql_min_q_weight_online -1 (= unchanged); evaluation at epoch 0.
#   JaxCQL/replay_buffer.py ENV_CONFIG: adroit-binary reward_neg -1, antmaze reward_neg 0;
#     sparse-reward MC rule for both.
#   nakamotoo/mj_envs: pen-binary-v0 max_episode_steps=100, door/relocate-binary-v0 200.
#   D4RL d4rl/locomotion/__init__.py: antmaze-umaze(-diverse)-v2 700 steps, others 1000.
SHARED = dict(gamma=0.99, policy_lr=1e-4, qf_lr=3e-4, soft_target_update=5e-3,
              cql_n_actions=10, cql_importance_sample=True, cql_temp=1.0, max_backup=True,
              cql_clip_diff_min=-math.inf, cql_clip_diff_max=math.inf, backup_entropy=False,
              alpha_prime_lr=3e-4, log_alpha_prime_init=1.0, batch_size=256,
              init="orthogonal", utd=1, cql_weight_online=None, mixing_ratio=0.5,
              enable_calql=True, bc_steps=0, target_entropy=None, log_std_affine=True,
              log_std_min=-20.0, log_std_max=2.0, mean_clamp=None, max_backup_form="calql")
ADROIT = dict(SHARED, offline_steps=20 * 1000, offline_eval_every=2 * 1000, eval_every=2000,
              eval_episodes=20, actor_hidden_dims=(512, 512),
              critic_hidden_dims=(512, 512, 512), cql_weight=1.0, lagrange=False,
              cql_tau=1.0, reward_scale=10.0, reward_bias=5.0, reward_neg=-1.0,
              sparse_reward=True, binary=True, goal_terminals=False)
ANTMAZE = dict(SHARED, offline_steps=1000 * 1000, offline_eval_every=50 * 1000,
               eval_every=2000, eval_episodes=20, online_steps=1_000_000,
               actor_hidden_dims=(256, 256), critic_hidden_dims=(256, 256, 256, 256),
               cql_weight=5.0, lagrange=True, cql_tau=0.8, reward_scale=10.0,
               reward_bias=-5.0, reward_neg=0.0, sparse_reward=True, binary=False,
               goal_terminals=True)
OFFICIAL = {
    "pen-binary": dict(ADROIT, dataset_id="D4RL/pen/cloned-v2", online_steps=200_000,
                       horizon=100),
    "door-binary": dict(ADROIT, dataset_id="D4RL/door/cloned-v2", online_steps=1_000_000,
                        horizon=200),
    "relocate-binary": dict(ADROIT, dataset_id="D4RL/relocate/cloned-v2",
                            online_steps=1_000_000, horizon=200),
    **{f"antmaze-{m}": dict(ANTMAZE, dataset_id=f"D4RL/antmaze/{m}-v1", horizon=steps)
       for m, steps in (("umaze", 700), ("umaze-diverse", 700), ("medium-play", 1000),
                        ("medium-diverse", 1000), ("large-play", 1000),
                        ("large-diverse", 1000))},
    # Not a paper task: the project's local CPU task (Adroit settings, small and short).
    "pointmaze-binary": dict(ADROIT, dataset_id="local/pointmaze/sparse-v0",
                             offline_steps=2000, online_steps=3000, offline_eval_every=1000,
                             eval_every=1000, eval_episodes=10, actor_hidden_dims=(64, 64),
                             critic_hidden_dims=(64, 64), horizon=100),
}
# Fields that are run settings, not hyperparameters of a preset.
RUN_FIELDS = {"env", "seed", "device", "run_dir", "hidden_dims", "normalize_states", "tf32",
              "log_every", "max_abs_q", "compile", "cudagraphs", "resume", "track",
              "wandb_project", "wandb_entity", "progress", "capture_video", "threads"}


def test_every_env_has_an_official_row():
    assert set(calql.ENV_PRESETS) == set(OFFICIAL)


@pytest.mark.parametrize("env", sorted(OFFICIAL))
def test_preset_values_are_the_official_ones(env):
    args = calql.preset_args(env)
    want = OFFICIAL[env]
    for name, value in want.items():
        assert getattr(args, name) == value, (env, name, getattr(args, name), value)
    # every hyperparameter field is pinned by the table above
    missing = {f.name for f in fields(args)} - RUN_FIELDS - set(want)
    assert not missing, missing
    # and every value the preset sets has a source
    sourced = calql.preset_values(env)
    assert set(sourced) >= set(calql.ENV_PRESETS[env][1])
    assert all(source.strip() for _, source in sourced.values())


def test_dataset_id_alone_picks_the_preset_naming_it_else_the_generic_preset():
    assert calql.parse_args(["--dataset-id", "D4RL/door/cloned-v2"]) == calql.preset_args(
        "door-binary")
    args = calql.parse_args(["--dataset-id", "mujoco/hopper/medium-v0"])
    assert args.env == "hopper-medium-v0" and args.dataset_id == "mujoco/hopper/medium-v0"
    assert args == calql.preset_args("hopper-medium-v0", "mujoco/hopper/medium-v0")
    # rewards as recorded (no relabelling, dense MC returns); Adroit's schedule otherwise
    assert (args.binary, args.goal_terminals, args.sparse_reward) == (False, False, False)
    assert (args.reward_scale, args.reward_bias, args.horizon) == (1.0, 0.0, None)
    assert args.offline_steps == 20_000 and args.actor_hidden_dims == (512, 512)
    with pytest.raises(SystemExit, match="unknown --env 'hopper-medium-v0'"):
        calql.preset_args("hopper-medium-v0")  # the generic name goes with its dataset


def test_dataset_id_alone_runs_on_a_dense_dataset(twin, tmp_path):
    """A dataset without a Cal-QL preset (the hopper twin: dense rewards, no success
    infos): the generic preset, evaluated in the data's env with its own episode limit."""
    ds = twin("mujoco/hopper/medium-v0")
    args = replace(calql.parse_args(["--dataset-id", ds]), run_dir=str(tmp_path / "run"),
                   actor_hidden_dims=(8,), critic_hidden_dims=(8,), batch_size=16,
                   cql_n_actions=2, eval_episodes=1, offline_steps=4, offline_eval_every=2,
                   online_steps=5, eval_every=5, log_every=2, progress=False)
    summary = calql.main(args)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["args"]["env"] == "hopper-medium-v0" and config["args"]["horizon"] is None
    assert config["eval_env"]["max_episode_steps"] == config["dataset"]["horizon"] > 0
    assert summary["env_steps"] >= 5 and summary["final_success_rate"] is None


def test_defaults_are_the_pen_preset_and_dataset_id_overrides():
    assert calql.Args() == calql.preset_args("pen-binary")
    args = calql.preset_args("pen-binary", "D4RL/pen/human-v2")
    assert args.dataset_id == "D4RL/pen/human-v2" and args.horizon == 100


def test_initial_alpha_prime_is_e():
    args = replace(calql.preset_args("antmaze-umaze"), actor_hidden_dims=(8,),
                   critic_hidden_dims=(8,))
    agent = calql.Agent(3, 2, args)
    assert agent.log_alpha_prime.item() == 1.0
    gap = torch.tensor([2.0, 2.0])
    _, _, alpha_prime = calql.lagrange_terms(gap, agent.log_alpha_prime, 5.0, 0.8, "calql")
    assert float(alpha_prime) == pytest.approx(math.e)


def test_no_enable_calql_and_other_flags_parse():
    assert calql.parse_args(["--env", "pen-binary", "--no-enable-calql"]).enable_calql is False
    args = calql.parse_args(["--env", "antmaze-umaze", "--no-lagrange", "--actor-hidden-dims",
                             "32", "32", "--critic-hidden-dims", "8"])
    assert args.lagrange is False and args.cql_weight == 5.0 and args.horizon == 700
    assert args.actor_hidden_dims == (32, 32) and args.critic_hidden_dims == (8,)
    assert not hasattr(args, "hidden_dims")  # removed (issue 16): one flag per network
    with pytest.raises(SystemExit):
        calql.parse_args(["--env", "pen-binary", "--enable-calql", "False"])  # old README form


@pytest.mark.parametrize("argv, message", [
    (["--env", "pen-humn"], "unknown --env 'pen-humn'"),
    (["--env", "pen-human"], "Cal-QL runs pen as its binary task: use --env pen-binary"),
    (["--env", "hopper-binary", "--help"], "hopper is a dense-reward task"),
    (["--env", "pen-binary", "--mixing-ratio", "2"], "must be in [0, 1]"),
])
def test_bad_command_lines_give_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as exc:
        calql.parse_args(argv)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def help_defaults(env: str) -> dict[str, str]:
    """`--env X --help` -> {flag without `--`: printed default}."""
    proc = subprocess.run([sys.executable, SCRIPT, "--env", env, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {flag[2:]: help_default(entry) for flag, entry in help_entries(proc.stdout).items()
            if "(default: " in entry}


@pytest.mark.parametrize("env", ["antmaze-medium-play", "door-binary"])
def test_help_shows_the_values_that_will_run(env):
    shown = help_defaults(env)
    args = calql.preset_args(env)
    optional = {"run-dir", "target-entropy", "cql-weight-online", "resume", "wandb-entity",
                "mean-clamp", "threads"}  # documented: None = derived at run time / not set
    for f in fields(args):
        flag = f.name.replace("_", "-")
        value = getattr(args, f.name)
        assert flag in shown, (flag, sorted(shown))
        if flag in optional:
            continue
        assert shown[flag] != "None", flag
        if isinstance(value, tuple):
            assert shown[flag] == " ".join(map(str, value)), flag
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert float(shown[flag]) == float(value), flag
        else:
            assert shown[flag] == str(value), flag


def test_presets_table_runs_and_has_a_source_per_value():
    proc = subprocess.run([sys.executable, SCRIPT, "--presets"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    cells = [re.split(r"(?<!\\)\|", row)[1:-1] for row in rows]
    assert all(len(c) == 4 and c[3].strip() for c in cells), rows
    table = {(c[0].strip(), c[1].strip().strip("`")): c[2].strip() for c in cells}
    assert table[("antmaze", "cql_tau")] == "0.8"
    assert table[("pen-binary", "online_steps")] == "200000"
    assert "300k" in next(r for r in rows if "pen-binary" in r and "online_steps" in r)
    assert table[("all (Args defaults)", "log_alpha_prime_init")] == "1.0"
    assert table[("adroit-binary", "offline_eval_every")] == "2000"


# ---- Cal-QL's own actor, init and max backup (JaxCQL/model.py, conservative_sac.py) --------


def test_calql_keeps_its_own_actor_init_and_max_backup_form():
    args = calql.Args()
    # model.py TanhGaussianPolicy: jnp.clip(log_std, -20.0, 2.0), no mean clamp (L121, L134)
    assert (args.log_std_min, args.log_std_max, args.mean_clamp) == (-20.0, 2.0, None)
    assert args.init == "orthogonal"  # conservative_sac_main.py orthogonal_init=True
    assert args.max_backup_form == "calql"  # conservative_sac.py: min over critics, then max
    assert "model.py" in calql.preset_values("pen-binary")["log_std_min"][1]


# ---- D4RL's Adroit horizon for any Adroit dataset (issue 17, bug 2) -----------------------


@pytest.mark.parametrize("env_id, ds_id, steps", [
    ("AdroitHandPen-v1", "D4RL/pen/human-v2", 100), ("AdroitHandPen-v1", "D4RL/pen/expert-v2", 100),
    ("AdroitHandDoor-v1", "D4RL/door/human-v2", 200), ("Pendulum-v1", "x/pendulum/y-v0", 200)])
def test_dataset_id_alone_evaluates_adroit_on_d4rls_horizon(env_id, ds_id, steps):
    """D4RL's reference scores (kept: dense returns) are measured on 100-step pen episodes
    (d4rl/hand_manipulation_suite/__init__.py); Minari's spec says 200 for every task."""
    spec = gym.envs.registration.EnvSpec(id=env_id, entry_point="x:y", max_episode_steps=200)
    dataset = SimpleNamespace(env_spec=spec, storage=SimpleNamespace(metadata={}))
    args = calql.parse_args(["--dataset-id", ds_id])
    assert args.horizon is None and not args.binary  # the generic preset: refs kept (dense)
    description = calql.eval_env_description(dataset, args)
    assert description["max_episode_steps"] == steps
    assert calql.d4rl_adroit_horizon(env_id) == (None if env_id == "Pendulum-v1" else steps)
    if env_id.startswith("Adroit"):  # CQL-SAC's adroit family gives the same horizon
        import cql_sac_continuous as cql
        assert cql.adroit_eval_spec(spec, None).max_episode_steps == steps
