"""
Train VideoMAR: the temporal short-to-long curriculum and progressive resolution of §4.2, with the
optimiser of §5.1, on one process or many (DDP through torchrun).

Usage:
    python train.py                        # tiny preset, built-in synthetic videos, CPU, minutes
    python train.py --frames 5,13 --stage_iters 300,100 --batch_size 16 --lr 5e-4
    python train.py --resume               # continue out/ckpt.pt inside its stage
    python train.py --data path/to/videos --frame_stride 2     # a folder of videos with captions
    # §4.2 progressive resolution, stage 2: weights only, new optimiser, new size (and tokenizer)
    python train.py --init_from out/ckpt.pt --out_dir out64 --height 64 --width 64 --frames 25 \\
        --stage_iters 200

    # the paper's 1.4B model (§5.1) on one node of 8 GPUs
    torchrun --nproc_per_node=8 train.py --preset videomar --data /videos \\
        --tokenizer cosmos:/ckpt/Cosmos-Tokenizer-CV4x8x8 --text_encoder /ckpt/Qwen2-1.5B
    # several nodes: the same command on every node, with its own --node_rank
    torchrun --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \\
        --nproc_per_node=8 train.py --preset videomar ...
    # DDP on CPU (Gloo)
    torchrun --nproc_per_node=2 train.py --device cpu

Every field of TrainConfig and of model.VideoMARConfig is an option (`--help` lists them with
their defaults): --key value or --key=value; booleans true or false, or bare (--resume); lists as
--frames 5 13 25 or --frames 5,13,25. Preset values come first, then the command line. --resume
also restores the run's options from the checkpoint; options given again override them.
The learning rate warms up linearly for warmup_iters, then follows a cosine to min_lr over the
whole curriculum (min_lr = lr gives MAR's constant rate, as the videomar preset does).
"""
import argparse
import itertools
import math
import os
import sys
import time
from copy import deepcopy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from cli import (ArgumentParser, add_field_options, autocast, default_device, device_option,
                 float_where, int_at_least, non_negative_float, positive_float, positive_int)
from checkpoint import build_model, load_checkpoint, model_from_config, save_checkpoint
from data import (OneHotCaptions, PCATokenizer, SyntheticVideos, TextEncoder, VideoFolder,
                  load_text_encoder, load_tokenizer)
from errors import BadInput
from metrics import EvalConfig, caption_steering, model_draw, score_held_out_clips, summary
from model import PRESETS, VideoMARConfig, compile_model
from videoio import save_image_grid, write_video


