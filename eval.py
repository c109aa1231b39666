"""
Quality at toy scale: generated clips against the true ones, on the held-out split of the built-in
synthetic set, where the first frame plus the caption determine the whole clip (data.SyntheticVideos).

For each held-out clip: image-to-video from its first frame and caption with the EMA weights, then
the squared error and SSIM of every generated pixel frame against the truth. Two baselines on the
same clips: "copy" repeats the first frame (a model that learnt nothing about motion), "null_text"
is the model with the caption replaced by the null text (it sees the image, not what moves where).
A PSNR here is that of the mean squared error over the clips (and frames) it summarises: objects
bounce, so some frames equal the first one exactly and the copy baseline's PSNR there is infinite;
a mean of per-frame PSNRs would be ruled by those frames. SSIM is the mean over frames and clips.

Usage:
    python eval.py --ckpt out/ckpt.pt                          # 64 clips: table, out/eval/{eval.json,psnr.png,presence.png,grid.png,truth_vs_generated.gif}
    python eval.py --ckpt out/ckpt.pt --n 16 --num_iter 8      # quicker
    python eval.py --ckpt out/ckpt.pt --temperature 1.0        # Table 4 / Table 5: a constant temperature
    python eval.py --ckpt out/ckpt.pt --cfg 1.0                # no classifier-free guidance
    python eval.py --ckpt out/ckpt.pt --frames 49              # Appendix D: more frames than trained
    python eval.py --ckpt out/ckpt.pt --height 32 --width 32   # Appendix D: a larger grid than trained
    python eval.py --ckpt out/ckpt.pt --seed 1 --out out/eval_seed1
    # Table 4: train without frame-wise causal attention, or with the "total mask" loss (Eq. 3.1), then score
    python train.py --causal false --out_dir out/no_causal && python eval.py --ckpt out/no_causal/ckpt.pt --out out/no_causal/eval
    python train.py --causal false --next_frame_loss false --out_dir out/total_mask

From Python (train.py does this at the end of a run):
    result = evaluate(model, tokenizer, text_encoder, n=16, num_frames=25, height=16, width=16)
    result["model"]["psnr"], result["copy"]["psnr"]            # dB, of the mean error over clips and frames
"""
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from data import BadInput, SyntheticVideos, save_image_grid, write_video
from sample import (ArgumentParser, add_generation_options, check_writable, generate, generate_total_mask,
                    positive_int, trained_model)

METHODS = ("model", "null_text", "copy")
MAX_PSNR = 50.0  # dB: what a zero error counts as, rather than infinity


# ----------------------------------------------------------------------------------------------
# The metrics, on images in [0, 1] of shape (N, 3, H, W), one value per image

def mse(x, y):
    return (x - y).pow(2).flatten(1).mean(1)


def psnr(mean_squared_error):
    """Peak signal-to-noise ratio in dB (peak 1) of a mean squared error, capped at MAX_PSNR."""
    return (10 * torch.log10(1 / mean_squared_error)).clamp(max=MAX_PSNR)


def gaussian_window(size=11, sigma=1.5):
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x, y, window_size=11, sigma=1.5):
    """Structural similarity (Wang et al. 2004): local means, variances and covariance under an
    11 x 11 Gaussian window (sigma 1.5), only where the window fits the image, averaged over
    positions and channels. C1 = (0.01)^2 and C2 = (0.03)^2 for a data range of 1."""
    C1, C2 = 0.01 ** 2, 0.03 ** 2
    x, y = x.double(), y.double()  # E[x^2] - E[x]^2 in float32 loses the small variances to rounding
    channels = x.shape[1]
    window = gaussian_window(window_size, sigma).to(x)[None, None].expand(channels, 1, -1, -1)
    blur = lambda image: F.conv2d(image, window, groups=channels)  # each channel on its own
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + C1) * (2 * cov + C2)) / ((mu_x ** 2 + mu_y ** 2 + C1) * (var_x + var_y + C2))
    return ssim_map.flatten(1).mean(1).float()


def frame_scores(generated, truth):
    """Per-frame squared error and SSIM of videos (B, T, 3, H, W) in [-1, 1]: two (B, T) tensors."""
    g, t = (generated.flatten(0, 1).float() + 1) / 2, (truth.flatten(0, 1).float() + 1) / 2
    B, T = truth.shape[:2]
    return mse(g, t).view(B, T), ssim(g, t).view(B, T)


