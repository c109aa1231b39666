"""
Score a trained VideoMAR at toy scale: image-to-video on held-out clips of the built-in synthetic
set, where the first frame plus the caption determine the whole clip, against the truth, two
baselines ("copy" the first frame, "null_text") and the ceiling of the tokenizer (the truth encoded
and decoded), with PSNR, SSIM and the object metrics of metrics.py. Prints a table; writes
eval.json, plots of PSNR and object presence per frame, a contact sheet and a GIF of truth above
generated. Probes of the model are built here, on top of the method (mean_of_samples). Then
caption steering (metrics.caption_steering): how far the caption moves each object along its way
in the first generated step of image-to-video and, beside it, in the authors' released setting
(two given latent frames), with the true caption, every direction reversed and the null text; and
how often text-to-image draws the caption's colour; and, sampling-free, the head's loss on that
first step with each caption (metrics.caption_likelihood): a model blind to the direction scores
the reversed caption exactly as the true one; and how near the head's mean of that step lies to
the true latents (metrics.first_step_prediction), beside copying frame 0. Last, §4.3's
accumulated error taken apart: per latent step, how many objects stay and how many lost ones
come back (metrics.latent_step_shares), and the repair probe (`repair`): the next latent frame
after a true, faded, speckled or erased one.

Usage:
    python eval.py --ckpt out/ckpt.pt                          # 64 clips: table, out/eval/...
    python eval.py --ckpt out/ckpt.pt --n 16 --num_iter 8      # quicker
    python eval.py --ckpt out/ckpt.pt --temperature 1.0        # Table 4 / 5: a constant temperature
    python eval.py --ckpt out/ckpt.pt --cfg 1.0                # no classifier-free guidance
    python eval.py --ckpt out/ckpt.pt --teacher_forced         # §4.3: the accumulated error
    python eval.py --ckpt out/ckpt.pt --mean_of 16             # probe: the head's mean per token
    python eval.py --ckpt out/ckpt.pt --frames 49              # App. D: more frames than trained
    python eval.py --ckpt out/ckpt.pt --height 32 --width 32   # App. D: a larger grid
    python eval.py --ckpt out/ckpt.pt --seed 1 --out out/eval_seed1
    python eval.py --ckpt out/ckpt.pt --steering false --repair false    # the table only
    # the learning curve: runs of one recipe at several budgets, each scored, then plotted
    python eval.py --learning_curve out/q/eval/eval.json out/eval/eval.json --out assets
    # no checkpoint: held-out clip 1 to start sample.py from (out/held_out_1.png, its first frame,
    # and out/held_out_1.mp4), and its caption
    python eval.py --write_held_out 1 --out out
    # Table 4: train without frame-wise causal attention, or with the "total mask" loss
    # (Eq. 3.1), then score
    python train.py --causal false --out_dir out/no_causal
    python eval.py --ckpt out/no_causal/ckpt.pt --out out/no_causal/eval
    python train.py --causal false --next_frame_loss false --out_dir out/total_mask
"""
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from checkpoint import trained_model
from cli import (ArgumentParser, add_generation_options, boolean, check_writable, int_at_least,
                 positive_int)
from data import SyntheticVideos
from errors import BadInput, first_line
from metrics import (MAX_PSNR, METHODS, STEERING_ROWS, EvalConfig, colour_masks,
                     held_out_batches, model_draw, object_scores, score_held_out_clips,
                     score_steering)
from videoio import save_image_grid, write_video


def table(result):
    """The markdown table printed by the CLI."""
    lines = ["| method | PSNR (dB) | SSIM | PSNR last third | SSIM last third | presence "
             "| presence last third | position error (px) | direction |", "| --- " * 9 + "|"]
    for m in METHODS:
        if m in result:
            r = result[m]
            lines.append(f"| {m} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                         f"{r['psnr_last_third']:.2f} | {r['ssim_last_third']:.3f} | "
                         f"{r['presence']:.1%} | "
                         f"{r['presence_last_third']:.1%} | {r['position_error']:.2f} | "
                         f"{r['direction']:.1%} |")
    return "\n".join(lines)