@dataclass
class TrainConfig:
    # Every field is an option; its metadata's "help" is what `--help` says of it.
    preset: str = field(default="tiny", metadata=dict(
        help='"tiny" (these defaults) or "videomar" (TRAIN_PRESETS)'))
    # data and the frozen encoders
    data: str = field(default="synthetic", metadata=dict(
        help='"synthetic" (the built-in set) or a folder of videos with captions '
             '(data.VideoFolder)'))
    frame_stride: int = field(default=1, metadata=dict(help="for folders: take every n-th frame"))
    cache_gb: float = field(default=2.0, metadata=dict(
        help="for folders: memory for the videos decoded once; more: clip by clip"))
    num_workers: int = 0
    height: int = field(default=16, metadata=dict(
        help="tiny: 16x16 in 4x4x4 patches, 16 tokens of 16 channels per latent frame"))
    width: int = 16
    tokenizer: str = field(default="pca:4x4x4:16", metadata=dict(
        help='"pca:4x4x4:16": the 16 principal components of 4x4x4 patches, fitted before '
             'training (a linear stand-in for Cosmos\'s 16 channels); "patch:4x4x4" the raw 192 '
             'values; or "cosmos:/path/to/Cosmos-Tokenizer-CV4x8x8"'))
    text_encoder: str = field(default=None, metadata=dict(
        help='"onehot": the synthetic captions as a one-hot code of their words, one token per '
             'object (beyond the paper: a word\'s meaning reaches the tiny model directly, '
             'RESULTS.md); "minilm": the packaged all-MiniLM-L6-v2; else a Hugging Face '
             'name/path. None: "onehot" for the synthetic data, "minilm" for a folder'))
    # §4.2 temporal short-to-long curriculum: one stage per clip length
    frames: list[int] = field(default_factory=lambda: [5, 13, 25], metadata=dict(
        help="pixel frames of each stage of §4.2's temporal short-to-long curriculum, in order"))
    stage_iters: list[int] = field(default_factory=lambda: [4400, 2200, 1360], metadata=dict(
        help="iterations of each stage (tiny's: minutes on a 2-core CPU, the most for the "
             "first, where only the caption says where an object goes)"))
    # optimisation (§5.1: AdamW, betas (0.9, 0.95), weight decay 0.02)
    batch_size: int = field(default=8, metadata=dict(help="per process"))
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 50
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    compile: bool = field(default=False, metadata=dict(
        help="torch.compile the transformer blocks and the diffusion head (nanoGPT's --compile); "
             "off for tiny, whose CPU run does not repay the compile time (RESULTS.md)"))
    # the run
    out_dir: str = "out"
    log_interval: int = 50
    ckpt_interval: int = field(default=200, metadata=dict(help="iterations between checkpoints"))
    resume: bool = field(default=False, metadata=dict(help="continue from out_dir/ckpt.pt"))
    init_from: str = field(default=None, metadata=dict(
        help="a checkpoint: its weights only, a new run; §4.2 progressive resolution"))
    seed: int = 0
    device: str = field(default=None, metadata=dict(help="None: cuda if available, else cpu"))
    # the sample written at the end
    sample_num_iter: int = field(default=4, metadata=dict(
        help="masked-generation steps per frame of the sample written at the end, and sample.py's "
             "and eval.py's unless given: 4 for tiny's 16 tokens, the paper's 64 for 1,024"))
    sample_cfg: float = field(default=2.0, metadata=dict(
        help="its guidance scale, sample.py's and eval.py's unless given: tiny's 2 (RESULTS.md: "
             "better than §5.1's 3 for it), the paper's 3"))


TRAIN_PRESETS = {
    # the TrainConfig defaults: trains on a 2-core CPU in minutes. 16x16 in 4x4x4 patches (16
    # tokens a frame, cheap steps) reduced to 16 principal components, and lr 2e-3: the choices
    # that drew the objects most often (RESULTS.md)
    "tiny": {},
    # §5.1: 256x256, Cosmos CV4x8x8, Qwen2-1.5B (both paths required), AdamW (0.9, 0.95), weight
    # decay 0.02, lr 1e-4 throughout. Not given by the paper, so MAR's: warm-up, clipping 3.0, EMA
    # 0.9999; batch and iterations ours. torch.compile on, as nanoGPT on GPUs, where a run of
    # 350k iterations repays its compile time many times over (not measured here: no GPU).
    "videomar": dict(height=256, width=256, tokenizer=None, text_encoder=None, batch_size=8,
                     lr=1e-4, min_lr=1e-4, warmup_iters=5000, grad_clip=3.0, ema_decay=0.9999,
                     stage_iters=[200000, 100000, 50000], log_interval=100, ckpt_interval=2000,
                     num_workers=8, sample_num_iter=64, sample_cfg=3.0, compile=True),
}
# options of one invocation of train.py, never restored by --resume
NOT_RESUMED = ("out_dir", "resume", "init_from", "device")


# -----------------------------------------------------------------------------
# Command line: one option per field of TrainConfig and VideoMARConfig

