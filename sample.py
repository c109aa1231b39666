"""
Sample a video from a trained VideoMAR: frame by frame with a KV cache, the tokens of each frame
in parallel by masked generation (§4.3).

Usage:
    python sample.py --image x.png --prompt "a red square moves left slowly"
    python sample.py --video clip.mp4 --cond_frames 2 --prompt "..."       # video-to-video
    python sample.py --prompt "..."                                         # text-to-video
    python sample.py --image x.png --frames 49 --height 64 --width 96      # extrapolation

From Python:
    latents = generate(model, cond_latents, (text, text_mask), num_frames=7)
"""
import argparse
import math
import os
import pickle
import re
import sys
import tempfile
import warnings
from dataclasses import fields
from pathlib import Path

import torch
from tqdm import tqdm

from data import BadInput, TextEncoder, first_line, load_tokenizer, read_image, read_video, resize_center_crop, save_image_grid, write_video
from model import KVCache, VideoMAR, VideoMARConfig, patchify, unpatchify


def frame_temperature(temperature, i):
    """§4.3 and Appendix B: "progressive" gives the i-th generated frame 0.9 + 10^-(i+1)
    (1.0, 0.91, 0.901, ...): lower temperature for later frames suppresses accumulated error.
    A number gives every frame that constant. This follows the paper, not the authors' released
    sampler: that one uses one constant temperature for all frames (a linear schedule,
    0.95 - 0.05 i / n for the i-th of n generated frames, sits there in a comment). Appendix B
    finds a constant 0.9 about as good (slightly lower Dynamic Degree) and recommends both."""
    if temperature == "progressive":
        return 0.9 + 10.0 ** -(i + 1)
    return float(temperature)


def merge_contexts(conditional, unconditional):
    """Stack the text contexts of the conditional rows and the null-text rows along the batch."""
    kvs = [(torch.cat([k, uk]), torch.cat([v, uv])) for (k, v), (uk, uv) in zip(conditional[0], unconditional[0])]
    return kvs, torch.cat([conditional[1], unconditional[1]])


