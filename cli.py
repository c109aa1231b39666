"""
What the scripts (train, sample, eval, bench) share at the command line: the device and the
precision they run in, an argparse parser whose mistakes are one line, the option types that
check every value as it is parsed, the output check, the generation options of sample.py and
eval.py, and train.py's options made from the fields of its config dataclasses.

Usage:
    parser = ArgumentParser(description="...")
    add_generation_options(parser)
    args = parser.parse_args()                       # BadInput: one `error: ...` line, exit 2
"""
import argparse
import math
import re
import tempfile
import typing
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import torch

from errors import BadInput, first_line

# -----------------------------------------------------------------------------
# Where the model runs, and in what precision: the one choice every script makes

def default_device():
    """The device the scripts run on unless told: a GPU if there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(device):
    """What the model computes in on `device`: bf16 on GPUs (autocast: half the memory and
    bandwidth of fp32), fp32 on CPUs, where bf16 is slower."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def autocast(device):
    """The context to train and sample in on `device`: bf16 autocast on GPUs, none on CPUs."""
    dtype = compute_dtype(device)
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


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
    (checkpoint.trained_model and VideoMAR.generate_as_trained take them)."""
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
    parser.add_argument("--cfg", type=non_negative_float,
                        help="guidance scale; 1: none (default: the checkpoint's sample_cfg, "
                             "tiny's 2 or the paper's 3)")
    parser.add_argument("--temperature", type=temperature_option, default="progressive",
                        help="progressive or a positive number")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=device_option, default=default_device())


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


def shown(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def add_field_options(parser, cls, presets, checks, sized_by):
    """One option per field of the dataclass `cls`, in a group named after it, typed by the field's
    annotation and checked by `checks` (field: option type). Its help is the field's metadata
    "help", then the default (the tiny preset's value, or `sized_by`'s words for a field that
    something else sizes) and the value of any other preset that differs."""
    full = {preset: {**asdict(cls()), **values} for preset, values in presets.items()}
    tiny = full["tiny"]
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        name = f.name
        values = [sized_by.get(name, shown(tiny[name]))] + [
            f"{preset}: {shown(v[name])}" for preset, v in full.items()
            if name not in sized_by and v[name] != tiny[name]]
        text = f"{f.metadata.get('help', '')} (default: {'; '.join(values)})".strip()
        kind, parts = typing.get_origin(f.type), typing.get_args(f.type)
        element = parts[0] if parts else f.type
        check = checks.get(name, element)
        if f.type is bool:
            options = dict(type=boolean, nargs="?", const=True, metavar="true|false")
        elif kind in (list, tuple):
            options = dict(type=comma_list(check), nargs="+", action=JoinLists,
                           metavar=element.__name__.upper(),
                           length=len(parts) if kind is tuple else None)
        else:
            options = dict(type=check, metavar=element.__name__.upper())
        group.add_argument(f"--{name}", help=text.replace("%", "%%"), **options)
