"""A small GIF from a --capture-video MP4 (the README's picture, docs/pendulum.gif).

Every `--every`-th frame of the video's first `--max-frames`, from the first, resized to
`--width` pixels (the height keeps the aspect ratio), each shown for `--every` frames of the
video's time (rounded to the GIF's hundredths of a second): the GIF plays at about the
video's speed, in a loop. The README's picture:

    python benchmark/gif.py \\
        runs/pendulum-medium/videos/step3000-seed0-episodes10/eval-episode-6.mp4 \\
        docs/pendulum.gif --every 2 --width 240 --max-frames 121
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python benchmark/gif.py`: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import HelpFormatter


def make_gif(video: Path, out: Path, every: int = 2, width: int = 240,
             max_frames: int | None = None) -> int:
    """Write the GIF; the number of frames it holds."""
    import imageio.v2 as imageio
    from PIL import Image

    reader = imageio.get_reader(video, format="FFMPEG")
    fps = reader.get_meta_data().get("fps") or 30
    frames = []
    for i, frame in enumerate(reader):
        if max_frames is not None and i >= max_frames:
            break
        if i % every == 0:
            image = Image.fromarray(frame)
            height = max(1, round(image.height * width / image.width))
            frames.append(image.resize((width, height), Image.Resampling.LANCZOS))
    reader.close()
    if not frames:
        raise SystemExit(f"error: {video} has no frames")
    out.parent.mkdir(parents=True, exist_ok=True)
    duration = 10 * round(100 * every / fps)  # ms, in the GIF's hundredths of a second
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=duration, loop=0,
                   optimize=True)
    return len(frames)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("video", type=Path, help="an MP4 that --capture-video wrote")
    p.add_argument("out", type=Path, help="the GIF to write")
    p.add_argument("--every", type=int, default=2, help="keep every this many frames")
    p.add_argument("--width", type=int, default=240, help="the GIF's width in pixels")
    p.add_argument("--max-frames", type=int, default=None,
                   help="only the video's first this many frames (default: all)")
    args = p.parse_args(argv)
    if args.every < 1 or args.width < 1:
        p.error("--every and --width must be at least 1")
    n = make_gif(args.video, args.out, args.every, args.width, args.max_frames)
    print(f"wrote {args.out}: {n} frames, {args.out.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