@torch.no_grad()
def generate(model, cond_latents, text, num_frames, num_iter=64, cfg=3.0, temperature="progressive",
             use_kv_cache=True, generator=None, clip_range=None, clip_x0=True, progress=None):
    """Continue `cond_latents` (B, k, C, h, w), k >= 0 given latent frames, to `num_frames`
    latent frames. `text` is (embeddings (B, S, text_dim), mask (B, S)) of the captions, or None
    for the null text; with cfg != 1 the batch is doubled with the null text (MAR's linear CFG
    schedule). `clip_range` (lo, hi), the tokenizer's latent range, is imposed two ways:
    - the authors' clip: each sampled token of a frame after the first generated one is clamped
      to it as it is sampled (their sampler, Cosmos latents x 0.5 to [-2, 2]); the first
      generated frame is left as sampled;
    - with `clip_x0` (this code's choice), every x_0 the diffusion head predicts, at every
      diffusion step of every token of every frame, is clamped to it first (DiffLoss.sample).
      That changes every posterior mean; the last one (t = 0) is the clamped x_0 itself, so the
      tokens come out inside the range and the authors' clip then changes nothing.
    Returns (B, num_frames, C, h, w), the given frames bit-exact."""
    config, device = model.config, cond_latents.device
    p = config.patch_size
    B, k, C, h, w = cond_latents.shape
    grid = (h // p, w // p)
    L = grid[0] * grid[1]
    num_iter = min(num_iter, L)
    guided = cfg != 1.0 and text is not None  # with the null text both halves would be the same
    if not config.causal and use_kv_cache:
        raise ValueError("a model without frame-wise causal attention cannot use the KV cache")
    double = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)

    tokens = torch.zeros(B, num_frames, L, config.token_dim, device=device)
    tokens[:, :k] = patchify(cond_latents, p)
    context = model.text_context(*text) if text is not None else model.null_context(B)
    if guided:
        context = merge_contexts(context, model.null_context(B))
    cache = KVCache(config, len(context[1]), num_frames * L) if use_kv_cache else None
    if use_kv_cache and k > 0:  # prefill: the given frames, fully visible, once
        model.forward_frames(double(tokens[:, :k].flatten(1, 2)), None, 0, grid, context, cache, commit=True)

    for f in range(k, num_frames):
        frame_temp = frame_temperature(temperature, f - k)
        order = torch.rand(B, L, generator=generator, device=device).argsort(dim=1)
        mask = torch.ones(B, L, dtype=torch.bool, device=device)
        num_masked = L
        for step in range(num_iter):
            if use_kv_cache:
                z = model.forward_frames(double(tokens[:, f]), double(mask), f, grid, context, cache)
            else:
                # "w/o KV cache" (Table 2): re-run all previous frames under the causal mask; a
                # model without causal attention also sees the (fully masked) future frames
                seen = f + 1 if config.causal else num_frames
                full_mask = torch.zeros(B, seen, L, dtype=torch.bool, device=device)
                full_mask[:, f] = mask
                full_mask[:, f + 1:] = True
                z = model.forward_frames(double(tokens[:, :seen].flatten(1, 2)), double(full_mask.flatten(1)),
                                         0, grid, context)[:, f * L:(f + 1) * L]
            # cosine schedule: after this step cos(pi/2 (step+1)/num_iter) of the frame stays masked,
            # at least one token until the last step (MAR)
            mask_len = math.floor(L * math.cos(math.pi / 2 * (step + 1) / num_iter))
            mask_len = max(1, min(num_masked - 1, mask_len))
            if step == num_iter - 1:
                next_mask, num_masked = torch.zeros_like(mask), 0
            else:
                next_mask, num_masked = torch.zeros_like(mask).scatter_(1, order[:, :mask_len], True), mask_len
            to_predict = mask & ~next_mask
            z_rows = torch.cat([z[:B][to_predict], z[B:][to_predict]]) if guided else z[to_predict]
            cfg_step = 1 + (cfg - 1) * (L - mask_len) / L if guided else 1.0
            sampled = model.diffloss.sample(z_rows, frame_temp, cfg_step, generator=generator,
                                            clip_range=clip_range if clip_x0 else None)
            if clip_range is not None and f > k:  # the authors' clip, before later steps see them
                sampled = sampled.clamp(*clip_range)
            tokens[:, f][to_predict] = sampled.to(tokens.dtype)
            mask = next_mask
        if use_kv_cache and f < num_frames - 1:
            # commit: the finished frame once more, fully visible, into the cache; the last
            # frame's keys and values would be read by nothing (the authors skip it too)
            model.forward_frames(double(tokens[:, f]), None, f, grid, context, cache, commit=True)
        if progress is not None:
            progress.update(1)
    return unpatchify(tokens, p, h, w)