def steering_table(steering, temporal):
    """The caption-steering table printed by the CLI, and its text-to-image line."""
    two = 2 * temporal
    lines = ["caption steering: each object's displacement along its caption's way (px; +: the "
             "caption's way) and how many of the objects are found",
             f"| drawn from | first generated step (image-to-video: frame 0 to {temporal}) | two "
             f"given latent frames (frame {temporal} to {two}) |", "| --- " * 3 + "|"]
    cell = lambda r: f"{r['along']:+.2f} px ({r['found']:.0%} found)"
    for row in STEERING_ROWS:
        lines.append(f"| {row} | {cell(steering['first_step'][row])} | "
                     f"{cell(steering['two_given'][row])} |")
    colour = steering["text_to_image"]
    lines.append(f"text-to-image (frame 0 from the caption alone): the caption's colour drawn for "
                 f"{colour['true caption']:.0%} of objects, {colour['colours swapped']:.0%} with "
                 f"the caption's colours swapped")
    loss = steering["likelihood"]
    lines.append(f"the head's loss on the first generated step (every token masked, the same "
                 f"noise for each caption): true caption {loss['true caption']:.5f}, reversed "
                 f"{loss['reversed caption']:.5f} "
                 f"({loss['reversed caption'] - loss['true caption']:+.5f}), null text "
                 f"{loss['null text']:.5f}")
    guess = steering["prediction"]
    lines.append(f"latent frame 1 from the true frame 0 (every token masked, the true caption): "
                 f"squared error per value of the head's mean of 8 draws {guess['head_mean']:.3f}, "
                 f"of copying frame 0 {guess['copy']:.3f}, of the frame's mean "
                 f"{guess['variance']:.3f}")
    return "\n".join(lines)


def latent_steps_table(result):
    """Per latent step, the shares of objects kept and brought back (metrics.latent_step_shares),
    for every sampled row and the tokenizer."""
    methods = [m for m in ("model", "teacher_forced", "null_text", "tokenizer") if m in result]
    steps = len(result[methods[0]]["latent_steps"]["stay"])
    shares = lambda xs: " / ".join("-" if math.isnan(x) else f"{x:.0%}" for x in xs)
    lines = [f"per latent step (1 -> 2, ..., {steps} -> {steps + 1}): of the objects present in "
             f"a latent frame the share present in the next, of the absent ones the share back",
             "| method | present stay | absent come back |", "| --- " * 3 + "|"]
    for m in methods:
        kept = result[m]["latent_steps"]
        lines.append(f"| {m} | {shares(kept['stay'])} | {shares(kept['back'])} |")
    return "\n".join(lines)


