"""After training (issue 21), all three scripts: --evaluate equals the run's own final
evaluation and writes only under evaluations/; --capture-video frames counted against the
episode; the exported policy's actions equal the script's; the Hub folder and model card
exactly as uploaded, the upload and hf:// download through huggingface_hub's own API; W&B
with the real client, offline."""

import hashlib
import json
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCRIPTS, one_line_error, read_json, read_metrics, run_script

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json")


@pytest.fixture(scope="module", params=sorted(SCRIPTS))
def finished(request, tmp_path_factory, local_dataset):
    """A tiny finished run of each script."""
    script = SCRIPTS[request.param]
    local_dataset(script.dataset)
    run_dir = tmp_path_factory.mktemp(script.key) / "run"
    out = run_script(script.path, *script.args(run_dir))
    assert out.returncode == 0, out.stderr[-2000:]
    return script, run_dir


def after(script, *argv: str) -> None:
    """The after-training command line, in this process (cli's dispatch without the imports)."""
    module = script.module
    module.after_training(module.after_training_args(list(argv)))


def after_error(script, *argv: str) -> str:
    """The one-line error an after-training command stops with, in this process."""
    with pytest.raises(SystemExit) as stop:
        after(script, *argv)
    assert isinstance(stop.value.code, str) and "\n" not in stop.value.code, stop.value.code
    return one_line_error(stop.value.code)


def digests(run_dir: Path) -> dict[str, str]:
    return {n: hashlib.sha256((run_dir / n).read_bytes()).hexdigest() for n in RUN_FILES}


def frames(path: Path) -> int:
    """The frames in an mp4, each decoded (imageio's ffmpeg reader)."""
    import imageio.v3 as iio

    return sum(1 for _ in iio.imiter(path, plugin="FFMPEG"))


def test_evaluate_equals_the_final_evaluation_and_writes_nothing_else(finished):
    script, run_dir = finished
    before, last = digests(run_dir), read_metrics(run_dir)[-1]
    out = run_script(script.path, "--evaluate", str(run_dir))
    assert out.returncode == 0, out.stderr[-2000:]
    config = read_json(run_dir / "config.json")["args"]
    name = f"step{last['step']}-seed{config['seed']}-episodes{config['eval_episodes']}"
    result = read_json(run_dir / "evaluations" / f"{name}.json")
    for key in ("score", "return_mean", "value_gap", "value_gap_return", "success_rate",
                "episode_length"):
        assert result.get(key) == last.get(key), key  # the same episodes, bit for bit
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"evaluated {run_dir} at step {last['step']}") and name in line
    assert f"score {last['score']:.4g}" in line
    assert digests(run_dir) == before  # the training files are untouched
    after(script, "--evaluate", str(run_dir), "--seed", "7", "--eval-episodes", "2")
    other = read_json(run_dir / "evaluations" / f"step{last['step']}-seed7-episodes2.json")
    assert other["seed"] == 7 and other["eval_episodes"] == 2


def test_capture_video_counts_a_frame_per_step(finished):
    """Pendulum and CartPole render in CI (classic control); PointMaze is MuJoCo: EGL. Two
    episodes, two videos; Cal-QL's one (EGL renders in software on a CPU machine, 32 ms a
    frame, 460 frames an episode; the video writer is Part III's, the same in all three)."""
    script, run_dir = finished
    env = {"MUJOCO_GL": "egl"} if script.key == "calql" else None
    episodes = 1 if script.key == "calql" else 2
    out = run_script(script.path, "--evaluate", str(run_dir), "--capture-video",
                     "--eval-episodes", str(episodes), env=env)
    if script.key == "calql" and out.returncode != 0:  # MuJoCo needs an OpenGL back end
        assert "cannot render" in one_line_error(out.stderr) and "MUJOCO_GL" in out.stderr
        pytest.skip("no OpenGL back end for MuJoCo here: " + one_line_error(out.stderr))
    assert out.returncode == 0, out.stderr[-2000:]
    step = read_metrics(run_dir)[-1]["step"]
    seed = read_json(run_dir / "config.json")["args"]["seed"]
    name = f"step{step}-seed{seed}-episodes{episodes}"
    videos = sorted((run_dir / "videos" / name).glob("*.mp4"))
    assert len(videos) == episodes
    result = read_json(run_dir / "evaluations" / f"{name}.json")
    # the reset frame and one per step, the whole rollout (value_gap_steps: the mean length)
    counts = [frames(v) for v in videos]
    assert np.mean(counts) == result["value_gap_steps"] + 1, counts