# ----------------------------------------------------------------------------------------------
# Object metrics: a toy VBench-I2V. The synthetic set knows every object's colour, shape and way;
# an object's pixels are those within COLOUR_TOLERANCE of its colour in every channel (backgrounds
# keep every channel in [0.15, 0.45] and objects' channels are 0 or 1, so no background passes).

COLOUR_TOLERANCE = 0.3


def centroids(masks):
    """(x, y) mean coordinates of the True pixels of masks (T, H, W): (T, 2), NaN where none are."""
    T, H, W = masks.shape
    weights = masks.flatten(1).float()
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    coordinates = torch.stack([xs.flatten(), ys.flatten()], dim=1).float()  # (H W, 2)
    return weights @ coordinates / weights.sum(1, keepdim=True)  # 0 / 0 = NaN for an empty mask


def frames_before_bounce(o, width, height, last):
    """The last frame (at most `last`) before object o of SyntheticVideos.describe meets a border."""
    frames = [last]
    for start, speed, room in ((o["x"], o["velocity"][0], width - o["size"]),
                               (o["y"], o["velocity"][1], height - o["size"])):
        if speed:
            frames.append(math.floor(((room - start) if speed > 0 else start) / abs(speed)))
    return min(frames)


def object_scores(video, truth, clip):
    """Per object of a clip (`SyntheticVideos.describe`), for a video against the true one, both
    (T, 3, H, W) in [-1, 1] with frame 0 given:
    - presence (T - 1,): the object's colour covers at least half of its true (visible) area inside
      an object-sized box somewhere in the generated frame, and at most twice its whole area in the
      whole frame; NaN where the truth hides it (another object in front),
    - position_error (T - 1,): pixels between the colour's centroid and the true one, NaN where absent,
    - direction: does the object move the caption's way? Judged at the last frame before the true
      object meets a border (a bounce turns it): correct if the generated object's displacement
      from the true start is within 45 degrees of the caption's way and covers at least half the true
      distance. None where the truth moves less than half the object's size before it turns."""
    scores = []
    for o in clip["objects"]:
        rgb = torch.tensor(o["rgb"], dtype=torch.float32).view(1, 3, 1, 1)
        is_colour = lambda v: ((v.float().cpu() + 1) / 2 - rgb).abs().amax(1) < COLOUR_TOLERANCE
        generated, true = is_colour(video), is_colour(truth)
        true_area, area = true.flatten(1).sum(1).float(), generated.flatten(1).sum(1).float()
        # half its area inside one object-sized box, and no more than twice its area in the frame:
        # speckle of that colour all over the frame is not the object
        in_box = F.conv2d(generated[:, None].float(), torch.ones(1, 1, o["size"], o["size"])).flatten(1).amax(1)
        found = (in_box >= 0.5 * true_area) & (area <= 2 * true_area.max())  # max: its area when whole
        present = torch.where(true_area > 0, found.float(), torch.nan)
        centre, true_centre = centroids(generated), centroids(true)
        error = (centre - true_centre).norm(dim=1)
        error = torch.where(present == 1, error, torch.nan)
        b = frames_before_bounce(o, truth.shape[-1], truth.shape[-2], len(truth) - 1)
        b = max(f for f in range(b + 1) if true_area[f] > 0)  # where no other object hides it
        travel = b * math.hypot(*o["velocity"])  # the true distance, along the caption's way
        direction = None
        if travel >= o["size"] / 2:
            way = torch.tensor(SyntheticVideos.DIRECTIONS[o["direction"]], dtype=torch.float32)
            moved = centre[b] - true_centre[0]
            along = moved @ (way / way.norm())
            direction = bool(along >= 0.5 * travel and along >= math.cos(math.pi / 4) * moved.norm())
        scores.append(dict(presence=present[1:], position_error=error[1:], direction=direction))
    return scores


def summarise_objects(per_clip, last_third):
    """Means over clips, objects and frames of the object scores of many clips."""
    presence = torch.stack([o["presence"] for clip in per_clip for o in clip])  # (objects, T - 1)
    errors = torch.stack([o["position_error"] for clip in per_clip for o in clip])
    judged = [o["direction"] for clip in per_clip for o in clip if o["direction"] is not None]
    return dict(presence=presence.nanmean().item(), presence_last_third=presence[:, last_third].nanmean().item(),
                position_error=errors.nanmean().item(),
                direction=sum(judged) / len(judged) if judged else math.nan, direction_judged=len(judged),
                presence_per_frame=presence.nanmean(0).tolist())