# what the numeric options must be, checked as they are parsed: before anything is loaded, and
# before a bad value turns into a NaN loss or a silently frozen run minutes later (for a list,
# each of its values)
fraction = float_where(lambda x: 0 <= x <= 1, "in [0, 1]")
below_1 = float_where(lambda x: 0 <= x < 1, "in [0, 1)")  # a decay or momentum of 1 never moves
CHECKS = dict(
    lr=positive_float, min_lr=non_negative_float, warmup_iters=int_at_least(0),
    weight_decay=non_negative_float, betas=below_1, ema_decay=below_1,
    grad_clip=float_where(lambda x: x >= 0, "at least 0 (0: no clipping)"),
    batch_size=positive_int, log_interval=positive_int, ckpt_interval=positive_int,
    frames=positive_int, stage_iters=int_at_least(0), frame_stride=positive_int,
    num_workers=int_at_least(0), cache_gb=non_negative_float, sample_num_iter=positive_int,
    sample_cfg=non_negative_float,
    device=device_option, text_drop_prob=fraction, mask_ratio_min=fraction,
    mask_ratio_std=float_where(lambda x: 0 < x <= 1, "in (0, 1]"),
    rope_theta=float_where(lambda x: x > 1, "above 1 (at 1 every frequency is the same)"),
)
# for a fresh model, these come from the frozen encoders rather than from the preset
SIZED_BY = dict(latent_channels="the tokenizer's channels", text_dim="the text encoder's width")


