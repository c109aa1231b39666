"""
Video and image files: reading and writing videos (mp4, webm, avi, mov through ffmpeg; gif) and
images, counting a video's frames, resizing and centre-cropping, contact sheets.

Videos are float tensors (T, 3, H, W) in [-1, 1] everywhere; uint8 only on disk and in the
memory of a data set (quantize, dequantize). A file that cannot be read is BadInput.

Usage:
    video = read_video("clip.mp4", num_frames=25)            # (25, 3, H, W) in [-1, 1]
    write_video("out.mp4", video)                            # or .gif
    image = read_image("x.png", 256, 256)                    # (3, 256, 256), resized and cropped
    save_image_grid("sheet.png", [video, other_video])       # one row per video
"""
import contextlib
import itertools
import math
import re
import subprocess
import warnings
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, ImageSequence

from errors import BadInput, first_line

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov", ".gif")


def to_rgb(image):
    """A Pillow image in RGB; transparent pixels become white instead of whatever colour hides
    under them."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def to_tensor(frames):
    """uint8 frames (T, H, W, 3) -> float (T, 3, H, W) in [-1, 1]."""
    return dequantize(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2))


def to_uint8(video):
    """float (..., 3, H, W) in [-1, 1] -> uint8 numpy (..., H, W, 3)."""
    return quantize(video.detach().float().cpu()).movedim(-3, -1).numpy()


def gif_frames(path):
    """A GIF's frames at a constant rate. A GIF stores a delay per frame, and Pillow's writer merges
    identical consecutive frames into one longer frame, so each frame is repeated by its delay over
    the delays' common divisor. (A GIF whose frames are all the same has lost its frame count and
    reads back as one frame.)"""
    with Image.open(path) as gif:
        frames = [(np.array(to_rgb(frame)), frame.info.get("duration") or 0)
                  for frame in ImageSequence.Iterator(gif)]
    unit = math.gcd(*(delay for _, delay in frames)) or 1
    return [pixels for pixels, delay in frames for _ in range(max(1, delay // unit))]


def check_video_path(path):
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"no such video file: {path}")
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise BadInput(f"{path}: not a video file (expected one of {', '.join(VIDEO_EXTENSIONS)})")
    return path


@contextlib.contextmanager
def decoded_frames(path):
    """An iterator over a video file's frames, uint8 (H, W, 3) arrays decoded in order one at a
    time as they are taken; leaving the `with` stops the decoder there."""
    with warnings.catch_warnings():
        # imageio-ffmpeg leaves the pipes of an ffmpeg that has reached the end of the file to
        # the garbage collector, which says so with a ResourceWarning (an error where warnings are)
        warnings.simplefilter("ignore", ResourceWarning)
        if path.suffix.lower() == ".gif":
            yield iter(gif_frames(path))
        else:
            with iio.imopen(path, "r", plugin="FFMPEG") as video:
                yield video.iter()


def read_video(path, num_frames=None, frame_stride=1, start=0):
    """Frames start, start + stride, ... of a video file (all to the end if num_frames is None) as
    (T, 3, H, W) in [-1, 1]."""
    path = check_video_path(path)
    stop = None if num_frames is None else start + (num_frames - 1) * frame_stride + 1
    try:
        with decoded_frames(path) as stream:  # stops decoding after the last frame needed
            frames = list(itertools.islice(stream, start, stop, frame_stride))
    except Exception as e:  # imageio, ffmpeg and Pillow raise many kinds of error for a broken file
        raise BadInput(f"cannot read video {path}: {first_line(e)}") from None
    if not frames or (num_frames is not None and len(frames) < num_frames):
        raise BadInput(f"{path} is too short: need {num_frames or 1} frames from frame {start} at "
                       f"stride {frame_stride}")
    return to_tensor(frames)


def count_frames(path):
    """Number of frames in a video file, without decoding it: ffmpeg copies the video stream to
    nowhere and counts packets (one per frame). Container metadata (fps x duration) is rounded and
    can include audio, and a wrong count would only surface in the middle of training."""
    path = check_video_path(path)
    if path.suffix.lower() == ".gif":
        return len(read_video(path))
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path),
               "-map", "0:v:0", "-c", "copy", "-f", "null", "-"]
    result = subprocess.run(command, capture_output=True, text=True, errors="replace")
    counts = re.findall(r"frame=\s*(\d+)", result.stderr)
    if result.returncode != 0 or not counts:
        reason = (result.stderr.strip().splitlines() or ["no video stream"])[-1]
        raise BadInput(f"cannot read video {path}: {reason}")
    return int(counts[-1])


def write_video(path, video, fps=8):
    """Write (T, 3, H, W) in [-1, 1] as .mp4 (H.264, yuv420p) or .gif, chosen by the extension."""
    path = Path(path)
    if path.suffix.lower() not in (".mp4", ".gif"):
        raise BadInput(f"{path}: can only write .mp4 or .gif")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        frames = [Image.fromarray(pixels) for pixels in to_uint8(video)]
        # GIF delays are in 1/100 s: keep every frame's delay a whole multiple so merged frames
        # expand exactly on reading
        delay = 10 * max(2, round(100 / fps))
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=delay, loop=0)
    else:
        # yuv420p halves the chroma resolution, so H.264 needs even sizes: repeat the last
        # row/column if odd
        video = F.pad(video.float(), (0, video.shape[-1] % 2, 0, video.shape[-2] % 2),
                      mode="replicate")
        iio.imwrite(path, to_uint8(video), plugin="FFMPEG", fps=fps, codec="libx264",
                    pixelformat="yuv420p", quality=8, macro_block_size=1, ffmpeg_log_level="error")


def resize_center_crop(frames, height, width):
    """(T, 3, h, w) -> (T, 3, height, width): resize the short side (antialiased bilinear), then
    crop the centre."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", antialias=True,
                               align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[..., top:top + height, left:left + width]


