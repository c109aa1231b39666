"""
Train VideoMAR: the temporal short-to-long curriculum and progressive resolution of §4.2, with the
optimiser of §5.1, on one process or many (DDP through torchrun).

Usage:
    python train.py                                    # tiny preset, built-in synthetic videos, CPU, minutes
    python train.py --frames 5,13 --stage_iters 300,100 --batch_size 16 --lr 5e-4
    python train.py --resume                           # continue out/ckpt.pt inside its stage
    python train.py --data path/to/videos --frame_stride 2     # a folder of videos with captions
    # §4.2 progressive resolution, stage 2: weights only, new optimiser, new size (and tokenizer)
    python train.py --init_from out/ckpt.pt --out_dir out64 --height 64 --width 64 --frames 25 --stage_iters 200

    # the paper's 1.4B model (§5.1) on one node of 8 GPUs
    torchrun --nproc_per_node=8 train.py --preset videomar --data /videos \\
        --tokenizer cosmos:/ckpt/Cosmos-Tokenizer-CV4x8x8 --text_encoder /ckpt/Qwen2-1.5B
    # several nodes: the same command on every node, with its own --node_rank
    torchrun --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 --nproc_per_node=8 train.py --preset videomar ...
    torchrun --nnodes=2 --node_rank=1 --master_addr=10.0.0.1 --master_port=29500 --nproc_per_node=8 train.py --preset videomar ...
    # DDP on CPU (Gloo)
    torchrun --nproc_per_node=2 train.py --device cpu

Every field of TrainConfig and of model.VideoMARConfig is an option: --key value or --key=value
(booleans also bare: --resume). Preset values come first, then the command line. --resume also
restores the run's options from the checkpoint; options given again override them.
The learning rate warms up linearly for warmup_iters, then follows a cosine to min_lr over the
whole curriculum (min_lr = lr gives MAR's constant rate, as the videomar preset does).
"""
import itertools
import math
import os
import sys
import time
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data import (BadInput, PCATokenizer, SyntheticVideos, TextEncoder, VideoFolder, load_tokenizer,
                  save_image_grid, write_video)
from eval import evaluate, summary
from model import PRESETS, VideoMARConfig
from sample import build_model, generate, generate_total_mask, load_checkpoint, model_from_config


@dataclass
class TrainConfig:
    preset: str = "tiny"  # "tiny" (these defaults) or "videomar" (TRAIN_PRESETS below)
    # data and the frozen encoders
    data: str = "synthetic"  # or a folder of videos with captions (data.VideoFolder)
    frame_stride: int = 1  # for folders: take every n-th frame
    num_workers: int = 0
    height: int = 16  # tiny: 16x16 in 4x4x4 patches, 16 tokens of 192 values per latent frame (see below)
    width: int = 16
    tokenizer: str = "patch:4x4x4"  # or "cosmos:/path/to/Cosmos-Tokenizer-CV4x8x8"
    text_encoder: str = None  # None: the packaged all-MiniLM-L6-v2; else a Hugging Face name or path
    # §4.2 temporal short-to-long curriculum: one stage per clip length (pixel frames), in this order
    frames: str = "5,13,25"
    stage_iters: str = "2400,1200,750"  # about 14 minutes on one busy CPU core
    # optimisation (§5.1: AdamW, betas (0.9, 0.95), weight decay 0.02)
    batch_size: int = 8  # per process
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 50
    weight_decay: float = 0.02
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    # the run
    out_dir: str = "out"
    log_interval: int = 50
    ckpt_interval: int = 200  # iterations between checkpoints
    resume: bool = False  # continue from out_dir/ckpt.pt
    init_from: str = None  # a checkpoint: its weights only, a new run (§4.2 progressive resolution)
    seed: int = 0
    device: str = None  # None: cuda if available, else cpu
    # the sample written at the end
    sample_num_iter: int = 16  # masked-generation steps per frame (64 in the paper)
    sample_cfg: float = 3.0