def parse_args(argv):
    """The command line -> (TrainConfig overrides, VideoMARConfig overrides): only the options
    given, so that presets and a resumed run's options fill in the rest (make_config)."""
    parser = ArgumentParser(description=__doc__, argument_default=argparse.SUPPRESS,
                            allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_field_options(parser, TrainConfig, TRAIN_PRESETS, CHECKS, SIZED_BY)
    add_field_options(parser, VideoMARConfig, PRESETS, CHECKS, SIZED_BY)
    options = vars(parser.parse_args(argv))
    model_keys = {f.name for f in fields(VideoMARConfig)}
    return ({k: v for k, v in options.items() if k not in model_keys},
            {k: v for k, v in options.items() if k in model_keys})


def make_config(cli, saved=None):
    """Preset values, then the checkpoint's options when resuming, then the command line."""
    saved = {k: v for k, v in (saved or {}).items()
             if k not in NOT_RESUMED and k in TrainConfig.__dataclass_fields__}
    preset = cli.get("preset", saved.get("preset", "tiny"))
    if preset not in TRAIN_PRESETS:
        raise BadInput(f"unknown preset {preset!r}: use one of {', '.join(TRAIN_PRESETS)}")
    config = TrainConfig(**{**TRAIN_PRESETS[preset], **saved, **cli})
    if preset == "videomar" and (config.tokenizer is None or config.text_encoder is None):
        raise BadInput("--preset videomar needs --tokenizer "
                       "cosmos:/path/to/Cosmos-Tokenizer-CV4x8x8 and --text_encoder "
                       "/path/to/Qwen2-1.5B")
    if config.text_encoder is None:
        config.text_encoder = "onehot" if config.data == "synthetic" else "minilm"
    if config.text_encoder == "onehot" and config.data != "synthetic":
        raise BadInput("--text_encoder onehot reads only the synthetic captions: for a folder, "
                       "give --text_encoder minilm or a Hugging Face name or path")
    if config.resume and config.init_from:
        raise BadInput("--resume continues a run and --init_from starts a new one: give only one")
    return config


def curriculum(config, tokenizer):
    """[(pixel frames, iterations)] of the §4.2 temporal short-to-long curriculum, checked against
    the tokenizer."""
    if len(config.frames) != len(config.stage_iters):
        raise BadInput(f"--stage_iters {config.stage_iters} needs one count >= 0 for each of "
                       f"--frames {config.frames}")
    for n in config.frames:
        tokenizer.latent_frames(n)  # BadInput for a length the tokenizer cannot take
    tokenizer.check_size(config.height, config.width)
    return list(zip(config.frames, config.stage_iters))


# -----------------------------------------------------------------------------
# Pieces of the training loop

def fit_tokenizer(tokenizer, dataset, config, verbose, num_clips=512):
    """Fit a PCA tokenizer on clips of the longest stage, the same on every rank (a fixed draw)."""
    generator = torch.Generator().manual_seed(config.seed)
    picks = torch.randperm(len(dataset), generator=generator)[:num_clips].tolist()
    picks_bar = tqdm(picks, desc="fit tokenizer", leave=False, disable=not verbose)
    kept = tokenizer.fit(torch.stack([dataset[i][0] for i in picks_bar]))
    if verbose:
        print(f"tokenizer {config.tokenizer}: fitted on {len(picks)} clips, keeps {kept:.1%} of "
              f"the patch variance")


def make_dataset(config, num_frames, frames_cache=None, progress=False):
    """The training clips of one stage. A folder's videos are decoded once, into `frames_cache`,
    a dict the stages share; `progress` shows the decoding."""
    if config.data == "synthetic":
        return SyntheticVideos(num_frames, config.height, config.width, split="train",
                               seed=config.seed)
    # quiet: every stage reads the same folder, so report_skipped says it once for all of them
    return VideoFolder(config.data, num_frames, config.height, config.width, config.frame_stride,
                       log=False, cache_bytes=config.cache_gb * 1e9, frames_cache=frames_cache,
                       progress=progress)


def report_skipped(stages, datasets):
    """Each video a data folder skips, once and plainly, on stderr (an unreadable one fails every
    stage, a short one perhaps only the later ones), and whether its videos fit the memory they are
    decoded into; then how many each stage skipped."""
    for reason in dict.fromkeys(r for d in datasets for r in d.skip_reasons):
        print(f"skipping {reason}", file=sys.stderr)
    largest = max(datasets, key=len)  # the shortest clips: the most videos long enough
    if largest.uncaptioned:
        print(largest.caption_note(), file=sys.stderr)
    if not largest.cached:
        print(f"{largest.cache_note()} (--cache_gb sets the memory)", file=sys.stderr)
    counts = ", ".join(f"{d.skipped} of {d.skipped + len(d)} for clips of {n} frames"
                       for (n, _), d in zip(stages, datasets))
    print(f"data {datasets[0].root}: skipped {counts}")


def batches(dataset, batch_size, rank, world_size, seed, num_workers=0):
    """Endless (videos, captions) batches; each rank draws its own share of every epoch's
    shuffle."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def learning_rate(step, config, total_iters):
    """Linear warm-up, then a cosine from lr to min_lr over the rest of the curriculum."""
    if step < config.warmup_iters:
        return config.lr * (step + 1) / config.warmup_iters
    progress = min(1.0, (step - config.warmup_iters) / max(1, total_iters - config.warmup_iters))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema, model, decay):
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param.detach().float(), 1 - decay)


@torch.no_grad()
def write_sample(ema, tokenizer, text_encoder, clip, caption, config, out_dir):
    """Image-to-video from the first frame of `clip` with the EMA model: out_dir/sample.mp4, and
    out_dir/sample.png with the true clip above the generated one."""
    device = next(ema.parameters()).device
    cond = tokenizer.encode(clip[None, :1].to(device))  # the first frame alone: one latent frame
    generator = torch.Generator(device).manual_seed(config.seed)
    num_latent_frames = tokenizer.latent_frames(len(clip))
    latents = ema.generate_as_trained(cond, text_encoder([caption]), num_latent_frames,
                                      num_iter=config.sample_num_iter, cfg=config.sample_cfg,
                                      generator=generator,
                                      sampler=ema.diffloss.sampler(tokenizer.clip_range))
    video = tokenizer.decode(latents)[0].clamp(-1, 1).cpu()
    write_video(out_dir / "sample.mp4", video)
    save_image_grid(out_dir / "sample.png", [clip, video])
    tqdm.write(f"sample of {caption!r} written to {out_dir / 'sample.mp4'} and "
               f"{out_dir / 'sample.png'}")


# -----------------------------------------------------------------------------
# Training: set up the processes, build the run, the loop over the curriculum, finish

class Process(NamedTuple):
    """Where this process runs: its rank among world_size processes and its device."""
    ddp: bool  # launched by torchrun
    rank: int
    local_rank: int
    world_size: int
    device: str

    @property
    def master(self):  # the one process that logs and writes files
        return self.rank == 0

    @property
    def device_type(self):
        return self.device.split(":")[0]


class Position(NamedTuple):
    """Where a run is in its curriculum; a checkpoint carries it, so --resume goes on from there."""
    stage: int = 0
    stage_step: int = 0  # iterations done in this stage
    step: int = 0  # iterations done in all


class Run(NamedTuple):
    """Everything the loop works with, built before it starts (build)."""
    config: TrainConfig
    out_dir: Path
    tokenizer: object
    text_encoder: TextEncoder | OneHotCaptions
    stages: list  # [(pixel frames, iterations)]
    datasets: list  # one per stage
    model: torch.nn.Module  # the raw model, not its DDP wrapper
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    resumed: Position  # where a resumed run goes on from; None for a new run

    @property
    def ckpt_path(self):
        return self.out_dir / "ckpt.pt"


def set_up(cli):
    """DDP when launched by torchrun: one process per device, NCCL on GPUs, Gloo on CPUs."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    rank, local_rank, world_size = (int(os.environ[k]) for k in names) if ddp else (0, 0, 1)
    device = cli.get("device") or default_device()
    if ddp and device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    process = Process(ddp, rank, local_rank, world_size, device)
    if ddp:
        dist.init_process_group("nccl" if process.device_type == "cuda" else "gloo")
    return process


def build(cli, model_cli, process):
    """The run's options; the checkpoint it starts from: its own (--resume) or another's
    (--init_from); the frozen encoders, the curriculum and its data, the model, its EMA and the
    optimiser. Every mistake in the options or the data fails here, before the first step."""
    out_dir = Path(cli.get("out_dir", TrainConfig.out_dir))
    resumed = load_checkpoint(out_dir / "ckpt.pt") if cli.get("resume") else None
    config = make_config(cli, resumed["train"] if resumed else None)
    source = resumed or (load_checkpoint(config.init_from) if config.init_from else None)
    same_tokenizer = source is not None and source["train"]["tokenizer"] == config.tokenizer
    tokenizer = load_tokenizer(config.tokenizer, process.device,
                               source.get("tokenizer") if same_tokenizer else None)
    stages = curriculum(config, tokenizer)
    # a bad data folder fails here, early; its videos are decoded once for all the stages
    frames_cache = {}
    datasets = [make_dataset(config, num_frames, frames_cache, process.master)
                for num_frames, _ in stages]
    if process.master and config.data != "synthetic":
        report_skipped(stages, datasets)
    if isinstance(tokenizer, PCATokenizer) and tokenizer.basis is None:  # fitted on the data, once
        fit_tokenizer(tokenizer, datasets[-1], config, process.master)
    origin = f"the checkpoint {config.init_from or out_dir / 'ckpt.pt'}" if source else "the model"
    model_config = model_options(config, model_cli, source, tokenizer, origin)
    text_encoder = load_text_encoder(config.text_encoder, max_length=model_config["text_len"],
                                     device=process.device)
    if source is None:
        model_config["text_dim"] = model_cli.get("text_dim", text_encoder.dim)
    if model_config["text_dim"] != text_encoder.dim:
        raise BadInput(f"{origin} takes text of width {model_config['text_dim']}, but the text "
                       f"encoder gives {text_encoder.dim}")

    torch.manual_seed(config.seed)
    if source is None:
        model = model_from_config(model_config)
        ema = deepcopy(model)
    else:  # the EMA restarts from the raw weights in a new run (--init_from)
        model = build_model({**source, "config": model_config}, use_ema=False).train()
        ema = build_model({**source, "config": model_config}, use_ema=resumed is not None)
    model.to(process.device)
    ema.to(process.device).eval().requires_grad_(False)
    if config.compile:
        compile_model(model)
    optimizer = model.configure_optimizers(config.weight_decay, config.lr, config.betas,
                                           process.device_type)
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
    position = Position(*(resumed[k] for k in Position._fields)) if resumed else None
    return Run(config, out_dir, tokenizer, text_encoder, stages, datasets, model, ema, optimizer,
               position)


def model_options(config, model_cli, source, tokenizer, origin):
    """The model's config as a dict: fresh from the preset and sized by the tokenizer, or the
    source checkpoint's; then the command line. The latent token size must match the tokenizer
    (§4.2: stage 2 keeps it)."""
    if source:
        model_config = dict(source["config"])
    else:
        model_config = asdict(VideoMARConfig(**PRESETS[config.preset]))
        model_config["latent_channels"] = tokenizer.channels
    model_config.update(model_cli)
    if model_config["latent_channels"] != tokenizer.channels:
        raise BadInput(f"{origin} takes latents of {model_config['latent_channels']} channels, but "
                       f"tokenizer {config.tokenizer} makes {tokenizer.channels}: the latent token "
                       f"size must match")
    return model_config


def save(run, position):
    """The run's checkpoint: weights, EMA, optimiser, where it is, and its configs as plain data."""
    tokenizer = run.tokenizer.state() if hasattr(run.tokenizer, "state") else None
    save_checkpoint(run.ckpt_path, dict(
        config=asdict(run.model.config), train=asdict(run.config), tokenizer=tokenizer,
        model=run.model.state_dict(), ema=run.ema.state_dict(),
        optimizer=run.optimizer.state_dict(), **position._asdict()))


def loop(run, process):
    """§4.2 temporal short-to-long curriculum: the stages in order, short clips first, from the
    beginning or where a resumed run stopped. Returns the iterations done in all, or None when a
    NaN loss stopped the run."""
    config, optimizer = run.config, run.optimizer
    model, autocast = as_trained_here(run.model, process)
    torch.manual_seed(config.seed + process.rank)  # each rank its own masks, frames and noise
    total_iters = sum(iters for _, iters in run.stages)
    start = run.resumed or Position()
    step = start.step
    for stage in range(start.stage, len(run.stages)):
        num_frames, iters = run.stages[stage]
        first_step = start.stage_step if stage == start.stage else 0
        if first_step >= iters:
            continue
        # a resumed stage draws a fresh order rather than the clips it saw before the interruption
        stream = batches(run.datasets[stage], config.batch_size, process.rank, process.world_size,
                         config.seed + step, config.num_workers)
        bar = tqdm(total=iters, initial=first_step, disable=not process.master,
                   desc=f"stage {stage + 1}/{len(run.stages)}: {num_frames} frames")
        losses, tokens, last_log = [], 0, time.time()
        for stage_step in range(first_step, iters):
            lr = learning_rate(step, config, total_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            mean_loss, latents = train_step(run, model, next(stream), autocast, process)
            if not torch.isfinite(mean_loss):
                bar.close()
                kept = (f"last good checkpoint {run.ckpt_path} kept" if run.ckpt_path.exists()
                        else "no checkpoint written yet")
                if process.master:
                    print(f"loss is {mean_loss.item()} at step {step + 1}; stopping, {kept}",
                          file=sys.stderr)
                return None
            step += 1
            bar.update()
            losses.append(mean_loss.item())
            B, T, _, h, w = latents.shape
            tokens += B * T * h * w * process.world_size
            if process.master and step % config.log_interval == 0:
                now = time.time()
                mean = sum(losses) / len(losses)
                bar.set_postfix(loss=f"{mean:.4f}")
                tqdm.write(f"step {step} | stage {stage + 1}/{len(run.stages)} | frames "
                           f"{num_frames} | loss {mean:.4f} | lr {lr:.2e} | "
                           f"{tokens / (now - last_log):.0f} tokens/s")
                losses, tokens, last_log = [], 0, now
            if process.master and step % config.ckpt_interval == 0:
                save(run, Position(stage, stage_step + 1, step))
        bar.close()
    return step


def as_trained_here(model, process):
    """The model as this process trains it (in DDP's wrapper under torchrun), and the autocast
    it trains under (cli.autocast)."""
    if process.ddp:
        device_ids = [process.local_rank] if process.device_type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    return model, autocast(process.device)


def train_step(run, model, batch, autocast, process):
    """One iteration on a batch (videos, captions): the frozen encoders, the loss, backward,
    clipping, the optimiser and the EMA. Returns the loss averaged over the processes and the
    latents; a NaN or inf loss changes nothing."""
    config, optimizer = run.config, run.optimizer
    videos, captions = batch
    with torch.no_grad():  # the frozen encoders
        latents = run.tokenizer.encode(videos.to(process.device))
        text, text_mask = run.text_encoder(captions)
    with autocast:
        loss = model(latents, text, text_mask)  # §4.1 next-frame diffusion loss
    # every rank needs the same verdict on a NaN: the loss is averaged first (one small
    # all-reduce)
    mean_loss = loss.detach().float().clone()
    if process.ddp:
        dist.all_reduce(mean_loss)
        mean_loss /= process.world_size
    if torch.isfinite(mean_loss):
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(run.ema, run.model, config.ema_decay)
    return mean_loss, latents


def finish(run, step):
    """The final checkpoint, a sample from a held-out clip, and on the synthetic set a quick
    score (`python eval.py` for the full one)."""
    config = run.config
    last_stage = len(run.stages) - 1
    num_frames, iters = run.stages[last_stage]
    save(run, Position(last_stage, iters, step))
    print(f"step {step}: checkpoint written to {run.ckpt_path}")
    if config.data == "synthetic":  # held out: the test split draws from other seeds
        clip, caption = SyntheticVideos(num_frames, config.height, config.width, split="test",
                                        seed=config.seed)[0]
    else:  # a real folder has no held-out split: its first video
        clip, caption = run.datasets[last_stage][0]
    write_sample(run.ema, run.tokenizer, run.text_encoder, clip, caption, config, run.out_dir)
    if config.data == "synthetic":
        eval_config = EvalConfig(
            n=16, num_frames=num_frames, height=config.height, width=config.width,
            num_iter=config.sample_num_iter, cfg=config.sample_cfg, seed=config.seed,
            null_text=False, keep=0)
        result = score_held_out_clips(run.ema, run.tokenizer, run.text_encoder, eval_config)
        draw = model_draw(run.ema, run.tokenizer, run.text_encoder, eval_config)
        steering = caption_steering(draw, run.tokenizer, eval_config,
                                    rows=("true caption", "reversed caption"))
        print(summary(result, steering))


def train(cli, model_cli):
    """Train; returns the exit code: 0 done, 1 stopped on a NaN or inf loss."""
    process = set_up(cli)
    run = build(cli, model_cli, process)
    if process.master:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        parameters = sum(p.numel() for p in run.model.parameters()) / 1e6
        print(f"{parameters:.2f}M parameters | {process.world_size} process(es) on "
              f"{process.device} | {run.config.height}x{run.config.width} | curriculum "
              f"{run.config.frames} x {run.config.stage_iters} iterations")
        if run.resumed:
            print(f"resuming {run.ckpt_path} at step {run.resumed.step} (stage "
                  f"{run.resumed.stage + 1}, iteration {run.resumed.stage_step})")
    step = loop(run, process)
    if step is None:
        return 1
    if process.ddp:
        dist.destroy_process_group()
    if process.master:
        finish(run, step)
    return 0


def main(argv=None):
    """Train; returns the exit code: 0 done, 1 stopped on a NaN or inf loss, 2 bad input."""
    try:
        return train(*parse_args(sys.argv[1:] if argv is None else argv))
    except BadInput as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
