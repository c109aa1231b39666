"""
Speed benchmarks of VideoMAR's efficiency claims, measured side by side in one run on one device,
reported as ratios (this machine is shared and noisy: medians and ratios, not absolute seconds).

    python bench.py                        # CPU here; --device cuda where there is one
    python bench.py --threads 1 --repeats 5 --json out/bench.json

1. KV cache (Table 2): generate 1 + 6 latent frames (64 masking steps, 100 diffusion steps, CFG)
   with and without the cache, same model and seed; the ratio; the time of each generated frame.
2. Spatial parallelism (Table 2): steps per frame of masked generation (num_iter) against
   next-token prediction (one step per token), and the time ratio they imply.
3. The diffusion head: one 100-step CFG sampling call for 1, 4, 16 and 64 tokens.
4. Training: tokens/s and achieved FLOP/s of a training step against the matrix-multiply FLOP/s
   measured in the same run (fp32 on CPU, bf16 on GPU).
The model mirrors the paper's proportions at toy size: the transformer, not the head, dominates.
"""
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from data import (ArgumentParser, BadInput, check_writable, device_option, int_at_least,
                  positive_int)
from diffusion import DiffLoss
from model import KVCache, VideoMAR, VideoMARConfig

BENCH_MODEL = dict(latent_channels=48, n_layer=12, n_embd=512, n_head=8, diffloss_d=3,
                   diffloss_w=256, text_dim=384, text_len=16)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, repeats):
    """Median wall time of fn() over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class FrameClock:
    """Passed to VideoMAR.generate as its progress bar: records the time each frame finishes."""

    def __init__(self, device):
        self.device, self.times = device, [time.perf_counter()]

    def update(self, n):
        synchronize(self.device)
        self.times.append(time.perf_counter())

    def frame_times(self):
        return [b - a for a, b in zip(self.times, self.times[1:])]


def bench_kv_cache(model, args, device):
    grid = (args.grid, args.grid)
    cond = torch.randn(1, 1, model.config.latent_channels, *grid, device=device)
    text = torch.randn(1, model.config.text_len, model.config.text_dim, device=device)
    text_mask = torch.ones(1, model.config.text_len, dtype=torch.bool, device=device)
    result = {}
    for cached in (True, False):
        clock = FrameClock(device)
        model.generate(cond, text, text_mask, args.latent_frames, args.num_iter, cfg=3.0,
                       use_kv_cache=cached, generator=torch.Generator(device).manual_seed(0),
                       progress=clock)
        result["cached" if cached else "uncached"] = clock.frame_times()
    cached, uncached = sum(result["cached"]), sum(result["uncached"])
    per_frame = result["cached"]
    return dict(cached_s=cached, uncached_s=uncached, speedup=uncached / cached,
                cached_frame_s=per_frame, uncached_frame_s=result["uncached"],
                cached_last_vs_first=per_frame[-1] / per_frame[0])


def bench_spatial_parallelism(model, args, device):
    """Masked generation takes num_iter steps a frame, next-token prediction one step per token;
    each a cached transformer pass (over the whole frame, or over one token) plus the head on the
    tokens it decides (L / num_iter, or one). Measured at the paper's stage-1 grid, 32 x 32."""
    config, grid = model.config, (args.spatial_grid, args.spatial_grid)
    L = grid[0] * grid[1]
    frame = torch.randn(2, L, config.token_dim, device=device)  # CFG: two rows
    context = model.text_context(torch.randn(2, config.text_len, config.text_dim, device=device),
                                 torch.ones(2, config.text_len, dtype=torch.bool, device=device))
    cache = KVCache(config, 2, 2 * L)
    with torch.no_grad():
        model.forward_frames(frame, None, 0, grid, context, cache, commit=True)  # the given frame
        all_masked = torch.ones_like(frame[..., 0], dtype=torch.bool)

        def masked_step():
            z = model.forward_frames(frame, all_masked, 1, grid, context, cache)
            model.diffloss.sample(z[:, :L // args.num_iter].flatten(0, 1), cfg=3.0)

        def next_token_step():
            z = model.forward_frames(frame[:, :1], None, 1, (1, 1), context, cache)
            model.diffloss.sample(z.flatten(0, 1), cfg=3.0)

        masked = median_time(masked_step, device, args.repeats)
        next_token = median_time(next_token_step, device, args.repeats)
    return dict(tokens_per_frame=L, masked_steps=args.num_iter, ntp_steps=L, masked_step_s=masked,
                ntp_step_s=next_token, implied_speedup=(L * next_token) / (args.num_iter * masked))


def bench_diffusion_head(args, device):
    torch.manual_seed(0)
    head = DiffLoss(48, 256, depth=3, width=256, num_sampling_steps="100").to(device).eval()
    times = {}
    for n in (1, 4, 16, 64):
        z = torch.randn(2 * n, 256, device=device)
        times[n] = median_time(lambda: head.sample(z, temperature=0.95, cfg=3.0), device,
                               args.repeats)
    return {f"{n}_tokens_ms": 1000 * t for n, t in times.items()}


def matmul_flops(device, dtype, size=1024, repeats=5):
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size ** 3 / median_time(lambda: a @ b, device, repeats)


def bench_training(model, args, device):
    config = model.config
    model.train()
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    latents = torch.randn(args.batch_size, args.latent_frames, config.latent_channels, args.grid,
                          args.grid, device=device)
    text = torch.randn(args.batch_size, config.text_len, config.text_dim, device=device)
    text_mask = torch.ones(args.batch_size, config.text_len, dtype=torch.bool, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():  # the last frame as target: every step does the same, largest, work
        with autocast:
            loss = model(latents, text, text_mask, target_frame=args.latent_frames - 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    seconds = median_time(step, device, args.repeats)
    peak = matmul_flops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.eval()
    tokens = args.batch_size * args.latent_frames * args.grid * args.grid
    return dict(step_s=seconds, tokens_per_s=tokens / seconds, step_gflop=flops / 1e9,
                achieved_gflops=flops / seconds / 1e9, matmul_gflops=peak / 1e9,
                utilisation=flops / seconds / peak)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--device", type=device_option,
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--latent_frames", type=int_at_least(2), default=7,
                        help="1 given + 6 generated")
    parser.add_argument("--grid", type=positive_int, default=8,
                        help="tokens per side of a latent frame")
    parser.add_argument("--spatial_grid", type=positive_int, default=32,
                        help="the grid of the spatial-parallelism bench")
    parser.add_argument("--num_iter", type=positive_int, default=64)
    parser.add_argument("--batch_size", type=positive_int, default=4)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.num_iter > args.spatial_grid ** 2:  # each masked step decides L / num_iter tokens
        parser.error(f"--num_iter {args.num_iter} is more steps than the {args.spatial_grid ** 2} "
                     f"tokens of a --spatial_grid {args.spatial_grid} frame")
    if args.json:
        check_writable(args.json)  # now, not after minutes of benchmarks
    return args


def main(argv=None):
    """Benchmark; returns the exit code: 0 done, 2 bad input (one line on stderr)."""
    try:
        args = parse_args(argv)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = VideoMAR(VideoMARConfig(**BENCH_MODEL)).to(device).eval()

    results = dict(device=str(device), threads=args.threads, model=BENCH_MODEL, args=vars(args))
    results["diffusion_head"] = bench_diffusion_head(args, device)
    print("diffusion head, one 100-step CFG call:",
          ", ".join(f"{k} {v:.1f}" for k, v in results["diffusion_head"].items()))
    results["training"] = train = bench_training(model, args, device)
    print(f"training step: {train['step_s']:.3f} s, {train['tokens_per_s']:.0f} tokens/s, "
          f"{train['achieved_gflops']:.1f} GFLOP/s of {train['matmul_gflops']:.1f} matmul "
          f"GFLOP/s = {100 * train['utilisation']:.0f}%")
    results["spatial_parallelism"] = sp = bench_spatial_parallelism(model, args, device)
    print(f"steps per frame: masked {sp['masked_steps']} vs next-token {sp['ntp_steps']}; "
          f"per step {1000 * sp['masked_step_s']:.1f} ms vs {1000 * sp['ntp_step_s']:.1f} ms; "
          f"implied speed-up {sp['implied_speedup']:.1f}x")
    results["kv_cache"] = kv = bench_kv_cache(model, args, device)
    print(f"1 + {args.latent_frames - 1} latent frames: cached {kv['cached_s']:.1f} s, uncached "
          f"{kv['uncached_s']:.1f} s, speed-up {kv['speedup']:.2f}x; cached per frame "
          + " ".join(f"{t:.2f}" for t in kv["cached_frame_s"]))
    print(json.dumps(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