def read_video_at_size(path, height, width, chunk=32):
    """Every frame of a video file, resized on the short side and centre-cropped, as uint8
    (T, 3, height, width): what a data set keeps in memory. Decoded `chunk` frames at a time, so
    a long video is never held whole at its own size in floats."""
    path = check_video_path(path)
    parts = []
    try:
        with decoded_frames(path) as stream:
            while frames := list(itertools.islice(stream, chunk)):
                parts.append(quantize(resize_center_crop(to_tensor(frames), height, width)))
    except Exception as e:  # imageio, ffmpeg and Pillow raise many kinds of error for a broken file
        raise BadInput(f"cannot read video {path}: {first_line(e)}") from None
    if not parts:
        raise BadInput(f"cannot read video {path}: no frames")
    return torch.cat(parts)


def quantize(video):
    """float (..., 3, H, W) in [-1, 1] -> uint8, the inverse of dequantize up to rounding: a
    quarter of the memory of float32, and the precision the video file had."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def dequantize(pixels):
    """uint8 (..., 3, H, W) -> float in [-1, 1]."""
    return pixels.float() / 127.5 - 1


def read_image(path, height, width):
    """An image file of any mode and size as (3, height, width) in [-1, 1], resized and
    centre-cropped."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"no such image file: {path}")
    try:
        with Image.open(path) as image:
            # exif: phone photos are stored rotated
            pixels = np.array(to_rgb(ImageOps.exif_transpose(image)))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadInput(f"cannot read image {path}: {first_line(e)}") from None
    return resize_center_crop(to_tensor([pixels]), height, width)[0]


def save_image_grid(path, rows, gap=2):
    """One PNG contact sheet: one row per (T, 3, H, W) tensor in [-1, 1], frames left to right,
    white gaps."""
    width = max(row.shape[0] * (row.shape[-1] + gap) - gap for row in rows)
    canvas = torch.ones(3, sum(row.shape[-2] for row in rows) + gap * (len(rows) - 1), width)
    top = 0
    for row in rows:
        h, w = row.shape[-2:]
        for t, frame in enumerate(row.detach().float().cpu()):
            canvas[:, top:top + h, t * (w + gap):t * (w + gap) + w] = frame
        top += h + gap
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(canvas)).save(path)
