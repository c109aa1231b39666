"""
VideoMAR checkpoints on disk: written atomically, loaded with `weights_only=True`, the configs
inside as plain data, and a model built from one. Whatever is not a VideoMAR checkpoint (a
missing file, another kind of file, a torn or unsafe one, a config this code does not know,
weights that do not fit it) is BadInput: one line, never torch's paragraph.

Usage:
    save_checkpoint("out/ckpt.pt", dict(config=asdict(model.config), model=..., ema=..., ...))
    model = build_model(load_checkpoint("out/ckpt.pt"))       # the EMA weights, in eval mode
"""
import os
import pickle
import re
import warnings
from dataclasses import fields
from pathlib import Path

import torch

from errors import BadInput, first_line
from model import VideoMAR, VideoMARConfig


def save_checkpoint(path, ckpt):
    """torch.save to a temporary file beside `path`, fsync, then rename: a kill at any moment
    leaves either the old checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# how a file written by torch.save starts: a zip archive, or (the format before PyTorch 1.6) a
# protocol-2 pickle of torch's magic number
ZIP_HEAD = b"PK\x03\x04"
LEGACY_HEAD = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


def is_torch_file(path):
    """Whether torch.save could have written `path`: torch.load's error for any other file is a
    misleading paragraph about weights_only. A truncated zip still counts: torch says what broke."""
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_HEAD))
    return head.startswith(ZIP_HEAD) or head == LEGACY_HEAD


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict at `path`, loaded with weights_only; BadInput for anything else."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"no checkpoint at {path}: train one with "
                       f"`python train.py --out_dir {path.parent}`")
    if not is_torch_file(path):
        raise BadInput(f"{path} is not a PyTorch checkpoint")
    try:
        with warnings.catch_warnings():  # torch's warnings on stderr would break the one-line rule
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # pickle, zip and torch raise many kinds of error for a broken file
        reason = re.sub(r"\x1b\[[0-9;]*m", "", first_line(e)).strip()  # torch colours its message
        raise BadInput(f"cannot load checkpoint {path}: {reason}") from None
    if not isinstance(ckpt, dict) or not {"config", "model", "ema"} <= ckpt.keys():
        raise BadInput(f"{path} is not a VideoMAR checkpoint (no config, model and ema inside)")
    return ckpt


def config_from_dict(config):
    """A VideoMARConfig from a plain dict holding exactly its fields."""
    names = {f.name for f in fields(VideoMARConfig)}
    if config.keys() != names:
        raise BadInput(f"the checkpoint's config does not fit this model code: unknown keys "
                       f"{sorted(config.keys() - names)}, "
                       f"missing keys {sorted(names - config.keys())}")
    return VideoMARConfig(**config)


def model_from_config(config):
    """A fresh VideoMAR from a plain dict holding exactly the fields of VideoMARConfig."""
    model_config = config_from_dict(config)
    try:
        return VideoMAR(model_config)
    except (AssertionError, TypeError, ValueError, RuntimeError) as e:
        raise BadInput(f"cannot build a model from config {config}: {first_line(e)}") from None


def build_model(ckpt, use_ema=True):
    """The VideoMAR of a checkpoint dict, in eval mode, with its EMA weights (or the raw ones)."""
    model = model_from_config(dict(ckpt["config"]))
    weights, expected = ckpt["ema" if use_ema else "model"], model.state_dict()
    wrong = sorted(set(weights) ^ set(expected)) + [
        k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if wrong:
        raise BadInput(f"the checkpoint's weights do not fit its config: {len(wrong)} tensors are "
                       f"missing, unexpected or of another shape, the first {wrong[0]}")
    model.load_state_dict(weights)
    return model.eval()