def test_training_with_capture_video_records_its_final_evaluation(tmp_path, local_dataset):
    script = SCRIPTS["cql_sac"]
    local_dataset(script.dataset)
    run_dir = tmp_path / "run"
    out = run_script(script.path, *script.args(run_dir, "--capture-video", total_steps="100"))
    assert out.returncode == 0, out.stderr[-2000:]
    last = read_metrics(run_dir)[-1]
    (video,) = (run_dir / "videos").glob("step100-*/*.mp4")
    assert frames(video) == last["value_gap_steps"] + 1  # as above
    (evaluation,) = (run_dir / "evaluations").glob("*.json")
    assert read_json(evaluation)["score"] == last["score"]


def test_the_recorder_writes_the_reset_frame_and_one_per_step(tmp_path):
    """Part III's recorder, alone: one file per reset; an episode ends at its truncation (no
    frames after it), the next reset or close; frames kept exactly, at render_fps."""
    import gymnasium as gym
    import imageio.v3 as iio

    from cql_sac_continuous import record_video

    env = record_video(gym.make("Pendulum-v1", render_mode="rgb_array", max_episode_steps=7),
                       tmp_path / "videos", "eval")
    env.reset(seed=1)
    for _ in range(7):
        *_, truncated, _ = env.step(env.action_space.sample())
    assert truncated
    env.step(env.action_space.sample())  # past the episode's end: not recorded
    env.reset(seed=2)
    env.step(env.action_space.sample())
    env.reset(seed=3)  # ends episode 1 early
    for _ in range(2):
        env.step(env.action_space.sample())
    env.close()  # ends episode 2
    names = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert names == [f"eval-episode-{k}.mp4" for k in range(3)]
    counts = [frames(tmp_path / "videos" / n) for n in names]
    assert counts == [8, 2, 3]
    props = iio.improps(tmp_path / "videos" / names[0], plugin="FFMPEG")
    meta = iio.immeta(tmp_path / "videos" / names[0], plugin="FFMPEG")
    assert props.shape[1:] == (500, 500, 3) and meta["fps"] == 30  # Pendulum's render_fps


def script_actions(script, run_dir: Path, obs: np.ndarray) -> np.ndarray:
    """What the script's evaluation does with these observations, from the checkpoint."""
    module = script.module
    config = read_json(run_dir / "config.json")
    args = module.saved_args(config, run_dir)
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    if script.key == "qrdqn":
        n_actions = module.make_eval_env(config["eval_env"]).action_space.n
        agent = module.Agent(tuple(obs.shape[1:]), n_actions, args)
        agent.load_state_dict(state["parts"]["agent"])
        with torch.no_grad():
            return agent.q(torch.as_tensor(obs)).mean(dim=2).argmax(dim=1).numpy()
    data = module.load_data(args)
    agent = module.Agent(data.info["obs_dim"], data.info["action_dim"], args)
    agent.load_state_dict(state["parts"]["agent"])
    x = torch.as_tensor(data.tf.obs(obs))
    return data.tf.to_env_action(agent.actor.act_deterministic(x).numpy())


def test_exported_policy_gives_the_scripts_actions_without_the_script(finished):
    script, run_dir = finished
    after(script, "--export-policy", str(run_dir))
    path = run_dir / "policy.pt2"
    assert path.is_file()
    space = script.module.make_eval_env(read_json(run_dir / "config.json")["eval_env"]
                                        ).observation_space
    space.seed(3)
    flat = getattr(script.module, "flatten_obs", np.asarray)  # PointMaze: a Dict space
    obs = np.stack([flat(space.sample()) for _ in range(64)]).astype(np.float32)
    policy = torch.export.load(str(path)).module()  # only torch: no script, no class of it
    exported = policy(torch.as_tensor(obs)).numpy()
    expected = script_actions(script, run_dir, obs)
    if script.key == "qrdqn":
        assert (exported == expected).all()
    else:
        np.testing.assert_allclose(exported, expected, rtol=0, atol=1e-5)
    assert policy(torch.as_tensor(obs[:1])).shape[0] == 1  # any batch size


