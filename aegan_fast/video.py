"""Writing a sequence of frames: a video (.mp4, .webm, .mkv, .mov), an animation (.gif, .webp) or a
grid (.png).

- Videos go through imageio's ffmpeg plugin (``imageio`` + ``imageio-ffmpeg``, which ships its own
  ffmpeg binary), else through PyAV (``av``); H.264 in yuv420p for .mp4/.mov/.mkv (what every player
  opens), VP9 for .webm.
- Animated GIF and WebP are written by Pillow, which is always installed (a GIF has 256 colours; WebP
  is lossless here).
- A .png is one grid, a row per segment.

``check_output(path)`` says before any rendering whether this machine can write the path, so a long
render never ends in a missing plugin. Frames are streamed: a video never holds every frame in memory,
and nothing appears at ``path`` until the whole file is written.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

FFMPEG_SUFFIXES = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9"}
PILLOW_SUFFIXES = (".gif", ".webp")
GRID_SUFFIX = ".png"
SUFFIXES = tuple(FFMPEG_SUFFIXES) + PILLOW_SUFFIXES + (GRID_SUFFIX,)


def video_writer() -> str | None:
    """"imageio" or "pyav": the library that writes videos here, or None."""
    if importlib.util.find_spec("imageio") is not None and importlib.util.find_spec("imageio_ffmpeg") is not None:
        return "imageio"
    if importlib.util.find_spec("av") is not None:
        return "pyav"
    return None


def check_output(path: str | Path) -> str:
    """How ``path`` will be written ("imageio", "pyav", "pillow" or "grid"); a UserError naming the
    formats, or what to install, when it cannot be."""
    suffix = Path(path).suffix.lower()
    if suffix in FFMPEG_SUFFIXES:
        writer = video_writer()
        if writer is None:
            raise UserError(f"writing {suffix} needs a video library: pip install imageio imageio-ffmpeg (or av); "
                            f"or write an animated .gif or .webp (Pillow) instead")
        return writer
    if suffix in PILLOW_SUFFIXES:
        return "pillow"
    if suffix == GRID_SUFFIX:
        return "grid"
    raise UserError(f"cannot write {Path(path).name!r}: give a video ({', '.join(FFMPEG_SUFFIXES)}), an animation "
                    f"({', '.join(PILLOW_SUFFIXES)}) or a grid ({GRID_SUFFIX})")


def _hwc(batch: torch.Tensor) -> np.ndarray:
    """uint8 N×3×H×W → N×H×W×3 numpy."""
    if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(f"frames must be uint8 N×3×H×W, got {batch.dtype} {tuple(batch.shape)}")
    return batch.permute(0, 2, 3, 1).contiguous().numpy()


class FrameWriter:
    """``with FrameWriter(path, fps) as w: w.append(uint8 N×3×H×W)`` writes ``path`` (module
    docstring); ``nrow``: frames per row of a .png grid. On an exception inside the block nothing is
    left at ``path``."""

    def __init__(self, path: str | Path, fps: float = 30, nrow: int | None = None):
        self.path, self.fps, self.nrow = Path(path), fps, nrow
        if not fps > 0:
            raise UserError(f"fps must be > 0, got {fps}")
        self.kind = check_output(self.path)
        self.tmp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self.frames: list[np.ndarray] = []  # pillow and grid keep their frames until the end
        self._video = None
        self.count = 0

    def __enter__(self) -> "FrameWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self

    def append(self, batch: torch.Tensor) -> None:
        frames = _hwc(batch)
        self.count += len(frames)
        if self.kind in ("pillow", "grid"):
            self.frames.extend(frames)
            return
        if self._video is None:
            self._video = self._open_video(frames.shape[1:3])
        for frame in frames:
            self._video(frame)

    def _open_video(self, size):
        codec = FFMPEG_SUFFIXES[self.path.suffix.lower()]
        if self.kind == "imageio":
            import imageio.v2 as imageio
            # macro_block_size=1: keep the frame size (imageio would otherwise resize to a multiple of 16)
            writer = imageio.get_writer(self.tmp, fps=self.fps, codec=codec, quality=8, macro_block_size=1,
                                        pixelformat="yuv420p", ffmpeg_log_level="error")
            self._close = writer.close
            return writer.append_data
        import av
        container = av.open(str(self.tmp), mode="w")
        stream = container.add_stream(codec, rate=round(self.fps))
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"

        def write(frame):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)

        def close():
            for packet in stream.encode():
                container.mux(packet)
            container.close()
        self._close = close
        return write

    def __exit__(self, kind, value, tb) -> None:
        try:
            if kind is None:
                self._finish()
                os.replace(self.tmp, self.path)
            elif self._video is not None:
                self._close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def _finish(self) -> None:
        if self.count == 0:
            raise UserError(f"no frames to write to {self.path}")
        if self.kind == "grid":
            from PIL import Image

            from .data import to_float
            from .viz import make_grid
            grid = make_grid(to_float(torch.from_numpy(np.stack(self.frames)).permute(0, 3, 1, 2)), self.nrow)
            Image.fromarray(grid.permute(1, 2, 0).numpy()).save(self.tmp, format="PNG")
        elif self.kind == "pillow":
            from PIL import Image
            first, *rest = [Image.fromarray(f) for f in self.frames]
            options = {"lossless": True} if self.path.suffix.lower() == ".webp" else {}
            first.save(self.tmp, save_all=True, append_images=rest, duration=round(1000 / self.fps), loop=0,
                       **options)
        else:
            self._close()