# ----------------------------------------------------------------------------------------------
# The evaluation

@torch.no_grad()
def evaluate(model, tokenizer, text_encoder, n, num_frames, height, width, num_iter=16, cfg=3.0,
             temperature="progressive", seed=0, batch_size=16, null_text=True, keep=4):
    """Image-to-video on the first n held-out clips (num_frames pixel frames of height x width),
    scored against the truth. Returns a dict: per method ("model", "null_text" unless null_text
    is False, "copy") its PSNR and SSIM over all generated frames and over their last third,
    and per generated frame index (1, 2, ...) over the clips; "frames", the frame indices;
    "grid", the truth and the model's video of the first `keep` clips (tensors, not for JSON)."""
    device = next(model.parameters()).device
    dataset = SyntheticVideos(num_frames, height, width, split="test")
    num_latent = tokenizer.latent_frames(num_frames)
    methods = [m for m in METHODS if null_text or m != "null_text"]
    scores = {m: ([], []) for m in methods}  # per method: squared errors and SSIMs (B, T - 1) per batch
    objects = {m: [] for m in methods}  # per method and clip: object_scores
    grid = []
    generator = torch.Generator(device).manual_seed(seed)

    def image_to_video(first_frame, text):
        # with the null text both CFG halves would be the same, so cfg 1 is the same video at half the cost;
        # a model without frame-wise causal attention (Table 4) cannot use the KV cache, and a
        # "total mask" model (Eq. 3.1) is sampled as it was trained: over the whole video at once
        options = dict(generator=generator, clip_range=tokenizer.clip_range)
        cond, guidance = tokenizer.encode(first_frame), cfg if text is not None else 1.0
        if model.config.next_frame_loss:
            latents = generate(model, cond, text, num_latent, num_iter, guidance, temperature,
                               use_kv_cache=model.config.causal, **options)
        else:
            latents = generate_total_mask(model, cond, text, num_latent, num_iter, guidance, temperature, **options)
        return tokenizer.decode(latents).clamp(-1, 1)

    for start in range(0, n, batch_size):
        clips, captions = zip(*(dataset[i] for i in range(start, min(n, start + batch_size))))
        truth = torch.stack(clips).to(device)
        first_frame = truth[:, :1]  # encoded alone: one latent frame
        videos = {"model": image_to_video(first_frame, text_encoder(list(captions))), "copy": first_frame.expand_as(truth)}
        if null_text:
            videos["null_text"] = image_to_video(first_frame, None)
        for m in methods:  # frame 0 is the given image: score the generated frames 1 .. T-1
            for scores_m, s in zip(scores[m], frame_scores(videos[m][:, 1:], truth[:, 1:])):
                scores_m.append(s.cpu())
            for i, (video, true) in enumerate(zip(videos[m], truth)):
                objects[m].append(object_scores(video, true, dataset.describe(start + i)))
        grid += [row for pair in zip(truth, videos["model"]) for row in pair][:2 * keep - len(grid)]

    last_third = slice(-math.ceil((num_frames - 1) / 3), None)
    result = dict(n=n, num_frames=num_frames, height=height, width=width, num_iter=num_iter, cfg=cfg,
                  temperature=temperature, seed=seed, frames=list(range(1, num_frames)), grid=grid)
    for m in methods:
        e, s = (torch.cat(x).double() for x in scores[m])  # (n, T - 1)
        result[m] = dict(psnr=psnr(e.mean()).item(), ssim=s.mean().item(),
                         psnr_last_third=psnr(e[:, last_third].mean()).item(), ssim_last_third=s[:, last_third].mean().item(),
                         psnr_per_frame=psnr(e.mean(0)).tolist(), ssim_per_frame=s.mean(0).tolist(),
                         **summarise_objects(objects[m], last_third))
    return result


def summary(result):
    """One line for the end of a training run."""
    m, c = result["model"], result["copy"]
    return (f"quality on {result['n']} held-out clips ({result['num_frames']} frames): PSNR model "
            f"{m['psnr']:.1f} dB vs copy-first-frame {c['psnr']:.1f} dB (SSIM {m['ssim']:.3f} vs "
            f"{c['ssim']:.3f}); objects present {m['presence']:.0%} (last third {m['presence_last_third']:.0%}), "
            f"position error {m['position_error']:.2f} px, direction {m['direction']:.0%}")