def test_after_training_bad_inputs_are_one_line(finished, tmp_path):
    script, run_dir = finished
    other = next(s for s in SCRIPTS.values() if s.key != script.key)
    cases = {
        (str(tmp_path / "nowhere"),): "is not a run directory",
        (str(tmp_path),): "is not a run directory",
    }
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    cases[(str(broken),)] = "is damaged"
    for argv, expected in cases.items():
        assert expected in after_error(script, "--evaluate", *argv)
    out = run_script(other.path, "--evaluate", str(run_dir))  # the command line, once
    assert out.returncode == 1
    assert f"is a run of {script.file}, not of {other.file}" in one_line_error(out.stderr)
    for argv in (("--evaluate",), ("--push-to-hub", "user/repo"),
                 ("--evaluate", str(run_dir), "--eval-episodes", "two")):
        assert "after training: --evaluate" in after_error(script, *argv)


def test_hub_folder_and_model_card_as_uploaded(finished, tmp_path):
    from huggingface_hub import ModelCard

    script, run_dir = finished
    folder = tmp_path / "hub"
    after(script, "--push-to-hub", "someone/cql-test", str(run_dir), "--hub-folder", str(folder))
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {*RUN_FILES, "policy.pt2", "README.md", "curve.png"} <= names
    for name in RUN_FILES:
        assert (folder / name).read_bytes() == (run_dir / name).read_bytes()
    config, summary = read_json(run_dir / "config.json"), read_json(run_dir / "summary.json")
    card = ModelCard((folder / "README.md").read_text())  # the Hub client's own parser
    meta = card.data.to_dict()
    assert meta["library_name"] == "pytorch"
    assert {"reinforcement-learning", "offline-reinforcement-learning",
            Path(script.file).stem} <= set(meta["tags"])
    (result,) = card.data.eval_results
    data = config["dataset"]
    assert result.dataset_name == (data.get("dataset_id") or data.get("source"))
    assert result.metric_value == round(summary["final_score"], 2)
    assert f"- value gap: {summary['value_gap']} (return units: " \
        f"{summary['value_gap_return']})" in card.text
    assert config["command"] in card.text and "git commit" in card.text
    assert "--evaluate hf://someone/cql-test" in card.text
    assert all(f"{k} {v}" in card.text for k, v in config["versions"].items())
    assert (folder / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_push_and_download_go_through_the_hub_client(finished, tmp_path, monkeypatch):
    """The upload's calls as huggingface_hub receives them (the Hub is not reachable here),
    then `--evaluate hf://REPO` on what was uploaded."""
    import huggingface_hub

    script, run_dir = finished
    module, hub, calls = script.module, tmp_path / "hub", []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))

    def upload_folder(self, *, folder_path, repo_id, **kw):
        calls.append(("upload", repo_id, kw))
        shutil.copytree(folder_path, hub)

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    module.push_to_hub("someone/cql-test", run_dir, None)
    assert [c[:2] for c in calls] == [("create", "someone/cql-test"),
                                      ("upload", "someone/cql-test")]
    assert calls[0][2] == {"exist_ok": True} and (hub / "README.md").is_file()

    def snapshot_download(repo_id, local_dir):
        assert repo_id == "someone/cql-test"
        shutil.copytree(hub, local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    module.after_training(Namespace(push_to_hub=None, export_policy=None, seed=None,
                                    evaluate="hf://someone/cql-test", capture_video=False,
                                    eval_episodes=None, device=None))
    last, seed = read_metrics(run_dir)[-1], read_json(run_dir / "config.json")["args"]["seed"]
    episodes = read_json(run_dir / "config.json")["args"]["eval_episodes"]
    result = (tmp_path / "runs" / "hf" / "someone" / "cql-test" / "evaluations"
              / f"step{last['step']}-seed{seed}-episodes{episodes}.json")
    assert read_json(result)["score"] == last["score"]


def test_track_with_the_real_wandb_client_offline(finished, tmp_path):
    """The real client in offline mode: its run file holds the config, the evaluation
    metrics and the final score (wandb 0.31 writes one protobuf log, run-<id>.wandb, whose
    records carry keys and JSON values as text)."""
    script, _ = finished
    run_dir = tmp_path / "tracked"
    out = run_script(script.path, *script.args(run_dir, "--track"),
                     env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr[-2000:]
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = log.read_bytes()
    env = read_json(run_dir / "config.json")["args"]["env"]
    final = read_json(run_dir / "summary.json")["final_score"]
    for text in (f'"{env}"', "eval/score", "eval/wall_time_s", "final_score", json.dumps(final)):
        assert text.encode() in data, text
