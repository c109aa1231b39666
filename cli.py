"""
What the scripts (train, sample, eval, bench) share at the command line: an argparse parser whose
mistakes are one line, the option types that check every value as it is parsed, the output check,
the generation options of sample.py and eval.py, and loading a trained model for sampling with its
tokenizer and text encoder (sized, and its KV cache checked against memory, before it is built).

Usage:
    parser = ArgumentParser(description="...")
    add_generation_options(parser)
    args = parser.parse_args()                       # BadInput: one `error: ...` line, exit 2
    model, tokenizer, text_encoder, run, size = trained_model(args.ckpt, args.device)
"""
import argparse
import math
import os
import re
import tempfile
from pathlib import Path

import torch

from data import BadInput, TextEncoder, first_line, load_tokenizer
from model import build_model, config_from_dict, load_checkpoint

# -----------------------------------------------------------------------------
# Options: every value the scripts take is checked as it is parsed, before any work


class ArgumentParser(argparse.ArgumentParser):
    """argparse's own mistakes (an unknown option, a bad value) as BadInput, so that the CLIs print
    them like every other one: one `error: ...` line, exit code 2, rather than usage plus error."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a value such as -1e-3 is a number to check, not an option (argparse knows only -1, -.5)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.I)

    def error(self, message):
        raise BadInput(message)


def int_at_least(low):
    """The type of an integer option that must be at least `low`."""
    def option(value):
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a whole number, not {value!r}") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {number}")
        return number
    return option


positive_int = int_at_least(1)


def float_where(test, what):
    """The type of a number option for which test(number) holds, `what` saying so."""
    def option(value):
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a number, not {value!r}") from None
        if not (math.isfinite(number) and test(number)):
            raise argparse.ArgumentTypeError(f"must be {what}, not {value}")
        return number
    return option


positive_float = float_where(lambda x: x > 0, "positive")
non_negative_float = float_where(lambda x: x >= 0, "at least 0")


def temperature_option(value):
    """The type of --temperature: "progressive" or a positive number."""
    if value == "progressive":
        return value
    try:
        return positive_float(value)
    except argparse.ArgumentTypeError:
        message = f"'progressive' or a positive number, not {value!r}"
        raise argparse.ArgumentTypeError(message) from None


def device_option(value):
    """The type of --device: a device torch knows and this machine has."""
    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {value!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value}: CUDA is not available here; use cpu")
    return value


def check_writable(path, directory=False):
    """Refuse at once an output that cannot be written, rather than after the work. Creates the
    missing directories and a temporary file in them, then removes all it made: a run that fails
    later leaves nothing behind. `directory`: `path` is a directory to write files into."""
    path = Path(path)
    folder = path if directory else path.parent
    if not directory and path.is_dir():
        raise BadInput(f"cannot write {path}: it is a directory")
    made, missing = [], folder
    while not missing.exists() and missing != missing.parent:
        made.append(missing)  # deepest first: the order to remove them in
        missing = missing.parent
    try:
        for d in reversed(made):
            d.mkdir()
        with tempfile.TemporaryFile(dir=folder):
            pass
        if not directory and path.exists():
            open(path, "ab").close()  # appending nothing: is an existing file writable
    except OSError as e:
        raise BadInput(f"cannot write {path}: {e.strerror or first_line(e)}") from None
    finally:
        for d in made:
            try:
                d.rmdir()
            except OSError:
                pass


def add_generation_options(parser):
    """The options sample.py and eval.py share: the checkpoint, the video's size, how to generate
    (trained_model below and VideoMAR.generate take them)."""
    parser.add_argument("--ckpt", default="out/ckpt.pt")
    parser.add_argument("--frames", type=positive_int,
                        help="pixel frames, 1 + 4k (default: the last training stage; "
                             "more extrapolates)")
    parser.add_argument("--height", type=positive_int,
                        help="default: the training height; larger extrapolates")
    parser.add_argument("--width", type=positive_int)
    parser.add_argument("--num_iter", type=positive_int,
                        help="masked generation steps per frame (default: the checkpoint's "
                             "sample_num_iter; the paper's 64 for 1,024 tokens a frame)")
    parser.add_argument("--cfg", type=non_negative_float, default=3.0,
                        help="guidance scale; 1: none")
    parser.add_argument("--temperature", type=temperature_option, default="progressive",
                        help="progressive or a positive number")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=device_option,
                        default="cuda" if torch.cuda.is_available() else "cpu")


# -----------------------------------------------------------------------------
# A trained model, for sampling

def memory_bytes(device):
    """The memory of `device` (all of it, not what is free now), or None where it is unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def gigabytes(n):
    return f"{n / 1e9:.2f} GB" if n >= 0.005e9 else "under 0.01 GB"


def check_memory(config, rows, tokens, device):
    """The KV cache of generating `tokens` tokens for `rows` rows (CFG doubles them): keys and
    values of every layer, bf16 under CUDA autocast, else fp32. Refused when it exceeds the
    device's memory, which no waiting could help; returns the estimate in bytes."""
    element = 2 if device.type == "cuda" else 4
    need = 2 * config.n_layer * rows * config.n_embd * tokens * element
    have = memory_bytes(device)
    if have is not None and need > have:
        raise BadInput(f"{tokens} tokens in {rows} rows need a KV cache of {gigabytes(need)}, "
                       f"more than the {gigabytes(have)} of {device.type} memory here: ask for "
                       f"fewer --frames, a smaller --height and --width, or fewer videos at a time")
    return need


def trained_model(path, device, num_frames=None, height=None, width=None, batch=1, cfg=3.0,
                  given=0):
    """What sampling from a checkpoint needs: its EMA model on `device`, its tokenizer and text
    encoder, the options it was trained with, and the video's size (num_frames pixel frames of
    height x width: the ones given, or else the last training stage's). The size is checked
    before the model is built: it must leave frames to generate after `given` latent frames, and
    the KV cache of `batch` videos (twice the rows with CFG) must fit in memory."""
    device = torch.device(device)
    ckpt = load_checkpoint(path)
    run = ckpt["train"]
    tokenizer = load_tokenizer(run["tokenizer"], device=device, state=ckpt.get("tokenizer"))
    height, width = height or run["height"], width or run["width"]
    tokenizer.check_size(height, width)
    num_frames = num_frames or run["frames"][-1]
    num_latent_frames = tokenizer.latent_frames(num_frames)  # fails for a length it cannot take
    if num_latent_frames <= given:
        raise BadInput(f"--frames {num_frames} is {num_latent_frames} latent frames: nothing to "
                       f"generate after {given} given ones")
    config = config_from_dict(dict(ckpt["config"]))
    grid = (height // tokenizer.spatial // config.patch_size,
            width // tokenizer.spatial // config.patch_size)
    tokens = num_latent_frames * grid[0] * grid[1]
    rows = batch * (2 if cfg != 1 else 1)  # CFG: every video also with the null text
    cache = check_memory(config, rows, tokens, device)
    print(f"{num_latent_frames} latent frames ({num_frames} frames of {height}x{width}), {batch} "
          f"at a time: KV cache {gigabytes(cache)}")
    model = build_model(ckpt).to(device)
    text_encoder = TextEncoder(run["text_encoder"], max_length=model.config.text_len, device=device)
    return model, tokenizer, text_encoder, run, (num_frames, height, width)