@torch.no_grad()
def generate_total_mask(model, cond_latents, text, num_frames, num_iter=64, cfg=3.0,
                        temperature="progressive", generator=None, clip_range=None, progress=None):
    """The sampler of the "total mask" baseline of Table 4 (Eq. 3.1): MAR's masked generation over
    all the tokens of the video at once, not frame by frame. Every token after the `k` given frames
    starts masked, in one random order over the whole video; `num_iter` steps per generated frame
    in all (the same number of passes as `generate` without the cache) reveal them on MAR's cosine
    schedule, each pass seeing the whole video with full attention. A token is sampled with its
    frame's temperature (the progressive schedule) and MAR's linear CFG schedule over the video.
    Same arguments and result as `generate`."""
    config, device = model.config, cond_latents.device
    p = config.patch_size
    B, k, C, h, w = cond_latents.shape
    grid = (h // p, w // p)
    L = grid[0] * grid[1]
    N = (num_frames - k) * L  # the tokens to generate
    steps = min(num_iter * (num_frames - k), N)
    guided = cfg != 1.0 and text is not None
    double = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)

    tokens = torch.zeros(B, num_frames * L, config.token_dim, device=device)
    tokens[:, :k * L] = patchify(cond_latents, p).flatten(1, 2)
    context = model.text_context(*text) if text is not None else model.null_context(B)
    if guided:
        context = merge_contexts(context, model.null_context(B))
    frame_of = torch.arange(num_frames * L, device=device) // L
    order = k * L + torch.rand(B, N, generator=generator, device=device).argsort(dim=1)
    mask = torch.zeros(B, num_frames * L, dtype=torch.bool, device=device)
    mask[:, k * L:] = True
    for step in range(steps):
        z = model.forward_frames(double(tokens), double(mask), 0, grid, context)
        mask_len = math.floor(N * math.cos(math.pi / 2 * (step + 1) / steps))
        mask_len = max(1, min(int(mask[0].sum()) - 1, mask_len))  # as MAR, also for its CFG schedule
        next_mask = torch.zeros_like(mask)
        if step < steps - 1:  # the last step fills the rest
            next_mask.scatter_(1, order[:, :mask_len], True)
        to_predict = mask & ~next_mask
        cfg_step = 1 + (cfg - 1) * (N - mask_len) / N if guided else 1.0
        for f in frame_of[to_predict.any(0)].unique().tolist():  # each frame its temperature
            rows = to_predict & (frame_of == f)
            z_rows = torch.cat([z[:B][rows], z[B:][rows]]) if guided else z[rows]
            sampled = model.diffloss.sample(z_rows, frame_temperature(temperature, f - k), cfg_step,
                                            generator=generator, clip_range=clip_range)
            tokens[rows] = sampled.to(tokens.dtype)
        mask = next_mask
        if progress is not None:
            progress.update(1 / num_iter)
    return unpatchify(tokens.view(B, num_frames, L, -1), p, h, w)


