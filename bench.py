"""
Speed benchmarks of VideoMAR's efficiency claims, measured side by side in one run on one device,
reported as ratios (this machine is shared and noisy: medians and ratios, not absolute seconds).

    python bench.py                        # quick: about a minute on a 2-core CPU
    python bench.py --full                 # the long run: 1 + 6 latent frames, 64 masking steps
    python bench.py --threads 1 --repeats 5 --json out/bench.json
    python bench.py --compile              # the same, torch.compile'd (model.compile_model)
    python bench.py --device cuda

1. The diffusion head: one 100-step CFG sampling call (DiffLoss.sample) for 1, 4, 16 and 64
   tokens; for 1 and 16 tokens also a straight port of MAR's loop (`mar_sample_loop`) in the same
   run and thread count, and how many times as long it takes.
2. Training: tokens/s and achieved FLOP/s of a training step against the matrix-multiply FLOP/s
   measured in the same run (fp32 on CPU, bf16 on GPU).
3. Spatial parallelism (Table 2): steps per frame of masked generation (num_iter) against
   next-token prediction (one step per token), and the time ratio they imply.
4. KV cache (Table 2): generate 1 + n latent frames (CFG, 100 diffusion steps) with and without
   the cache, same model and seed; the speed-up beside its bound for this uncached path (at each
   step of frame f it re-runs the f + 1 frames so far: sum_{f=1..n} (f + 1) / n, 4.5x for n = 6),
   the speed-up of the transformer alone, and the speed-up with the diffusion head's share of a
   step set to that of the paper's 1.4B model (counted in FLOPs); the time of each frame.
The model mirrors the paper's proportions at toy size: the transformer, not the head, dominates.
The quick default and --full run the same model; only the sizes of the runs differ (RUNS).

    python bench.py --tiny_training                     # where the tiny run's minutes go
    python bench.py --tiny_training --batch_size 4 --set n_embd=128 n_head=4

5. --tiny_training, alone: the tiny preset's training step (forward, backward, AdamW) on clips of
   each stage of train.py's curriculum (2, 4, 7 latent frames of 4 x 4 tokens), in ms, and the
   shares of the diffusion head (its loss, forward and backward, on as many rows) and of AdamW's
   step (beside it, the per-tensor loop a CPU gets unless AdamW is fused); --set changes the
   model's options, to price a cheaper step before training with it.
"""
import argparse
import json
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cli import (ArgumentParser, autocast, boolean, check_writable, compute_dtype,
                 default_device, device_option, int_at_least, positive_int)
from errors import BadInput
from model import PRESETS, KVCache, VideoMAR, VideoMARConfig, compile_model

BENCH_MODEL = dict(latent_channels=48, n_layer=12, n_embd=512, n_head=8, diffloss_d=3,
                   diffloss_w=256, text_dim=384, text_len=16, qk_norm=False, all_frames=True)
# Quick, the default, about a minute on 2 CPU cores: 3 generated frames (a bound of 3x) of 16
# masking steps; the spatial bench at 16 x 16 tokens, 16 decided a step as the paper's 1,024 in 64
# steps. The head decides 4 of the 64 tokens a step (--full: 1), so its share of a step is larger:
# the transformer-alone and paper-share speed-ups take it out. --full: the README's long run.
RUNS = dict(quick=dict(latent_frames=4, num_iter=16, spatial_grid=16, repeats=1, batch_size=2),
            full=dict(latent_frames=7, num_iter=64, spatial_grid=32, repeats=3, batch_size=4))


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


class Stopwatch:
    """Stands in for `fn` and times its calls: their wall time in all (`seconds`) and when each
    ended (`ends`). As generate's sampler it times the diffusion head's part of a generation, to
    tell it from the transformer's; as a model's generate_frame, when each frame is done."""

    def __init__(self, fn, device):
        self.fn, self.device, self.seconds, self.ends = fn, device, 0.0, []

    def __call__(self, *args, **kwargs):
        synchronize(self.device)
        start = time.perf_counter()
        result = self.fn(*args, **kwargs)
        synchronize(self.device)
        self.ends.append(time.perf_counter())
        self.seconds += self.ends[-1] - start
        return result