TRAIN_PRESETS = {
    # the TrainConfig defaults: trains on a 2-core CPU in minutes. 16x16 with 4x4x4 patches rather than
    # 32x32 (64 tokens per frame) or 16x16 with 4x2x2 patches (64 tokens of 48): 3.8x cheaper steps, so
    # 3x the iterations in the same time, and only that beat copying the first frame (eval.py)
    "tiny": {},
    # §5.1: 256x256, Cosmos CV4x8x8, Qwen2-1.5B (both paths required), AdamW (0.9, 0.95), weight decay 0.02,
    # lr 1e-4 throughout. Not given by the paper, so MAR's: warm-up, clipping 3.0, EMA 0.9999; batch and iterations ours.
    "videomar": dict(height=256, width=256, tokenizer=None, text_encoder=None, batch_size=8, lr=1e-4, min_lr=1e-4,
                     warmup_iters=5000, grad_clip=3.0, ema_decay=0.9999, stage_iters="200000,100000,50000",
                     log_interval=100, ckpt_interval=2000, num_workers=8, sample_num_iter=64),
}
RUN_KEYS = ("out_dir", "resume", "init_from", "device")  # options of one invocation, never restored by --resume


# -----------------------------------------------------------------------------
# Command line

# what the numeric options must be, checked as they are parsed: before anything is loaded, and
# before a bad value turns into a NaN loss or a silently frozen run minutes later
POSITIVE = (lambda x: x > 0, "positive")
AT_LEAST_0 = (lambda x: x >= 0, "at least 0")
AT_LEAST_1 = (lambda x: x >= 1, "at least 1")
FRACTION = (lambda x: 0 <= x <= 1, "in [0, 1]")
BELOW_1 = (lambda x: 0 <= x < 1, "in [0, 1)")  # a decay or momentum of 1 never moves
LIMITS = dict(
    lr=POSITIVE, min_lr=AT_LEAST_0, warmup_iters=AT_LEAST_0, weight_decay=AT_LEAST_0,
    betas=(lambda b: len(b) == 2 and all(BELOW_1[0](x) for x in b), "two numbers in [0, 1)"),
    grad_clip=(AT_LEAST_0[0], "at least 0 (0: no clipping)"), ema_decay=BELOW_1,
    frame_stride=AT_LEAST_1, num_workers=AT_LEAST_0, sample_num_iter=AT_LEAST_1,
    sample_cfg=AT_LEAST_0, text_drop_prob=FRACTION, mask_ratio_min=FRACTION,
    mask_ratio_std=(lambda x: 0 < x <= 1, "in (0, 1]"),
)


def parse_value(key, value, kind):
    try:
        if kind is bool:
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.lower()]
        if kind is tuple:
            parsed = tuple(float(v) for v in value.split(","))
        else:
            parsed = kind(value)
    except (KeyError, ValueError):
        raise BadInput(f"--{key} {value!r}: expected {kind.__name__}") from None
    if key in LIMITS:
        test, what = LIMITS[key]
        numbers = parsed if kind is tuple else (parsed,)
        if not (all(math.isfinite(x) for x in numbers) and test(parsed)):  # inf and NaN: never
            raise BadInput(f"--{key} {value!r}: must be {what}")
    return parsed


def parse_args(argv):
    """--key value, --key=value, bare --flag for booleans -> (TrainConfig overrides, VideoMARConfig overrides)."""
    kinds = {f.name: f.type for cls in (TrainConfig, VideoMARConfig) for f in fields(cls)}
    overrides, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        key, has_value, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in kinds:
            raise BadInput(f"unknown option {arg!r}: options are the fields of TrainConfig and VideoMARConfig, as --key value")
        if not has_value:
            if kinds[key] is bool and (not args or args[0].startswith("--")):
                value = "true"
            elif not args:
                raise BadInput(f"--{key} needs a value")
            else:
                value = args.pop(0)
        overrides[key] = parse_value(key, value, kinds[key])
    model_keys = {f.name for f in fields(VideoMARConfig)}
    return ({k: v for k, v in overrides.items() if k not in model_keys},
            {k: v for k, v in overrides.items() if k in model_keys})


