"""benchmark/gif.py, the README's picture: the README's own command, run on a tiny video
that the scripts' recorder (--capture-video) wrote."""

import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from benchmark import gif
from cql_sac_continuous import record_video

ROOT = Path(__file__).resolve().parents[1]
STEPS = 9  # the tiny episode: 10 frames with the reset frame


def readme_gif_command() -> list[str]:
    (line,) = re.findall(r"^python benchmark/gif\.py .*$", (ROOT / "README.md").read_text(),
                         flags=re.M)
    return shlex.split(line)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    env = record_video(gym.make("Pendulum-v1", render_mode="rgb_array",
                                max_episode_steps=STEPS), folder, "eval")
    env.reset(seed=0)
    for _ in range(STEPS):
        env.step(env.action_space.sample())
    env.close()
    return folder / "eval-episode-0.mp4"


def test_the_readme_command_makes_the_gif(video, tmp_path):
    words = readme_gif_command()  # python benchmark/gif.py VIDEO OUT --option value ...
    assert words[3] == "docs/pendulum.gif" and words[2].endswith(".mp4")
    out = tmp_path / "pendulum.gif"
    argv = [words[1], str(video), str(out), *words[4:]]
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    every = int(words[words.index("--every") + 1])
    width = int(words[words.index("--width") + 1])
    max_frames = int(words[words.index("--max-frames") + 1])
    image = Image.open(out)
    assert image.n_frames == math.ceil(min(STEPS + 1, max_frames) / every)
    assert image.size == (width, width)  # Pendulum's frames are square
    assert image.info["duration"] == 10 * round(100 * every / 30)  # the video's 30 fps
    first = np.asarray(image.convert("RGB"), np.float64)
    expected = np.asarray(Image.fromarray(next(iio.imiter(video, plugin="FFMPEG"))).resize(
        (width, width), Image.Resampling.LANCZOS), np.float64)
    assert np.abs(first - expected).mean() < 4  # the video's first frame (GIF palette aside)


def test_max_frames_and_every(video, tmp_path):
    out = tmp_path / "short.gif"
    assert gif.main([str(video), str(out), "--every", "3", "--max-frames", "7",
                     "--width", "50"]) == 0
    image = Image.open(out)
    assert image.n_frames == 3 and image.size == (50, 50)  # frames 0, 3, 6