@torch.no_grad()
def mar_sample_loop(head, z, temperature, cfg, noise=None, generator=None):
    """A straight port of MAR's DiffLoss.sample with CFG, the loop DiffLoss.sample improves on:
    ADM's p_sample_loop over both halves (z: conditional rows, then unconditional), one call of
    the whole denoiser a step through MAR's forward_with_cfg, so the AdaLN modulations are
    recomputed from the timestep at every step, and the step's coefficients gathered per row as
    ADM's _extract_into_tensor does (ADM converts numpy arrays to tensors there each step; here
    they come from the device tensors, which favours this loop). `noise`: the conditional half's
    x_T (n, C)."""
    diffusion, C, n = head.gen_diffusion, head.in_channels, z.shape[0] // 2
    if noise is None:
        noise = torch.randn(n, C, generator=generator, device=z.device)
    x = torch.cat([noise, noise])
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((2 * n,), i, device=z.device)
        half = x[:n]  # forward_with_cfg: both halves denoise the conditional half's x_t
        out = head.net(torch.cat([half, half]), diffusion.timesteps[t], z)
        eps, rest = out[:, :C], out[:, C:]
        cond_eps, uncond_eps = eps.split(n)
        half_eps = uncond_eps + cfg * (cond_eps - uncond_eps)
        out = torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)
        mean, log_variance = diffusion.p_mean_variance(out, x, t)
        # MAR draws noise for both halves and keeps the conditional one; drawing that half's and
        # repeating it gives the same samples as DiffLoss.sample from the same generator
        step_noise = torch.randn(n, C, generator=generator, device=z.device)
        nonzero = (t != 0).float()[:, None]  # no noise at the last step
        x = mean + nonzero * torch.exp(0.5 * log_variance) * temperature * step_noise.repeat(2, 1)
    return x[:n]


def bench_diffusion_head(model, args, device):
    """The bench model's head: one CFG sampling call, DiffLoss.sample against MAR's plain loop."""
    head, fast, plain = model.diffloss, {}, {}
    for n in (1, 4, 16, 64):
        z = torch.randn(2 * n, model.config.n_embd, device=device)  # conditional, unconditional
        fast[n] = median_time(lambda: head.sample(z, temperature=0.95, cfg=3.0), device,
                              args.repeats)
        if n in (1, 16):
            plain[n] = median_time(lambda: mar_sample_loop(head, z, 0.95, 3.0), device,
                                   args.repeats)
    return dict(steps=head.gen_diffusion.num_timesteps,
                sample_ms={n: 1000 * t for n, t in fast.items()},
                mar_loop_ms={n: 1000 * t for n, t in plain.items()},
                mar_loop_vs_sample={n: t / fast[n] for n, t in plain.items()})


def matmul_flops(device, dtype, size=1024, repeats=5):
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size ** 3 / median_time(lambda: a @ b, device, repeats)