def make_config(cli, saved=None):
    """Preset values, then the checkpoint's options when resuming, then the command line."""
    saved = {k: v for k, v in (saved or {}).items() if k not in RUN_KEYS and k in TrainConfig.__dataclass_fields__}
    preset = cli.get("preset", saved.get("preset", "tiny"))
    if preset not in TRAIN_PRESETS:
        raise BadInput(f"unknown preset {preset!r}: use one of {', '.join(TRAIN_PRESETS)}")
    config = TrainConfig(**{**TRAIN_PRESETS[preset], **saved, **cli})
    if preset == "videomar" and (config.tokenizer is None or config.text_encoder is None):
        raise BadInput("--preset videomar needs --tokenizer cosmos:/path/to/Cosmos-Tokenizer-CV4x8x8 "
                       "and --text_encoder /path/to/Qwen2-1.5B")
    if config.resume and config.init_from:
        raise BadInput("--resume continues a run and --init_from starts a new one: give only one")
    if min(config.batch_size, config.log_interval, config.ckpt_interval) < 1:
        raise BadInput("--batch_size, --log_interval and --ckpt_interval must be at least 1")
    return config


def curriculum(config, tokenizer):
    """[(pixel frames, iterations)] of the §4.2 temporal short-to-long curriculum, checked against the tokenizer."""
    try:
        frames = [int(f) for f in config.frames.split(",")]
        iters = [int(n) for n in config.stage_iters.split(",")]
    except ValueError:
        raise BadInput(f"--frames {config.frames!r} and --stage_iters {config.stage_iters!r} must be lists of integers") from None
    if len(frames) != len(iters) or min(iters) < 0:
        raise BadInput(f"--stage_iters {config.stage_iters!r} needs one count >= 0 for each of --frames {config.frames!r}")
    for n in frames:
        tokenizer.latent_frames(n)  # BadInput for a length the tokenizer cannot take
    tokenizer.check_size(config.height, config.width)
    return list(zip(frames, iters))


# -----------------------------------------------------------------------------
# Checkpoints: written atomically, the configs as plain data (read back by sample.load_checkpoint)

def save_checkpoint(path, ckpt):
    """torch.save to a temporary file beside `path`, fsync, then rename: a kill at any moment leaves
    either the old checkpoint or the new one, never a torn file."""
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


# -----------------------------------------------------------------------------
# Pieces of the training loop

def fit_tokenizer(tokenizer, dataset, config, verbose, num_clips=512):
    """Fit a PCA tokenizer on clips of the longest stage, the same on every rank (a fixed draw)."""
    generator = torch.Generator().manual_seed(config.seed)
    picks = torch.randperm(len(dataset), generator=generator)[:num_clips].tolist()
    videos = torch.stack([dataset[i][0] for i in tqdm(picks, desc="fit tokenizer", leave=False, disable=not verbose)])
    kept = tokenizer.fit(videos)
    if verbose:
        print(f"tokenizer {config.tokenizer}: fitted on {len(picks)} clips, keeps {kept:.1%} of the patch variance")


def make_dataset(config, num_frames):
    if config.data == "synthetic":
        return SyntheticVideos(num_frames, config.height, config.width, split="train", seed=config.seed)
    # quiet: every stage reads the same folder, so report_skipped says it once for all of them
    return VideoFolder(config.data, num_frames, config.height, config.width, config.frame_stride,
                       log=False)


def report_skipped(stages, datasets):
    """Each video a data folder skips, once and plainly, on stderr (an unreadable one fails every
    stage, a short one perhaps only the later ones); then how many each stage skipped."""
    for reason in dict.fromkeys(r for d in datasets for r in d.skip_reasons):
        print(f"skipping {reason}", file=sys.stderr)
    largest = max(datasets, key=len)  # the shortest clips: the most videos long enough
    if largest.uncaptioned:
        print(largest.caption_note(), file=sys.stderr)
    counts = ", ".join(f"{d.skipped} of {d.skipped + len(d)} for clips of {n} frames"
                       for (n, _), d in zip(stages, datasets))
    print(f"data {datasets[0].root}: skipped {counts}")


