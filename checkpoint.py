"""
VideoMAR checkpoints on disk: written atomically, loaded with `weights_only=True`, the configs
inside as plain data, and a model built from one; for sampling, the trained model with its
tokenizer and text encoder, sized, and its KV cache checked against memory, before it is built.
Whatever is not a VideoMAR checkpoint (a missing file, another kind of file, a torn or unsafe
one, a config this code does not know, weights that do not fit it) is BadInput: one line, never
torch's paragraph.

Usage:
    save_checkpoint("out/ckpt.pt", dict(config=asdict(model.config), model=..., ema=..., ...))
    model = build_model(load_checkpoint("out/ckpt.pt"))       # the EMA weights, in eval mode
    trained = trained_model("out/ckpt.pt", "cpu")   # .model, .tokenizer, ..., .cfg, .num_iter
"""
import os
import pickle
import re
import warnings
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

import torch

from cli import compute_dtype
from data import load_text_encoder, load_tokenizer
from errors import BadInput, first_line
from model import VideoMAR, VideoMARConfig, rows_per_video


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


# A field missing from a checkpoint's config was added to VideoMARConfig after the checkpoint
# was written, so the model was trained without what the field adds: the field takes its
# default, or here the value that turns it off where the default is on.
BEFORE_THE_FIELD = dict(qk_norm=False)


def config_from_dict(config):
    """A VideoMARConfig from a plain dict of its fields; a field it lacks is one added since it
    was written (BEFORE_THE_FIELD), a key that is no field is refused."""
    names = {f.name for f in fields(VideoMARConfig)}
    if config.keys() - names:
        raise BadInput(f"the checkpoint's config does not fit this model code: unknown keys "
                       f"{sorted(config.keys() - names)}")
    missing = {name: value for name, value in BEFORE_THE_FIELD.items() if name not in config}
    return VideoMARConfig(**missing, **config)


def model_from_config(config):
    """A fresh VideoMAR from a plain dict of the fields of VideoMARConfig (config_from_dict)."""
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


# -----------------------------------------------------------------------------
# A trained model, for sampling: its tokenizer and text encoder, its KV cache checked first

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
    values of every layer, in the dtype the model computes in on `device`. Refused when it
    exceeds the device's memory, which no waiting could help; returns the estimate in bytes."""
    element = compute_dtype(device).itemsize
    need = 2 * config.n_layer * rows * config.n_embd * tokens * element
    have = memory_bytes(device)
    if have is not None and need > have:
        raise BadInput(f"{tokens} tokens in {rows} rows need a KV cache of {gigabytes(need)}, "
                       f"more than the {gigabytes(have)} of {device.type} memory here: ask for "
                       f"fewer --frames, a smaller --height and --width, or fewer videos at a time")
    return need


class TrainedModel(NamedTuple):
    """Everything sampling from a checkpoint needs, every default resolved (trained_model)."""
    model: VideoMAR  # the EMA weights, in eval mode, on the device
    tokenizer: object
    text_encoder: object
    train_config: dict  # the TrainConfig it was trained with, as a dict
    num_frames: int  # pixel frames of the video
    height: int
    width: int
    cfg: float  # the guidance scale
    num_iter: int  # masked-generation steps a frame


# a checkpoint written before the guidance scale travelled with it was sampled at §5.1's 3
PAPER_CFG = 3.0


def trained_model(path, device, num_frames=None, height=None, width=None, batch=1, cfg=None,
                  num_iter=None, given=0):
    """What sampling from a checkpoint needs (TrainedModel): its EMA model on `device`, its
    tokenizer and text encoder, the options it was trained with, and each setting given, or else
    the checkpoint's: the video's size (num_frames pixel frames of height x width; the last
    training stage's), the guidance scale (its sample_cfg) and the masked-generation steps (its
    sample_num_iter). The size is checked before the model is built: it must leave frames to
    generate after `given` latent frames, and the KV cache of `batch` videos must fit in memory."""
    device = torch.device(device)
    ckpt = load_checkpoint(path)
    train_config = ckpt["train"]
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
    cfg = train_config.get("sample_cfg", PAPER_CFG) if cfg is None else cfg
    num_iter = num_iter or train_config["sample_num_iter"]
    cache = check_memory(config, batch * rows_per_video(cfg), tokens, device)
    print(f"{num_latent_frames} latent frames ({num_frames} frames of {height}x{width}), {batch} "
          f"at a time: KV cache {gigabytes(cache)}")
    model = build_model(ckpt).to(device)
    text_encoder = load_text_encoder(train_config["text_encoder"],
                                     max_length=model.config.text_len, device=device)
    return TrainedModel(model, tokenizer, text_encoder, train_config, num_frames, height, width,
                        cfg, num_iter)