# ----------------------------------------------------------------------------------------------
# A trained model: checkpoints written by train.py, loaded with weights_only, config as plain data

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
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"no checkpoint at {path}: train one with `python train.py --out_dir {path.parent}`")
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
                       f"{sorted(config.keys() - names)}, missing keys {sorted(names - config.keys())}")
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
    wrong = sorted(set(weights) ^ set(expected)) + [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if wrong:
        raise BadInput(f"the checkpoint's weights do not fit its config: {len(wrong)} tensors are missing, "
                       f"unexpected or of another shape, the first {wrong[0]}")
    model.load_state_dict(weights)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# The command line: every value is checked before any model is loaded or frame generated

class ArgumentParser(argparse.ArgumentParser):
    """argparse's own mistakes (an unknown option, a bad value) as BadInput, so that the CLIs print
    them like every other one: one `error: ...` line, exit code 2, rather than usage plus error."""

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


def add_generation_options(parser):
    """The options sample.py and eval.py share: the checkpoint, the video's size, how to generate."""
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


def parse_args(argv=None):
    parser = ArgumentParser(description="Generate a video with a trained VideoMAR.")
    parser.add_argument("--image", help="first frame (image-to-video); without --image or --video: text-to-video")
    parser.add_argument("--video", help="a clip whose first frames condition the video (video-to-video)")
    parser.add_argument("--cond_frames", type=positive_int, default=1,
                        help="latent frames of --video to keep (§5.3: 2)")
    parser.add_argument("--prompt", default="", help="the caption")
    add_generation_options(parser)
    parser.add_argument("--num_samples", type=positive_int, default=1)
    parser.add_argument("--no_kv_cache", action="store_true", help="the slow reference path of Table 2")
    parser.add_argument("--out", default="out/sample.mp4", help=".mp4 or .gif; a .png contact sheet goes beside it")
    args = parser.parse_args(argv)
    if Path(args.out).suffix.lower() not in (".mp4", ".gif"):
        parser.error(f"--out must end in .mp4 or .gif, not {args.out!r}")
    if args.image and args.video:
        parser.error("give --image or --video, not both")
    return args


def conditioning_latents(args, tokenizer, height, width, device):
    """The given latent frames: the encoded image (k = 1), the first frames of a video, or none."""
    if args.image:
        pixels = read_image(args.image, height, width)[None, None]
    elif args.video:
        frames = tokenizer.pixel_frames(args.cond_frames)
        pixels = resize_center_crop(read_video(args.video, num_frames=frames), height, width)[None]
    else:
        h, w = height // tokenizer.spatial, width // tokenizer.spatial
        return torch.zeros(args.num_samples, 0, tokenizer.channels, h, w, device=device)
    return tokenizer.encode(pixels.to(device)).to(device).expand(args.num_samples, -1, -1, -1, -1)


def trained_model(args, batch, given):
    """The EMA model of --ckpt on --device, its tokenizer and text encoder, the options it was
    trained with, and the video's size: --frames, --height and --width, or else the training ones.
    The size is checked before the model is built: it must leave frames to generate after the
    `given` latent frames, and the KV cache of `batch` videos must fit in memory."""
    device = torch.device(args.device)
    ckpt = load_checkpoint(args.ckpt)
    run = ckpt["train"]
    tokenizer = load_tokenizer(run["tokenizer"], device=device, state=ckpt.get("tokenizer"))
    height, width = args.height or run["height"], args.width or run["width"]
    tokenizer.check_size(height, width)
    frames = args.frames or int(str(run["frames"]).split(",")[-1])
    num_frames = tokenizer.latent_frames(frames)  # a length the tokenizer cannot take fails here
    if num_frames <= given:
        raise BadInput(f"--frames {frames} is {num_frames} latent frames: nothing to generate "
                       f"after {given} given ones")
    config = config_from_dict(dict(ckpt["config"]))
    p = config.patch_size
    tokens = num_frames * (height // tokenizer.spatial // p) * (width // tokenizer.spatial // p)
    rows = batch * (2 if args.cfg != 1 else 1)  # CFG: every video also with the null text
    cache = check_memory(config, rows, tokens, device)
    print(f"{num_frames} latent frames ({frames} frames of {height}x{width}), {batch} at a time: "
          f"KV cache {gigabytes(cache)}")
    model = build_model(ckpt).to(device)
    text_encoder = TextEncoder(run["text_encoder"], max_length=model.config.text_len, device=device)
    args.num_iter = args.num_iter or run["sample_num_iter"]
    return model, tokenizer, text_encoder, run, (frames, height, width)


def sample(args):
    for path in (args.out, Path(args.out).with_suffix(".png")):
        check_writable(path)
    given = 1 if args.image else args.cond_frames if args.video else 0
    model, tokenizer, text_encoder, _, (frames, height, width) = trained_model(
        args, args.num_samples, given)
    device = torch.device(args.device)
    num_frames = tokenizer.latent_frames(frames)
    cond = conditioning_latents(args, tokenizer, height, width, device)
    text = [t.to(device) for t in text_encoder([args.prompt] * args.num_samples)]

    generator = torch.Generator(device).manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with tqdm(total=num_frames - cond.shape[1], desc="frames") as bar, autocast:
        latents = generate(model, cond, text, num_frames, args.num_iter, args.cfg, args.temperature,
                           use_kv_cache=model.config.causal and not args.no_kv_cache, generator=generator,
                           clip_range=tokenizer.clip_range, progress=bar)
    video = tokenizer.decode(latents).clamp(-1, 1).cpu()  # (num_samples, T, 3, H, W)
    write_video(args.out, torch.cat(list(video), dim=-1))  # samples side by side
    sheet = Path(args.out).with_suffix(".png")
    save_image_grid(sheet, list(video))
    print(f"wrote {args.out} ({video.shape[1]} frames of {height}x{width}) and {sheet}")


def main(argv=None):
    """Sample; returns the exit code: 0 done, 2 bad input (one line on stderr, nothing written)."""
    try:
        sample(parse_args(argv))
        return 0
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
