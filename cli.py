"""
What the scripts (train, sample, eval, bench) share at the command line: an argparse parser whose
mistakes are one line, the option types that check every value as it is parsed, the output check,
the generation options of sample.py and eval.py, train.py's options made from the fields of its
config dataclasses, loading a trained model for sampling with its tokenizer and text encoder
(sized, and its KV cache checked against memory, before it is built), and torch.compile in place
for --compile.

Usage:
    parser = ArgumentParser(description="...")
    add_generation_options(parser)
    args = parser.parse_args()                       # BadInput: one `error: ...` line, exit 2
    model, tokenizer, text_encoder, train_config, size = trained_model(args.ckpt, args.device)
"""
import argparse
import inspect
import math
import os
import re
import tempfile
import typing
from dataclasses import asdict, fields
from pathlib import Path

import torch

from checkpoint import build_model, config_from_dict, load_checkpoint
from data import TextEncoder, load_tokenizer
from errors import BadInput, first_line

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
# Options from the fields of a config dataclass (train.py's)

def boolean(value):
    """The type of a boolean option: true or false (also yes/no, 1/0)."""
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if value.lower() not in words:
        raise argparse.ArgumentTypeError(f"true or false, not {value!r}")
    return words[value.lower()]


def comma_list(element):
    """The type of one word of a list option: a value, or values joined by commas (5,13,25)."""
    return lambda value: [element(v) for v in value.split(",")]


class JoinLists(argparse.Action):
    """--frames 5 13 25 and --frames 5,13,25 give the same list; a tuple field takes `length`
    values (betas: two)."""

    def __init__(self, *args, length=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.length = length

    def __call__(self, parser, namespace, words, option_string=None):
        values = [v for word in words for v in word]
        if self.length is None:
            setattr(namespace, self.dest, values)
        elif len(values) == self.length:
            setattr(namespace, self.dest, tuple(values))
        else:
            parser.error(f"argument {option_string}: needs {self.length} values, not {len(values)}")


def commented_fields(cls):
    """[(heading, {field: comment})]: the fields of the dataclass `cls` in the groups its comment
    lines head, each with the comment on its own line. The dataclass stays the one place where
    its options are explained; --help shows them in its order."""
    groups, continued = [(cls.__name__, {})], False
    for line in inspect.getsource(cls).splitlines()[2:]:  # after @dataclass and the class line
        comment = re.fullmatch(r"\s*# (.*)", line)
        declared = re.fullmatch(r"\s*(\w+): [^#]*?(?:  # (.*))?", line)
        if comment and continued:  # a heading of several lines
            groups[-1] = (f"{groups[-1][0]} {comment[1]}", groups[-1][1])
        elif comment:
            groups.append((comment[1], {}))
        elif declared:
            groups[-1][1][declared[1]] = declared[2] or ""
        else:
            break  # the fields end at the first other line
        continued = bool(comment)
    return [(heading, names) for heading, names in groups if names]


def shown(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def add_field_options(parser, cls, presets, checks, sized_by):
    """One option per field of the dataclass `cls`, typed by its annotation and checked by
    `checks` (field: option type). Its help shows the default (the tiny preset's value, or
    `sized_by`'s words for a field that something else sizes) and the value of any other preset
    that differs."""
    kinds = {f.name: f.type for f in fields(cls)}
    tiny = {**asdict(cls()), **presets["tiny"]}
    for heading, comments in commented_fields(cls):
        group = parser.add_argument_group(heading.replace("%", "%%"))
        for name, comment in comments.items():
            values = [sized_by.get(name, shown(tiny[name]))] + [
                f"{preset}: {shown(v[name])}" for preset, v in presets.items()
                if name in v and name not in sized_by and v[name] != tiny[name]]
            text = f"{comment} (default: {'; '.join(values)})".strip().replace("%", "%%")
            kind, parts = typing.get_origin(kinds[name]), typing.get_args(kinds[name])
            element = parts[0] if parts else kinds[name]
            check = checks.get(name, element)
            if kinds[name] is bool:
                options = dict(type=boolean, nargs="?", const=True, metavar="true|false")
            elif kind in (list, tuple):
                options = dict(type=comma_list(check), nargs="+", action=JoinLists,
                               metavar=element.__name__.upper(),
                               length=len(parts) if kind is tuple else None)
            else:
                options = dict(type=check, metavar=element.__name__.upper())
            group.add_argument(f"--{name}", help=text, **options)


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
    train_config = ckpt["train"]  # the TrainConfig it was trained with, as a dict
    tokenizer = load_tokenizer(train_config["tokenizer"], device, ckpt.get("tokenizer"))
    height, width = height or train_config["height"], width or train_config["width"]
    tokenizer.check_size(height, width)
    num_frames = num_frames or train_config["frames"][-1]
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
    text_encoder = TextEncoder(train_config["text_encoder"], max_length=model.config.text_len,
                               device=device)
    return model, tokenizer, text_encoder, train_config, (num_frames, height, width)


# -----------------------------------------------------------------------------
# --compile (train.py, bench.py)

def compile_model(model, backend="inductor"):
    """torch.compile, in place, the parts of a VideoMAR with many small operations: the
    transformer blocks, the diffusion head's MLP in training (forward) and its denoiser in
    sampling (denoise). In place (Module.compile and an instance attribute), so parameter names
    and checkpoints stay those of the plain model; dynamic shapes, since the frames a step sees
    and the tokens it scores or samples change from step to step."""
    for module in [*model.blocks, model.diffloss.net]:
        module.compile(backend=backend, dynamic=True)
    head = model.diffloss.net
    head.denoise = torch.compile(head.denoise, backend=backend, dynamic=True)