def repair_table(repair):
    """The repair probe's table: latent frame 2 after each kind of latent frame 1."""
    true = repair["true"]["presence"]
    lines = ["repair: latent frame 2 drawn after the true frame 0 and latent frame 1 given as "
             "below, with the true caption",
             "| latent frame 1 | objects present | of the true context's | position error (px) |",
             "| --- " * 4 + "|"]
    for row, r in repair.items():  # a share of none ("-") where the true context keeps none
        share = "" if row == "tokenizer" else f"{r['presence'] / true:.0%}" if true else "-"
        lines.append(f"| {row} | {r['presence']:.1%} | {share} | {r['position_error']:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The plot of PSNR per frame, drawn with Pillow

COLOURS = {"model": (214, 39, 40), "teacher_forced": (255, 127, 14), "null_text": (31, 119, 180),
           "copy": (127, 127, 127), "tokenizer": (44, 160, 44)}


def legend_lines(names, font, width):
    """The names in the lines of a legend at most `width` pixels wide, each entry a swatch of 20
    pixels, the name and a gap."""
    lines, used = [[]], 0
    for name in names:
        need = 26 + font.getlength(name) + 16
        if lines[-1] and used + need > width:
            lines.append([])
            used = 0
        lines[-1].append(name)
        used += need
    return lines


def plot_curves(path, xs, curves, title, y_label="PSNR (dB)", size=(560, 360), cap=MAX_PSNR,
                y_range=None, x_label="frame"):
    """A line plot of curves {name: [y per x]} against xs, with axes, ticks and, below the x
    axis, off the curves, a legend, as a PNG at `path` (if given) and returned; values at `cap` or
    above run off the top. `y_range` (lo, hi, tick step) fixes the y axis."""
    W, H = size
    font = ImageFont.load_default()
    legend = legend_lines(curves, font, W - 56 - 16)
    left, right, top, bottom = 56, 16, 28, 44 + 16 * len(legend)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    values = [y for ys in curves.values() for y in ys]
    finite = [y for y in values if y < cap] or values  # exact copies (MAX_PSNR) run off the top
    lo, hi, y_step = y_range or (math.floor(min(finite)), math.ceil(max(finite)) + 1, None)
    px = lambda x: left + (x - xs[0]) / max(1, xs[-1] - xs[0]) * (W - left - right)
    py = lambda y: H - bottom - (min(y, hi) - lo) / (hi - lo) * (H - top - bottom)
    draw.line([(left, top), (left, H - bottom), (W - right, H - bottom)], fill="black")
    y_step = y_step or max(1, math.ceil((hi - lo) / 6))
    for y in range(lo, hi + 1, y_step):
        draw.line([(left - 4, py(y)), (left, py(y))], fill="black")
        draw.text((left - 8, py(y)), str(y), fill="black", font=font, anchor="rm")
    x_step = max(1, math.ceil(len(xs) / 12))
    for x in xs[::x_step]:
        draw.line([(px(x), H - bottom), (px(x), H - bottom + 4)], fill="black")
        draw.text((px(x), H - bottom + 6), str(x), fill="black", font=font, anchor="mt")
    draw.text(((left + W - right) / 2, H - bottom + 30), x_label, fill="black", font=font,
              anchor="mm")
    draw.text((8, top - 16), y_label, fill="black", font=font)
    draw.text((W / 2, 8), title, fill="black", font=font, anchor="mt")
    for name, ys in curves.items():
        draw.line([(px(x), py(y)) for x, y in zip(xs, ys)], fill=COLOURS.get(name, (0, 0, 0)),
                  width=2)
    for i, line in enumerate(legend):
        x, y = left, H - bottom + 46 + 16 * i
        for name in line:
            draw.line([(x, y), (x + 20, y)], fill=COLOURS.get(name, (0, 0, 0)), width=2)
            draw.text((x + 26, y), name, fill="black", font=font, anchor="lm")
            x += 26 + font.getlength(name) + 16
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return image


def plot_learning_curve(path, results):
    """What training buys: presence, position error and direction of the free run, of teacher
    forcing and of the tokenizer's ceiling, against the training iterations of runs of one
    recipe, from their eval.json; three panels side by side."""
    results = sorted(results, key=lambda r: r["iterations"])
    xs = [r["iterations"] for r in results]
    methods = [m for m in ("model", "teacher_forced", "tokenizer") if m in results[0]]
    panels = [plot_curves(None, xs, {m: [scale * r[m][key] for r in results] for m in methods},
                          title, y_label, size=(420, 320), cap=math.inf, y_range=y_range,
                          x_label="training iterations")
              for key, title, y_label, scale, y_range in (
                  ("presence", "objects present", "present (%)", 100, (0, 100, 20)),
                  ("position_error", "position error", "pixels", 1, (0, 6, 1)),
                  ("direction", "moves the caption's way", "right (%)", 100, (0, 100, 20)))]
    image = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
    for i, panel in enumerate(panels):
        image.paste(panel, (i * panel.width, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_side_by_side(path, rows, zoom=8):
    """An animated GIF of clips side by side, each truth above its generated video, as the list
    (truth, generated, truth, generated, ...) of (T, 3, H, W); pixels enlarged `zoom` times."""
    truths, generated = torch.cat(rows[0::2], dim=-1), torch.cat(rows[1::2], dim=-1)
    gap = torch.ones(truths.shape[0], 3, 1, truths.shape[-1])
    video = torch.cat([truths, gap, generated], dim=-2)
    write_video(path, F.interpolate(video, scale_factor=zoom, mode="nearest"))


# ----------------------------------------------------------------------------------------------
# A probe of what z holds

def mean_of_samples(sampler, k):
    """The head's sampler made a probe: each token the mean of k draws given the same z, an
    estimate of the head's mean E[x | z]. Where z places an object, the mean has its colour; where
    z leaves it open (object or background), the mean is a blend. So if the objects come back
    under this probe, z holds them and the sampling scatters them; if not, z itself does not.
    (Deterministic DDIM, eta 0, is no such probe: from random noise it draws from the same
    per-token distribution as the ancestral sampler, neither its mode nor its mean.)"""
    def probe(z, temperature, cfg, generator=None):
        draws = [sampler(z, temperature, cfg, generator=generator) for _ in range(k)]
        return torch.stack(draws).mean(0)
    return probe


# ----------------------------------------------------------------------------------------------
# A probe of §4.3's accumulated error: does the model repair a damaged context frame?

DAMAGES = ("true", "faded", "speckled", "erased")


def damage(clip, description, kind, frames, generator):
    """clip (T, 3, H, W) in [-1, 1] with its objects damaged in pixel frames `frames`: "faded",
    every object pixel halfway to the background; "speckled", half of them, at random, set to the
    background; "erased", all of them; "true", none."""
    clip = clip.clone()
    background = torch.tensor(description["background"]).view(3, 1, 1) * 2 - 1
    for o in description["objects"]:
        for t in frames:
            where = colour_masks(clip[t], o["rgb"])
            if kind == "faded":
                clip[t] = torch.where(where, (clip[t] + background) / 2, clip[t])
            elif kind == "speckled":
                where &= torch.rand(where.shape, generator=generator) < 0.5
                clip[t] = torch.where(where, background, clip[t])
            elif kind == "erased":
                clip[t] = torch.where(where, background, clip[t])
    return clip


@torch.no_grad()
def repair(draw, tokenizer, config):
    """Running free, each frame is drawn from the model's own; where one of them lost part of an
    object, does the next frame bring it back from frame 0 and the caption, or carry the loss on?
    On the first config.n held-out clips: the true frame 0 and a latent frame 1 given true, faded,
    speckled or erased (`damage`), then latent frame 2 drawn with the true caption (`draw` as
    metrics.caption_steering's). Per row, of latent frame 2's pixel frames, how often each object
    is present and how far from its true place (metrics.object_scores); the row "tokenizer" is
    the truth encoded and decoded, the ceiling. A model that repairs keeps the damaged rows near
    "true"; one that copies its last frame keeps the damage, and nothing of the erased objects."""
    given, num_frames = tokenizer.pixel_frames(2), tokenizer.pixel_frames(3)
    dataset = SyntheticVideos(num_frames, config.height, config.width, split="test")
    generator = torch.Generator().manual_seed(config.seed)
    scores = {row: ([], []) for row in ("tokenizer",) + DAMAGES}  # presence, position error
    for batch, truth, captions in held_out_batches(dataset, config):
        for row, (presence, error) in scores.items():
            if row == "tokenizer":
                videos = tokenizer.decode(tokenizer.encode(truth)).clamp(-1, 1)
            else:
                context = torch.stack([damage(clip[:given], dataset.describe(i), row,
                                              range(1, given), generator)
                                       for i, clip in zip(batch, truth)])
                videos = draw(context, captions, num_frames, f"repair: {row}")
            for i, video, true in zip(batch, videos.cpu(), truth):
                for o in object_scores(video, true, dataset.describe(i)):
                    presence.append(o["presence"][given - 1:])  # pixel frames given .. end
                    error.append(o["position_error"][given - 1:])
    return {row: dict(presence=torch.cat(p).nanmean().item(),
                      position_error=torch.cat(e).nanmean().item())
            for row, (p, e) in scores.items()}


# ----------------------------------------------------------------------------------------------
# The command line

def parse_args(argv=None):
    parser = ArgumentParser(description="Score a VideoMAR checkpoint on held-out synthetic clips.")
    add_generation_options(parser)
    parser.add_argument("--n", type=positive_int, default=64, help="held-out clips")
    parser.add_argument("--teacher_forced", action="store_true",
                        help="also generate each latent frame from the true earlier ones (a row "
                             "teacher_forced: the accumulated error of §4.3 is its gap to model)")
    parser.add_argument("--mean_of", type=positive_int, default=1,
                        help="a probe of what z holds: each token the mean of this many draws of "
                             "the diffusion head (its mean given z), not one draw")
    parser.add_argument("--steering", type=boolean, nargs="?", const=True, default=True,
                        metavar="true|false",
                        help="the caption-steering table: how far the true, reversed and null "
                             "caption move objects in the first generated step")
    parser.add_argument("--repair", type=boolean, nargs="?", const=True, default=True,
                        metavar="true|false",
                        help="the repair probe: the next latent frame after a true, faded, "
                             "speckled or erased one (the objects kept or brought back)")
    parser.add_argument("--learning_curve", nargs="+", metavar="EVAL_JSON",
                        help="no evaluation: plot the eval.json of runs of one recipe at several "
                             "budgets against their training iterations (--out/learning_curve.png)")
    parser.add_argument("--write_held_out", type=int_at_least(0), metavar="N",
                        help="no evaluation: write held-out clip N into --out, its first frame "
                             "held_out_N.png and the clip held_out_N.mp4 (--frames, --height, "
                             "--width; default 25 of 16x16), and print its caption")
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--out", default="out/eval",
                        help="directory for eval.json, psnr.png, presence.png, grid.png and "
                             "truth_vs_generated.gif")
    return parser.parse_args(argv)


def evaluate(args):
    check_writable(args.out, directory=True)
    # image-to-video: one given latent frame, clips in batches
    trained = trained_model(args.ckpt, args.device, args.frames, args.height, args.width,
                            batch=min(args.n, args.batch_size), cfg=args.cfg,
                            num_iter=args.num_iter, given=1)
    model, tokenizer, text_encoder = trained.model, trained.tokenizer, trained.text_encoder
    num_frames, height, width = trained.num_frames, trained.height, trained.width
    train_config, num_iter, cfg = trained.train_config, trained.num_iter, trained.cfg
    if args.teacher_forced and not model.config.next_frame_loss:
        raise BadInput("--teacher_forced needs a model trained frame by frame; this one has the "
                       "total-mask loss (--next_frame_loss false), sampled as a whole video")
    sampler = None
    if args.mean_of > 1:
        sampler = mean_of_samples(model.diffloss.sampler(tokenizer.clip_range), args.mean_of)

    config = EvalConfig(
        n=args.n, num_frames=num_frames, height=height, width=width, num_iter=num_iter,
        cfg=cfg, temperature=args.temperature, sampler=sampler, seed=args.seed,
        batch_size=args.batch_size, teacher_forced=args.teacher_forced)
    result = score_held_out_clips(model, tokenizer, text_encoder, config)
    if args.steering:
        result["steering"] = score_steering(model, tokenizer, text_encoder, config)
    if args.repair:
        result["repair"] = repair(model_draw(model, tokenizer, text_encoder, config), tokenizer,
                                  config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = [video.cpu() for video in result.pop("grid")]
    save_image_grid(out / "grid.png", grid)
    write_side_by_side(out / "truth_vs_generated.gif", grid)
    result["ckpt"], result["mean_of"] = str(args.ckpt), args.mean_of
    result["iterations"] = sum(train_config["stage_iters"])
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    trained = (f"trained at {train_config['height']}x{train_config['width']}, "
               f"{train_config['frames'][-1]} frames")
    plot_curves(out / "psnr.png", result["frames"],
                {m: result[m]["psnr_per_frame"] for m in METHODS if m in result},
                f"PSNR per frame, {args.n} held-out clips, {num_frames} frames {height}x{width} "
                f"({trained})")
    plot_curves(out / "presence.png", result["frames"],
                {m: [100 * p for p in result[m]["presence_per_frame"]] for m in METHODS
                 if m in result},
                f"objects present per frame, {args.n} held-out clips ({trained})", "present (%)",
                cap=math.inf, y_range=(0, 100, 20))
    print(f"{args.ckpt}: {args.n} held-out clips, {num_frames} frames of {height}x{width} "
          f"({trained}), num_iter {num_iter}, cfg {cfg}, "
          f"temperature {args.temperature}, seed {args.seed}"
          + (f", each token the mean of {args.mean_of} draws" if args.mean_of > 1 else ""))
    print(table(result))
    print(latent_steps_table(result))
    if args.steering:
        print(steering_table(result["steering"], tokenizer.temporal))
    if args.repair:
        print(repair_table(result["repair"]))
    print(f"wrote {out / 'eval.json'}, {out / 'psnr.png'}, {out / 'presence.png'}, "
          f"{out / 'grid.png'} and {out / 'truth_vs_generated.gif'}")


def learning_curve(args):
    """The learning curve of several runs' eval.json: a plot, and a table on stdout."""
    results = []
    for path in args.learning_curve:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read {path}: {first_line(e)}") from None
        if "iterations" not in results[-1]:
            raise BadInput(f"{path} is not an eval.json of eval.py (no training iterations)")
    out = Path(args.out)
    check_writable(out, directory=True)
    plot_learning_curve(out / "learning_curve.png", results)
    print("| iterations | presence: free run / teacher-forced | position error (px) "
          "| direction |\n| --- | --- | --- | --- |")
    for r in sorted(results, key=lambda r: r["iterations"]):
        m, t = r["model"], r.get("teacher_forced", r["model"])
        print(f"| {r['iterations']} | {m['presence']:.1%} / {t['presence']:.1%} | "
              f"{m['position_error']:.2f} / {t['position_error']:.2f} | "
              f"{m['direction']:.1%} / {t['direction']:.1%} |")
    print(f"wrote {out / 'learning_curve.png'}")


def write_held_out(args):
    """A held-out clip of the synthetic set to sample from (sample.py --image, --video): its first
    frame as an image and the clip as a video, in --out; its caption on stdout."""
    default = EvalConfig()
    dataset = SyntheticVideos(args.frames or default.num_frames, args.height or default.height,
                              args.width or default.width, split="test")
    n = args.write_held_out
    if n >= len(dataset):
        raise BadInput(f"--write_held_out {n}: there are {len(dataset)} held-out clips, 0 to "
                       f"{len(dataset) - 1}")
    out = Path(args.out)
    check_writable(out, directory=True)
    clip, caption = dataset[n]
    out.mkdir(parents=True, exist_ok=True)
    save_image_grid(out / f"held_out_{n}.png", [clip[:1]])
    write_video(out / f"held_out_{n}.mp4", clip)
    print(caption)
    print(f"wrote {out / f'held_out_{n}.png'} and {out / f'held_out_{n}.mp4'}")


def main(argv=None):
    """Evaluate; returns the exit code: 0 done, 2 bad input (one line on stderr)."""
    try:
        args = parse_args(argv)
        if args.learning_curve:
            learning_curve(args)
        elif args.write_held_out is not None:
            write_held_out(args)
        else:
            evaluate(args)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