def table(result):
    """The markdown table printed by the CLI."""
    lines = ["| method | PSNR (dB) | SSIM | PSNR last third | SSIM last third | presence | presence last third "
             "| position error (px) | direction |", "| --- " * 9 + "|"]
    for m in METHODS:
        if m in result:
            r = result[m]
            lines.append(f"| {m} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['psnr_last_third']:.2f} | "
                         f"{r['ssim_last_third']:.3f} | {r['presence']:.1%} | {r['presence_last_third']:.1%} | "
                         f"{r['position_error']:.2f} | {r['direction']:.1%} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The plot of PSNR per frame, drawn with Pillow

COLOURS = {"model": (214, 39, 40), "null_text": (31, 119, 180), "copy": (127, 127, 127)}


def plot_curves(path, xs, curves, title, y_label="PSNR (dB)", size=(560, 360), cap=MAX_PSNR, y_range=None):
    """A line plot of curves {name: [y per x]} against xs, with axes, ticks and a legend, as a PNG;
    values at `cap` or above run off the top. `y_range` (lo, hi, tick step) fixes the y axis."""
    W, H = size
    left, right, top, bottom = 56, 16, 28, 44
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
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
    draw.text(((left + W - right) / 2, H - 14), "frame", fill="black", font=font, anchor="mm")
    draw.text((8, top - 16), y_label, fill="black", font=font)
    draw.text((W / 2, 8), title, fill="black", font=font, anchor="mt")
    for i, (name, ys) in enumerate(curves.items()):
        colour = COLOURS.get(name, (0, 0, 0))
        draw.line([(px(x), py(y)) for x, y in zip(xs, ys)], fill=colour, width=2)
        legend_y = top + 6 + 14 * i
        draw.line([(W - right - 110, legend_y), (W - right - 90, legend_y)], fill=colour, width=2)
        draw.text((W - right - 84, legend_y), name, fill="black", font=font, anchor="lm")
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
# The command line

def parse_args(argv=None):
    parser = ArgumentParser(description="Score a VideoMAR checkpoint on held-out synthetic clips.")
    add_generation_options(parser)
    parser.add_argument("--n", type=positive_int, default=64, help="held-out clips")
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--out", default="out/eval", help="directory for eval.json, psnr.png and grid.png")
    return parser.parse_args(argv)


def run(args):
    check_writable(args.out, directory=True)
    # image-to-video: one given latent frame, clips in batches
    model, tokenizer, text_encoder, options, (frames, height, width) = trained_model(
        args, batch=min(args.n, args.batch_size), given=1)

    result = evaluate(model, tokenizer, text_encoder, args.n, frames, height, width, args.num_iter, args.cfg,
                      args.temperature, args.seed, args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = [video.cpu() for video in result.pop("grid")]
    save_image_grid(out / "grid.png", grid)
    write_side_by_side(out / "truth_vs_generated.gif", grid)
    result["ckpt"] = str(args.ckpt)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    trained = f"trained at {options['height']}x{options['width']}, {str(options['frames']).split(',')[-1]} frames"
    plot_curves(out / "psnr.png", result["frames"], {m: result[m]["psnr_per_frame"] for m in METHODS},
                f"PSNR per frame, {args.n} held-out clips, {frames} frames {height}x{width} ({trained})")
    plot_curves(out / "presence.png", result["frames"],
                {m: [100 * p for p in result[m]["presence_per_frame"]] for m in METHODS},
                f"objects present per frame, {args.n} held-out clips ({trained})", "present (%)",
                cap=math.inf, y_range=(0, 100, 20))
    print(f"{args.ckpt}: {args.n} held-out clips, {frames} frames of {height}x{width} ({trained}), "
          f"num_iter {args.num_iter}, cfg {args.cfg}, temperature {args.temperature}, seed {args.seed}")
    print(table(result))
    print(f"wrote {out / 'eval.json'}, {out / 'psnr.png'}, {out / 'presence.png'}, {out / 'grid.png'} "
          f"and {out / 'truth_vs_generated.gif'}")


def main(argv=None):
    """Evaluate; returns the exit code: 0 done, 2 bad input (one line on stderr)."""
    try:
        run(parse_args(argv))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