def batches(dataset, batch_size, rank, world_size, seed, num_workers=0):
    """Endless (videos, captions) batches; each rank draws its own share of every epoch's shuffle."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def make_optimizer(model, config, device_type):
    """AdamW (§5.1); weight decay on 2-D weight matrices only: not on biases, norms, mask_token, null_text."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() == 2], weight_decay=config.weight_decay),
              dict(params=[p for p in params if p.dim() != 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=device_type == "cuda")


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
    num_latent = tokenizer.latent_frames(len(clip))
    with tqdm(total=num_latent - 1, desc="sample", leave=False) as bar:
        options = dict(num_iter=config.sample_num_iter, cfg=config.sample_cfg, generator=generator,
                       clip_range=tokenizer.clip_range, progress=bar)
        if ema.config.next_frame_loss:
            latents = generate(ema, cond, text_encoder([caption]), num_latent, use_kv_cache=ema.config.causal, **options)
        else:  # the "total mask" baseline of Table 4 samples the whole video at once
            latents = generate_total_mask(ema, cond, text_encoder([caption]), num_latent, **options)
    video = tokenizer.decode(latents)[0].clamp(-1, 1).cpu()
    write_video(out_dir / "sample.mp4", video)
    save_image_grid(out_dir / "sample.png", [clip, video])
    tqdm.write(f"sample of {caption!r} written to {out_dir / 'sample.mp4'} and {out_dir / 'sample.png'}")


# -----------------------------------------------------------------------------
# Training

def train(cli, model_cli):
    # DDP when launched by torchrun: one process per device, NCCL on GPUs, Gloo on CPUs
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    master = rank == 0
    device = cli.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = device.split(":")[0]
    if device_type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: CUDA is not available here; use --device cpu")
    if ddp and device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")

    # the run's options, and the checkpoint it starts from: its own (--resume) or another's (--init_from)
    out_dir = Path(cli.get("out_dir", TrainConfig.out_dir))
    resumed = load_checkpoint(out_dir / "ckpt.pt") if cli.get("resume") else None
    config = make_config(cli, resumed["train"] if resumed else None)
    source = resumed or (load_checkpoint(config.init_from) if config.init_from else None)
    same_tokenizer = source is not None and source["train"]["tokenizer"] == config.tokenizer
    tokenizer = load_tokenizer(config.tokenizer, device, source.get("tokenizer") if same_tokenizer else None)
    stages = curriculum(config, tokenizer)
    datasets = [make_dataset(config, num_frames) for num_frames, _ in stages]  # a bad data folder fails here, early
    if isinstance(tokenizer, PCATokenizer) and tokenizer.basis is None:  # fitted on the data, once
        fit_tokenizer(tokenizer, datasets[-1], config, master)
    if master and config.data != "synthetic":
        report_skipped(stages, datasets)

    # the model: fresh from the preset and sized by the frozen encoders, or the source's; then the command line
    model_config = dict(source["config"]) if source else asdict(VideoMARConfig(**PRESETS[config.preset]))
    if source is None:
        model_config["latent_channels"] = tokenizer.channels
    model_config.update(model_cli)
    origin = f"the checkpoint {config.init_from or out_dir / 'ckpt.pt'}" if source else "the model"
    if model_config["latent_channels"] != tokenizer.channels:  # §4.2: stage 2 needs the same latent token size
        raise BadInput(f"{origin} takes latents of {model_config['latent_channels']} channels, but tokenizer "
                       f"{config.tokenizer} makes {tokenizer.channels}: the latent token size must match")
    text_encoder = TextEncoder(config.text_encoder, max_length=model_config["text_len"], device=device)
    if source is None:
        model_config["text_dim"] = model_cli.get("text_dim", text_encoder.dim)
    if model_config["text_dim"] != text_encoder.dim:
        raise BadInput(f"{origin} takes text of width {model_config['text_dim']}, but the text encoder gives {text_encoder.dim}")

    torch.manual_seed(config.seed)
    if source is None:
        model = model_from_config(model_config)
        ema = deepcopy(model)
    else:  # the EMA restarts from the raw weights in a new run (--init_from)
        model = build_model({**source, "config": model_config}, use_ema=False).train()
        ema = build_model({**source, "config": model_config}, use_ema=resumed is not None)
    model.to(device)
    ema.to(device).eval().requires_grad_(False)
    optimizer = make_optimizer(model, config, device_type)
    stage, stage_step, step = 0, 0, 0
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        stage, stage_step, step = resumed["stage"], resumed["stage_step"], resumed["step"]
    raw_model = model
    if ddp:
        model = DistributedDataParallel(model, device_ids=[local_rank] if device_type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    torch.manual_seed(config.seed + rank)  # each rank its own masks, target frames and noise

    ckpt_path = out_dir / "ckpt.pt"

    def save(stage, stage_step, step):
        save_checkpoint(ckpt_path, dict(config=asdict(raw_model.config), train=asdict(config),
                                        tokenizer=tokenizer.state() if hasattr(tokenizer, "state") else None,
                                        model=raw_model.state_dict(), ema=ema.state_dict(),
                                        optimizer=optimizer.state_dict(), stage=stage, stage_step=stage_step, step=step))

    total_iters = sum(iters for _, iters in stages)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"{sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters | {world_size} process(es) "
              f"on {device} | {config.height}x{config.width} | curriculum {config.frames} x {config.stage_iters} iterations")
        if resumed:
            print(f"resuming {ckpt_path} at step {step} (stage {stage + 1}, iteration {stage_step})")

    for stage in range(stage, len(stages)):  # §4.2 temporal short-to-long curriculum: short clips first
        num_frames, iters = stages[stage]
        if stage_step >= iters:
            stage_step = 0
            continue
        # a resumed stage draws a fresh order rather than the clips it saw before the interruption
        stream = batches(datasets[stage], config.batch_size, rank, world_size, config.seed + step, config.num_workers)
        bar = tqdm(total=iters, initial=stage_step, disable=not master,
                   desc=f"stage {stage + 1}/{len(stages)}: {num_frames} frames")
        losses, tokens, last_log = [], 0, time.time()
        for stage_step in range(stage_step, iters):
            lr = learning_rate(step, config, total_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            videos, captions = next(stream)
            with torch.no_grad():  # the frozen encoders
                latents = tokenizer.encode(videos.to(device))
                text, text_mask = text_encoder(captions)
            with autocast:
                loss = model(latents, text, text_mask)  # §4.1 next-frame diffusion loss
            # every rank needs the same verdict on a NaN, so the loss is averaged first (one small all-reduce)
            mean_loss = loss.detach().float().clone()
            if ddp:
                dist.all_reduce(mean_loss)
                mean_loss /= world_size
            if not torch.isfinite(mean_loss):
                bar.close()
                kept = f"last good checkpoint {ckpt_path} kept" if ckpt_path.exists() else "no checkpoint written yet"
                if master:
                    print(f"loss is {mean_loss.item()} at step {step + 1}; stopping, {kept}", file=sys.stderr)
                return 1
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_ema(ema, raw_model, config.ema_decay)
            step += 1
            bar.update()
            losses.append(mean_loss.item())
            tokens += latents.shape[0] * latents.shape[1] * latents.shape[3] * latents.shape[4] * world_size
            if master and step % config.log_interval == 0:
                now = time.time()
                bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
                tqdm.write(f"step {step} | stage {stage + 1}/{len(stages)} | frames {num_frames} | "
                           f"loss {sum(losses) / len(losses):.4f} | lr {lr:.2e} | {tokens / (now - last_log):.0f} tokens/s")
                losses, tokens, last_log = [], 0, now
            if master and step % config.ckpt_interval == 0:
                save(stage, stage_step + 1, step)
        bar.close()
        stage_step = 0

    if ddp:
        dist.destroy_process_group()
    if not master:
        return 0
    last_stage = len(stages) - 1
    save(last_stage, stages[last_stage][1], step)
    print(f"step {step}: checkpoint written to {ckpt_path}")
    num_frames = stages[last_stage][0]
    if config.data == "synthetic":  # held out: the test split draws from other seeds
        clip, caption = SyntheticVideos(num_frames, config.height, config.width, split="test", seed=config.seed)[0]
    else:  # a real folder has no held-out split: its first video
        clip, caption = datasets[last_stage][0]
    write_sample(ema, tokenizer, text_encoder, clip, caption, config, out_dir)
    if config.data == "synthetic":  # a quick score on held-out clips; `python eval.py` for the full one
        print(summary(evaluate(ema, tokenizer, text_encoder, 16, num_frames, config.height, config.width,
                               config.sample_num_iter, config.sample_cfg, seed=config.seed, null_text=False, keep=0)))
    return 0


def main(argv=None):
    """Train; returns the exit code: 0 done, 1 stopped on a NaN or inf loss, 2 bad input."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    try:
        return train(*parse_args(argv))
    except BadInput as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