def bench_training(model, args, device):
    config = model.config
    model.train()
    latents = torch.randn(args.batch_size, args.latent_frames, config.latent_channels, args.grid,
                          args.grid, device=device)
    text = torch.randn(args.batch_size, config.text_len, config.text_dim, device=device)
    text_mask = torch.ones(args.batch_size, config.text_len, dtype=torch.bool, device=device)
    optimizer = model.configure_optimizers(0.02, 1e-4, (0.9, 0.95), device.type)

    def step():  # every frame a target at once (all_frames): every step does the same work
        with autocast(device):
            loss = model(latents, text, text_mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    seconds = median_time(step, device, args.repeats)
    peak = matmul_flops(device, compute_dtype(device))
    model.eval()
    tokens = args.batch_size * args.latent_frames * args.grid * args.grid
    return dict(step_s=seconds, tokens_per_s=tokens / seconds, step_gflop=flops / 1e9,
                achieved_gflops=flops / seconds / 1e9, matmul_gflops=peak / 1e9,
                utilisation=flops / seconds / peak)


def bench_tiny_training(args, device, latent_frames=(2, 4, 7), text_dim=20):
    """ms per training step of the tiny preset (with args.set) at each stage's clip length, and
    of its diffusion head alone; the one-hot captions' width (text_dim) as train.py gives it."""
    config = VideoMARConfig(**{**PRESETS["tiny"], "text_dim": text_dim, **dict(args.set)})
    model = VideoMAR(config).to(device).train()
    optimizer = model.configure_optimizers(0.02, 1e-4, (0.9, 0.95), device.type)
    B, S, L = args.batch_size, config.text_len, 16
    text = torch.randn(B, S, text_dim, device=device)
    text_mask = torch.ones(B, S, dtype=torch.bool, device=device)
    results = {}
    for T in latent_frames:
        latents = torch.randn(B, T, config.latent_channels, 4, 4, device=device)
        # the head's rows: masked tokens (MAR's ratios average about 0.87) times the noise draws
        rows = round(0.87 * B * T * L) * config.diffusion_batch_mul
        target = torch.randn(rows, config.token_dim, device=device)
        z = torch.randn(rows, config.n_embd, device=device, requires_grad=True)

        def step():
            model(latents, text, text_mask).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step_s = median_time(step, device, args.repeats)
        head_s = median_time(lambda: model.diffloss(target, z).backward(), device, args.repeats)
        model(latents, text, text_mask).backward()  # gradients for the optimisers' steps alone
        optimizer_s = median_time(optimizer.step, device, args.repeats)
        per_tensor = torch.optim.AdamW(model.parameters(), foreach=False, fused=False)
        per_tensor_s = median_time(per_tensor.step, device, args.repeats)
        results[T] = dict(step_ms=1000 * step_s, head_ms=1000 * head_s,
                          optimizer_ms=1000 * optimizer_s, per_tensor_ms=1000 * per_tensor_s)
    return results


def bench_spatial_parallelism(model, args, device):
    """Masked generation takes num_iter steps a frame, next-token prediction one step per token;
    each a cached transformer pass (over the whole frame, or over one token) plus the head on the
    tokens it decides (L / num_iter, or one). --full measures at the paper's stage-1 grid,
    32 x 32."""
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


def paper_head_share(generated_frames, num_iter=64):
    """The diffusion head's share of the FLOPs of a cached masked-generation step of the paper's
    1.4B model (§5.1) at 256 x 256: 32 x 32 = 1,024 tokens a frame, 64 steps a frame (16 tokens a
    step go to the head), 100 diffusion steps, CFG; the transformer's FLOPs averaged over frames
    1 to `generated_frames` (its attention grows with the frames before). Counted by
    torch.utils.flop_counter on the meta device: shapes only, no memory and no arithmetic."""
    config = VideoMARConfig(**PRESETS["videomar"])
    grid, L = (32, 32), 32 * 32
    with torch.device("meta"), torch.no_grad():
        model = VideoMAR(config).eval()
        frame = torch.zeros(2, L, config.token_dim)  # CFG: conditional and unconditional rows
        masked = torch.ones(2, L, dtype=torch.bool)
        text = torch.zeros(2, config.text_len, config.text_dim)
        context = model.text_context(text, torch.ones(2, config.text_len, dtype=torch.bool))
        cache = KVCache(config, 2, (generated_frames + 1) * L)
        transformer = []
        for f in range(1, generated_frames + 1):
            cache.commit(L)  # frame f - 1 is finished: meta tensors have no values, only lengths
            with FlopCounterMode(display=False) as counter:
                z = model.forward_frames(frame, masked, f, grid, context, cache)
            transformer.append(counter.get_total_flops())
        with FlopCounterMode(display=False) as counter:
            model.diffloss.sample(z[:, :L // num_iter].flatten(0, 1), cfg=3.0)
    head = counter.get_total_flops()
    return head / (statistics.mean(transformer) + head)


def bench_kv_cache(model, args, device):
    grid = (args.grid, args.grid)
    cond = torch.randn(1, 1, model.config.latent_channels, *grid, device=device)
    caption = (torch.randn(1, model.config.text_len, model.config.text_dim, device=device),
               torch.ones(1, model.config.text_len, dtype=torch.bool, device=device))
    frame_s, head_s = {}, {}
    for path in ("cached", "uncached"):
        # a warm-up, one step of one frame, so that first-call costs do not land on frame 1
        model.generate(cond, caption, 2, 1, cfg=3.0, use_kv_cache=path == "cached")
        head = Stopwatch(model.diffloss.sample, device)
        frames = Stopwatch(model.generate_frame, device)
        model.generate_frame = frames  # an instance attribute: generate's calls go through it
        start = time.perf_counter()
        try:
            model.generate(cond, caption, args.latent_frames, args.num_iter, cfg=3.0,
                           use_kv_cache=path == "cached",
                           generator=torch.Generator(device).manual_seed(0), sampler=head)
        finally:
            del model.generate_frame
        ends = [start] + frames.ends  # a frame's time holds the commit of the one before it
        frame_s[path] = [b - a for a, b in zip(ends, ends[1:])]
        head_s[path] = head.seconds
    cached, uncached = sum(frame_s["cached"]), sum(frame_s["uncached"])
    n = args.latent_frames - 1
    # At each step of frame f the uncached path re-runs the f + 1 frames so far, the cached path
    # runs frame f alone: the ratio of their work on the linear layers, whose work a step is the
    # same at every frame. (Attention's grows with the frames before, which weighs the later
    # frames' larger ratios more: with it the bound is a little higher.)
    bound = sum(f + 1 for f in range(1, n + 1)) / n
    # the transformer's time: all but the head's (the same calls in both paths)
    cached_transformer = cached - head_s["cached"]
    uncached_transformer = uncached - head_s["uncached"]
    # At the paper's head share s (FLOPs of a cached step of the 1.4B model), the head time h that
    # the measured cached transformer time T_c would go with: h / (T_c + h) = s, so
    # h = s / (1 - s) T_c; the speed-up is then (T_u + h) / (T_c + h), T_u the measured uncached
    # transformer time.
    share = paper_head_share(n)
    h = share / (1 - share) * cached_transformer
    return dict(cached_s=cached, uncached_s=uncached, speedup=uncached / cached, bound=bound,
                head_cached_s=head_s["cached"], head_uncached_s=head_s["uncached"],
                transformer_speedup=uncached_transformer / cached_transformer,
                paper_head_share=share,
                speedup_at_paper_share=(uncached_transformer + h) / (cached_transformer + h),
                cached_frame_s=frame_s["cached"], uncached_frame_s=frame_s["uncached"],
                cached_last_vs_first=frame_s["cached"][-1] / frame_s["cached"][0])


def model_option(text):
    """KEY=VALUE of --set: a VideoMARConfig field and a value of its type."""
    key, _, value = text.partition("=")
    kinds = {f.name: type(f.default) for f in fields(VideoMARConfig)}
    if key not in kinds or not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE of a model option")
    return key, (boolean if kinds[key] is bool else kinds[key])(value)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--full", action="store_true",
                        help="the long run (the README's table) instead of the quick one")
    parser.add_argument("--device", type=device_option, default=default_device())
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    sizes = lambda name: f"(default: {RUNS['quick'][name]}; --full: {RUNS['full'][name]})"
    parser.add_argument("--repeats", type=positive_int,
                        help=f"timed runs, of which the median {sizes('repeats')}")
    parser.add_argument("--latent_frames", type=int_at_least(2),
                        help=f"1 given + the generated ones {sizes('latent_frames')}")
    parser.add_argument("--grid", type=positive_int, default=8,
                        help="tokens per side of a latent frame")
    parser.add_argument("--spatial_grid", type=positive_int,
                        help=f"the grid of the spatial-parallelism bench {sizes('spatial_grid')}")
    parser.add_argument("--num_iter", type=positive_int,
                        help=f"masking steps a frame {sizes('num_iter')}")
    parser.add_argument("--batch_size", type=positive_int,
                        help=f"of the training step {sizes('batch_size')}")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the blocks and the diffusion head first "
                             "(model.compile_model); each timing's warm-up run compiles")
    parser.add_argument("--tiny_training", action="store_true",
                        help="only the tiny preset's training step at each stage's clip length")
    parser.add_argument("--set", nargs="+", default=[], type=model_option, metavar="KEY=VALUE",
                        help="with --tiny_training: model options, e.g. n_embd=128 n_head=4")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.tiny_training and args.batch_size is None:
        args.batch_size = 8  # train.py's
    for name, value in RUNS["full" if args.full else "quick"].items():
        if getattr(args, name) is None:  # the options given win over the run's sizes
            setattr(args, name, value)
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
    if args.tiny_training:
        steps = bench_tiny_training(args, device)
        print(f"tiny training step, batch {args.batch_size}, {device}, {args.threads} threads"
              + (f", {dict(args.set)}" if args.set else "") + ":")
        for T, r in steps.items():
            print(f"  {T} latent frames: {r['step_ms']:.1f} ms a step, of which the diffusion "
                  f"head {r['head_ms']:.1f} ms and AdamW {r['optimizer_ms']:.1f} ms (not fused: "
                  f"{r['per_tensor_ms']:.1f} ms)")
        return 0
    config = VideoMARConfig(**BENCH_MODEL)
    model = VideoMAR(config).to(device).eval()
    if args.compile:
        compile_model(model)
    print(f"{'--full' if args.full else 'quick run (--full: the long one)'}: {config.n_layer} "
          f"layers of width {config.n_embd}, diffusion head {config.diffloss_d} x "
          f"{config.diffloss_w}, {args.grid} x {args.grid} tokens a frame; {device}, "
          f"{args.threads} threads{', compiled' if args.compile else ''}")

    results = dict(device=str(device), threads=args.threads, model=BENCH_MODEL, args=vars(args))
    results["diffusion_head"] = head = bench_diffusion_head(model, args, device)
    slashed = lambda values, form: " / ".join(format(v, form) for v in values)
    print(f"diffusion head, one {head['steps']}-step CFG call: DiffLoss.sample for "
          f"{slashed(head['sample_ms'], 'd')} tokens {slashed(head['sample_ms'].values(), '.1f')} "
          f"ms; MAR's plain loop (modulations every step) for {slashed(head['mar_loop_ms'], 'd')} "
          f"tokens {slashed(head['mar_loop_ms'].values(), '.1f')} ms, "
          f"{slashed(head['mar_loop_vs_sample'].values(), '.1f')} times as long")
    results["training"] = train = bench_training(model, args, device)
    print(f"training step (batch {args.batch_size} x {args.latent_frames} latent frames x "
          f"{args.grid ** 2} tokens): {train['step_s']:.3f} s, {train['tokens_per_s']:.0f} "
          f"tokens/s, {train['achieved_gflops']:.1f} GFLOP/s of {train['matmul_gflops']:.1f} "
          f"GFLOP/s of a matmul = {100 * train['utilisation']:.0f}%")
    results["spatial_parallelism"] = sp = bench_spatial_parallelism(model, args, device)
    print(f"spatial parallelism at {args.spatial_grid} x {args.spatial_grid} tokens a frame: "
          f"masked {sp['masked_steps']} steps vs next-token {sp['ntp_steps']}; a step "
          f"{1000 * sp['masked_step_s']:.1f} ms vs {1000 * sp['ntp_step_s']:.1f} ms; masked "
          f"generation {sp['implied_speedup']:.2f}x faster a frame")
    results["kv_cache"] = kv = bench_kv_cache(model, args, device)
    of_bound = lambda ratio: f"{100 * ratio / kv['bound']:.0f}%"
    print(f"KV cache, 1 + {args.latent_frames - 1} latent frames ({args.num_iter} masking steps "
          f"a frame, CFG 3): cached {kv['cached_s']:.1f} s, uncached {kv['uncached_s']:.1f} s: "
          f"speed-up {kv['speedup']:.2f}x of a bound of {kv['bound']:.2f}x (the uncached path "
          f"re-runs f + 1 frames at each step of frame f) = {of_bound(kv['speedup'])}")
    print(f"  the transformer alone (head time taken out): {kv['transformer_speedup']:.2f}x = "
          f"{of_bound(kv['transformer_speedup'])} of the bound; the head takes "
          f"{100 * kv['head_cached_s'] / kv['cached_s']:.0f}% of the cached run here")
    print(f"  at the paper's head share ({100 * kv['paper_head_share']:.1f}% of a step of the 1.4B "
          f"model at 256 x 256, in FLOPs): {kv['speedup_at_paper_share']:.2f}x = "
          f"{of_bound(kv['speedup_at_paper_share'])} of the bound (Table 2: 3.9x at 1 + 6)")
    print("  seconds per generated frame: cached "
          + " ".join(f"{t:.2f}" for t in kv["cached_frame_s"])
          + f" (last/first {kv['cached_last_vs_first']:.2f}); uncached "
          + " ".join(f"{t:.2f}" for t in kv["uncached_frame_s"]))
    print(json.dumps(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
