"""
Quality at toy scale: PSNR, SSIM and the object metrics (a toy VBench-I2V) of generated clips
against the synthetic truth, and `score_held_out_clips`, the evaluation procedure: it scores
image-to-video on held-out clips of the built-in synthetic set, where the first frame plus the
caption determine the whole clip (data.SyntheticVideos). eval.py is its command line; train.py
calls it at the end of a run.

For each held-out clip: image-to-video from its first frame and caption with the EMA weights, then
the squared error and SSIM of every generated pixel frame against the truth. Two baselines on the
same clips: "copy" repeats the first frame (a model that learnt nothing about motion), "null_text"
is the model with the caption replaced by the null text (it sees the image, not what moves where).
And a ceiling: "tokenizer" is the true clip encoded and decoded, what a model that samples every
latent exactly right would score: no model on these latents can do better. With teacher_forced,
"teacher_forced" generates each latent frame from the true earlier ones (with the temperature that
frame gets in the free run): its gap to "model" is the accumulated error of §4.3 (exposure bias),
its gap to "tokenizer" what one step of the model gets wrong.
A PSNR here is that of the mean squared error over the clips (and frames) it summarises: objects
bounce, so some frames equal the first one exactly and the copy baseline's PSNR there is infinite;
a mean of per-frame PSNRs would be ruled by those frames. SSIM is the mean over frames and clips.

Caption steering (`caption_steering`): does the caption's direction move the objects? The latent
frame after the true given ones, drawn with the true caption, with every direction reversed and
with the null text; per object, how far its colour moved along the caption's way. A model that
follows the caption moves it the caption's way, and the other way for the reversed caption; one
that ignores the direction scores the same for both. `caption_colour`: does the caption's colour
reach text-to-image? `caption_likelihood`, without sampling: is the head's loss on that first step
lower with the true caption than with the reversed one? `first_step_prediction`: how near the
head's mean of that step lies to the true latents, a yardstick a plain regressor can be held to.

Usage:
    config = EvalConfig(n=16, num_frames=25)
    result = score_held_out_clips(model, tokenizer, text_encoder, config)
    result["model"]["psnr"], result["copy"]["psnr"]    # dB, of the mean error over clips and frames
    draw = model_draw(model, tokenizer, text_encoder, config)
    steering = caption_steering(draw, tokenizer, config)  # image-to-video's first generated step
    steering["reversed caption"]["along"]              # px along the true caption's way
    loss = caption_likelihood(model, tokenizer, text_encoder, config)  # sampling-free
    loss["reversed caption"] - loss["true caption"]    # 0 for a model blind to the direction
    first_step_prediction(model, tokenizer, text_encoder, config)["head_mean"]  # vs ["copy"]
    print(summary(result, steering))                   # one line
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from data import SyntheticVideos, reword
from model import frame_temperature, patchify

METHODS = ("model", "teacher_forced", "null_text", "copy", "tokenizer")
MAX_PSNR = 50.0  # dB: what a zero error counts as, rather than infinity


# ----------------------------------------------------------------------------------------------
# The metrics, on images in [0, 1] of shape (N, 3, H, W), one value per image

def mse(x, y):
    return (x - y).pow(2).flatten(1).mean(1)


def psnr(mean_squared_error):
    """Peak signal-to-noise ratio in dB (peak 1) of a mean squared error, capped at MAX_PSNR."""
    return (10 * torch.log10(1 / mean_squared_error)).clamp(max=MAX_PSNR)


def gaussian_window(size=11, sigma=1.5):
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(offsets ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x, y, window_size=11, sigma=1.5):
    """Structural similarity (Wang et al. 2004): local means, variances and covariance under an
    11 x 11 Gaussian window (sigma 1.5), only where the window fits the image, averaged over
    positions and channels. C1 = (0.01)^2 and C2 = (0.03)^2 for a data range of 1."""
    C1, C2 = 0.01 ** 2, 0.03 ** 2
    x, y = x.double(), y.double()  # E[x^2] - E[x]^2 in float32 loses small variances to rounding
    channels = x.shape[1]
    window = gaussian_window(window_size, sigma).to(x)[None, None].expand(channels, 1, -1, -1)
    blur = lambda image: F.conv2d(image, window, groups=channels)  # each channel on its own
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = (((2 * mu_x * mu_y + C1) * (2 * cov + C2))
                / ((mu_x ** 2 + mu_y ** 2 + C1) * (var_x + var_y + C2)))
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


def colour_masks(frames, rgb):
    """Where frames (..., 3, H, W) in [-1, 1] show the colour rgb (each channel 0 or 1): (..., H, W)
    booleans."""
    rgb = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1)
    return ((frames.float().cpu() + 1) / 2 - rgb).abs().amax(-3) < COLOUR_TOLERANCE


def caption_way(o):
    """The unit vector (x right, y down) of object o's direction (`SyntheticVideos.describe`)."""
    way = torch.tensor(SyntheticVideos.DIRECTIONS[o["direction"]], dtype=torch.float32)
    return way / way.norm()


def centroids(masks):
    """(x, y) mean coordinates of the True pixels of masks (T, H, W): (T, 2), NaN where none are."""
    T, H, W = masks.shape
    weights = masks.flatten(1).float()
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    coordinates = torch.stack([xs.flatten(), ys.flatten()], dim=1).float()  # (H W, 2)
    return weights @ coordinates / weights.sum(1, keepdim=True)  # 0 / 0 = NaN for an empty mask


def frames_before_bounce(o, width, height, last):
    """The last frame (at most `last`) before object o of SyntheticVideos.describe meets a
    border."""
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
    - position_error (T - 1,): pixels between the colour's centroid and the true one, NaN where
      absent,
    - direction: does the object move the caption's way? Judged at the last frame before the true
      object meets a border (a bounce turns it): correct if the generated object's displacement
      from the true start is within 45 degrees of the caption's way and covers at least half the
      true distance. None where the truth moves less than half the object's size before it
      turns."""
    scores = []
    for o in clip["objects"]:
        generated, true = colour_masks(video, o["rgb"]), colour_masks(truth, o["rgb"])
        true_area, area = true.flatten(1).sum(1).float(), generated.flatten(1).sum(1).float()
        # half its area inside one object-sized box, and no more than twice its area in the frame:
        # speckle of that colour all over the frame is not the object
        box = torch.ones(1, 1, o["size"], o["size"])
        in_box = F.conv2d(generated[:, None].float(), box).flatten(1).amax(1)
        found = (in_box >= 0.5 * true_area) & (area <= 2 * true_area.max())  # max: its whole area
        present = torch.where(true_area > 0, found.float(), torch.nan)
        centre, true_centre = centroids(generated), centroids(true)
        error = (centre - true_centre).norm(dim=1)
        error = torch.where(present == 1, error, torch.nan)
        b = frames_before_bounce(o, truth.shape[-1], truth.shape[-2], len(truth) - 1)
        b = max(f for f in range(b + 1) if true_area[f] > 0)  # where no other object hides it
        travel = b * math.hypot(*o["velocity"])  # the true distance, along the caption's way
        direction = None
        if travel >= o["size"] / 2:
            moved = centre[b] - true_centre[0]
            along = moved @ caption_way(o)
            direction = bool(along >= 0.5 * travel
                             and along >= math.cos(math.pi / 4) * moved.norm())
        scores.append(dict(presence=present[1:], position_error=error[1:], direction=direction))
    return scores


def latent_step_shares(presence, temporal):
    """How objects are kept and lost from one generated latent frame to the next. presence
    (objects, T - 1) over the generated pixel frames, `temporal` of them a latent frame; an object
    is present in a latent frame when it is in at least half of the pixel frames where the truth
    shows it. Per latent step k -> k + 1 (k = 1, 2, ...): "stay", the share of the objects present
    in k that are present in k + 1, and "back", the share of the absent ones that are (NaN where
    none were). A model that draws each object from its last frame brings none back."""
    frames = presence.unflatten(1, (-1, temporal))  # (objects, latent frames, temporal)
    per_latent, shown = frames.nanmean(2) >= 0.5, ~frames.isnan().all(2)  # NaN >= 0.5: False
    now, then, judged = per_latent[:, :-1], per_latent[:, 1:], shown[:, :-1] & shown[:, 1:]
    share = lambda was: ((then & was & judged).sum(0) / (was & judged).sum(0)).tolist()
    return dict(stay=share(now), back=share(~now))


def summarise_objects(per_clip, last_third, temporal):
    """Means over clips, objects and frames of the object scores of many clips, and the per
    latent step shares of objects kept and brought back (latent_step_shares)."""
    presence = torch.stack([o["presence"] for clip in per_clip for o in clip])  # (objects, T - 1)
    errors = torch.stack([o["position_error"] for clip in per_clip for o in clip])
    judged = [o["direction"] for clip in per_clip for o in clip if o["direction"] is not None]
    return dict(presence=presence.nanmean().item(),
                presence_last_third=presence[:, last_third].nanmean().item(),
                position_error=errors.nanmean().item(),
                direction=sum(judged) / len(judged) if judged else math.nan,
                direction_judged=len(judged), presence_per_frame=presence.nanmean(0).tolist(),
                latent_steps=latent_step_shares(presence, temporal))


# ----------------------------------------------------------------------------------------------
# The evaluation

@dataclass
class EvalConfig:
    # the held-out clips
    n: int = 64
    num_frames: int = 25  # pixel frames a clip
    height: int = 16
    width: int = 16
    # how they are generated (VideoMAR.generate's options)
    num_iter: int = 4
    cfg: float = 3.0
    temperature: str | float = "progressive"
    sampler: Callable = None  # the head's, clip included; None: DiffLoss.sampler(clip range)
    seed: int = 0
    batch_size: int = 16  # clips at a time
    # what is scored and kept
    null_text: bool = True  # the row "null_text"
    teacher_forced: bool = False  # the row "teacher_forced"
    keep: int = 4  # clips whose truth and generated video come back in "grid"


def held_out_batches(dataset, config):
    """The first config.n clips of dataset, config.batch_size at a time: (indices, clips
    (B, T, 3, H, W), captions)."""
    for start in range(0, config.n, config.batch_size):
        batch = range(start, min(config.n, start + config.batch_size))
        clips, captions = zip(*(dataset[i] for i in batch))
        yield batch, torch.stack(clips), list(captions)


@torch.no_grad()
def score_held_out_clips(model, tokenizer, text_encoder, config):
    """Image-to-video on the first config.n held-out clips, scored against the truth. Returns a
    dict: per method ("model", "teacher_forced" if asked, "null_text" unless config.null_text is
    False, "copy", "tokenizer") its PSNR and SSIM over all generated frames, over their last third
    and per generated frame index (1, 2, ...), and its object scores; "frames", the frame indices;
    "grid", the truth and the model's video of the first `keep` clips (tensors, not for JSON)."""
    dataset = SyntheticVideos(config.num_frames, config.height, config.width, split="test")
    methods = [m for m in METHODS if (config.null_text or m != "null_text")
               and (config.teacher_forced or m != "teacher_forced")]
    scores = {m: ([], []) for m in methods}  # per method and batch: squared errors, SSIMs (B, T-1)
    objects = {m: [] for m in methods}  # per method and clip: object_scores
    eval_videos, grid = EvalVideos(model, tokenizer, config), []
    for batch, truth, captions in held_out_batches(dataset, config):
        truth = truth.to(eval_videos.device)
        videos = eval_videos(truth, text_encoder(captions), methods)
        for m in methods:  # frame 0 is the given image: score the generated frames 1 .. T-1
            for scores_m, s in zip(scores[m], frame_scores(videos[m][:, 1:], truth[:, 1:])):
                scores_m.append(s.cpu())
            for i, video, true in zip(batch, videos[m], truth):
                objects[m].append(object_scores(video, true, dataset.describe(i)))
        pairs = [row for pair in zip(truth, videos["model"]) for row in pair]
        grid += pairs[:2 * config.keep - len(grid)]
    result = dict(n=config.n, num_frames=config.num_frames, height=config.height,
                  width=config.width, num_iter=config.num_iter, cfg=config.cfg,
                  temperature=config.temperature, seed=config.seed,
                  frames=list(range(1, config.num_frames)), grid=grid)
    last_third = slice(-math.ceil((config.num_frames - 1) / 3), None)
    for m in methods:
        e, s = (torch.cat(x).double() for x in scores[m])  # (n, T - 1)
        result[m] = dict(psnr=psnr(e.mean()).item(), ssim=s.mean().item(),
                         psnr_last_third=psnr(e[:, last_third].mean()).item(),
                         ssim_last_third=s[:, last_third].mean().item(),
                         psnr_per_frame=psnr(e.mean(0)).tolist(), ssim_per_frame=s.mean(0).tolist(),
                         **summarise_objects(objects[m], last_third, tokenizer.temporal))
    return result


class EvalVideos:
    """The videos of every row of the evaluation for a batch of held-out clips. Each sampled row
    draws from its own generator, so that asking for one row leaves the others' draws alone."""

    def __init__(self, model, tokenizer, config):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.device = next(model.parameters()).device
        self.generators = {}  # per row, made when the row is first drawn

    def generator(self, row):
        """`row`'s own random draws, seeded alike for every row."""
        if row not in self.generators:
            self.generators[row] = torch.Generator(self.device).manual_seed(self.config.seed)
        return self.generators[row]

    def __call__(self, truth, caption, methods):
        """{method: video (B, T, 3, H, W)} of the clips `truth` with their captions."""
        first_frame = truth[:, :1]
        cond = self.tokenizer.encode(first_frame)  # encoded alone, as image-to-video has only it
        true_latents = self.tokenizer.encode(truth)
        latents = dict(model=self.image_to_video(cond, caption, "model"),
                       tokenizer=true_latents)
        if "null_text" in methods:
            latents["null_text"] = self.image_to_video(cond, None, "null_text")
        if "teacher_forced" in methods:
            latents["teacher_forced"] = self.teacher_forcing(true_latents, caption)
        videos = {m: self.tokenizer.decode(x).clamp(-1, 1) for m, x in latents.items()}
        return dict(videos, copy=first_frame.expand_as(truth))

    def image_to_video(self, cond, caption, row, num_latent_frames=None, temperature=None):
        """The latents generated from `cond` by `row`'s generator, sampled as the model was
        trained (a model of the "total mask" loss of Table 4 generates the whole video at once);
        the whole clip and the configured temperature unless given."""
        config = self.config
        if num_latent_frames is None:
            num_latent_frames = self.tokenizer.latent_frames(config.num_frames)
        return self.model.generate_as_trained(
            cond, caption, num_latent_frames, num_iter=config.num_iter, cfg=config.cfg,
            temperature=config.temperature if temperature is None else temperature,
            generator=self.generator(row),
            sampler=config.sampler or self.model.diffloss.sampler(self.tokenizer.clip_range))

    def teacher_forcing(self, true_latents, caption):
        """Each latent frame t generated from the true frames before it, at the temperature frame
        t gets in the free run (§4.3's accumulated error is the gap to the free run)."""
        latents = true_latents.clone()
        for t in range(1, latents.shape[1]):
            temperature = frame_temperature(self.config.temperature, t - 1)
            latents[:, t] = self.image_to_video(true_latents[:, :t], caption, "teacher_forced",
                                                t + 1, temperature)[:, t]
        return latents


# ----------------------------------------------------------------------------------------------
# Caption steering. In image-to-video the first frame shows where each object is, never where it
# goes: only the caption says that. Does the caption's direction reach the picture?

STEERING_ROWS = ("truth", "tokenizer", "true caption", "reversed caption", "null text")


def steering_captions(captions):
    """The captions each steering row draws with: as they are, every direction reversed
    (SyntheticVideos.REVERSED), and None, the null text."""
    return {"true caption": captions, "null text": None,
            "reversed caption": [reword(c, SyntheticVideos.REVERSED) for c in captions]}


def along_the_way(video, truth, clip, start, end):
    """Per object of a clip (`SyntheticVideos.describe`) seen in both frames: how far its colour's
    centroid in frame `end` of video lies from the true one in frame `start`, along the caption's
    way (pixels; positive: the way the true caption says)."""
    moves = []
    for o in clip["objects"]:
        was = centroids(colour_masks(truth[start], o["rgb"])[None])[0]
        now = centroids(colour_masks(video[end], o["rgb"])[None])[0]
        if not (was.isnan().any() or now.isnan().any()):
            moves.append(((now - was) @ caption_way(o)).item())
    return moves


@torch.no_grad()
def caption_steering(draw, tokenizer, config, given=1, rows=STEERING_ROWS):
    """How far the caption moves objects in the latent frame after `given` true ones, on the first
    config.n held-out clips: given=1 is image-to-video's first generated step (pixel frames
    1 .. tokenizer.temporal), given=2 the setting of the authors' released sampler (two given
    latent frames, in which the motion already shows). Per object, `along_the_way` from the last
    given pixel frame (the true one) to the last of the generated latent frame. Rows: the truth,
    the tokenizer (the truth encoded and decoded), and drawn by the model: with the true caption,
    with every direction reversed (SyntheticVideos.REVERSED) and with the null text.
    `draw(frames, captions, num_frames, row)` is the model: num_frames pixel frames
    (B, T, 3, H, W) in [-1, 1] continuing the given pixel frames (B, k, 3, H, W), with the
    captions (a list; None: the null text), from `row`'s own random draws (model_draw).
    Returns {row: dict(along=the mean over objects in pixels, found=the fraction of objects whose
    colour both frames show)}."""
    last_given = tokenizer.pixel_frames(given) - 1
    num_frames = tokenizer.pixel_frames(given + 1)
    dataset = SyntheticVideos(num_frames, config.height, config.width, split="test")
    moves, objects = {row: [] for row in rows}, 0
    for batch, truth, captions in held_out_batches(dataset, config):
        texts = steering_captions(captions)
        for row in rows:
            if row == "truth":
                videos = truth
            elif row == "tokenizer":
                videos = tokenizer.decode(tokenizer.encode(truth)).clamp(-1, 1)
            else:
                videos = draw(truth[:, :last_given + 1], texts[row], num_frames,
                              f"{given} given: {row}")
            for i, video, true in zip(batch, videos, truth):
                moves[row] += along_the_way(video, true, dataset.describe(i), last_given,
                                            num_frames - 1)
        objects += sum(len(dataset.describe(i)["objects"]) for i in batch)
    return {row: dict(along=sum(m) / len(m) if m else math.nan, found=len(m) / objects)
            for row, m in moves.items()}


@torch.no_grad()
def caption_colour(draw, config):
    """Text-to-image of frame 0 from the caption alone (`draw` as caption_steering's), with the
    true caption and with every colour swapped for another (SyntheticVideos.SWAPPED): the fraction
    of objects whose true colour is drawn over at least half the object's true area."""
    dataset = SyntheticVideos(1, config.height, config.width, split="test")
    drawn = {"true caption": [], "colours swapped": []}
    for batch, truth, captions in held_out_batches(dataset, config):
        swapped = [reword(c, SyntheticVideos.SWAPPED) for c in captions]
        for row, texts in (("true caption", captions), ("colours swapped", swapped)):
            images = draw(truth[:, :0], texts, 1, f"text-to-image: {row}")[:, 0]
            for i, image, true in zip(batch, images, truth[:, 0]):
                for o in dataset.describe(i)["objects"]:
                    area = colour_masks(image, o["rgb"]).sum()
                    drawn[row].append(bool(area >= 0.5 * colour_masks(true, o["rgb"]).sum()))
    return {row: sum(d) / len(d) for row, d in drawn.items()}


def first_step_batches(model, tokenizer, config):
    """The first config.n held-out clips as the sampling-free probes of image-to-video's first
    step read them, a batch at a time: (clip indices, captions, tokens (B, 2, L, token_dim) of the
    true latent frames 0 and 1, frame_1_z), where frame_1_z(context) is z (B, L, n_embd) of latent
    frame 1 with every token masked and the true frame 0 given (target_frame_z: Eq. 4.1's z for
    t = 1)."""
    p = model.config.patch_size
    dataset = SyntheticVideos(tokenizer.pixel_frames(2), config.height, config.width,
                              split="test")
    device = next(model.parameters()).device
    for batch, truth, captions in held_out_batches(dataset, config):
        latents = tokenizer.encode(truth.to(device))
        grid = (latents.shape[-2] // p, latents.shape[-1] // p)
        tokens = patchify(latents, p)
        every_token = torch.ones(tokens.shape[0], tokens.shape[2], dtype=torch.bool,
                                 device=device)
        yield batch, captions, tokens, partial(model.target_frame_z, tokens, 1, every_token, grid)


@torch.no_grad()
def caption_likelihood(model, tokenizer, text_encoder, config, draws=8):
    """Does the model's distribution of the first generated latent frame depend on the caption's
    direction? Sampling-free: on the first config.n held-out clips, the head's diffusion loss
    (what training minimises) on every token of latent frame 1, all of them masked, given the true
    latent frame 0 (target_frame_z: Eq. 4.1's z for t = 1), with the true caption, with every
    direction reversed and with the null text.
    Each token gets `draws` timesteps and noises, the same for the three captions, so that a model
    whose z ignores the direction scores the reversed caption exactly as the true one, and one
    that follows it scores the reversed caption worse. Returns {row: mean loss}."""
    device = next(model.parameters()).device
    losses = {row: [] for row in STEERING_ROWS[2:]}
    for batch, captions, tokens, frame_1_z in first_step_batches(model, tokenizer, config):
        target = tokens[:, 1].flatten(0, 1).float().repeat(draws, 1)
        for row, text in steering_captions(captions).items():
            context = (model.null_context(len(batch)) if text is None else
                       model.text_context(*text_encoder(text)))
            z = frame_1_z(context)
            generator = torch.Generator(device).manual_seed(config.seed + batch[0])
            losses[row].append(model.diffloss(target, z.flatten(0, 1).repeat(draws, 1),
                                              generator=generator) * len(batch))
    return {row: (sum(l) / config.n).item() for row, l in losses.items()}


@torch.no_grad()
def first_step_prediction(model, tokenizer, text_encoder, config, draws=8):
    """How near the model's first generated latent frame lies to the truth, without the sampling
    choices: on the first config.n held-out clips, every token of latent frame 1 masked, the true
    latent frame 0 and the true caption given, the mean of `draws` samples of the head per token
    (no guidance), and its squared error from the true latent frame 1, per latent value. Beside it
    the error of copying frame 0 and of always drawing the mean of the frame (its variance over
    the clips): a yardstick that a plain regressor on the same latents can be held to.
    Returns dict(head_mean=, copy=, variance=)."""
    device = next(model.parameters()).device
    means, frames = [], []
    for batch, captions, tokens, frame_1_z in first_step_batches(model, tokenizer, config):
        z = frame_1_z(model.text_context(*text_encoder(captions)))
        generator = torch.Generator(device).manual_seed(config.seed + batch[0])
        mean = sum(model.diffloss.sample(z.flatten(0, 1), generator=generator,
                                         clip_range=tokenizer.clip_range)
                   for _ in range(draws)) / draws
        means.append(mean.view(tokens[:, 1].shape))
        frames.append(tokens.float())
    frames = torch.cat(frames)  # (n, 2, L, token_dim): the true latent frames 0 and 1
    truth = frames[:, 1]
    return dict(head_mean=(torch.cat(means) - truth).pow(2).mean().item(),
                copy=(frames[:, 0] - truth).pow(2).mean().item(),
                variance=truth.var(0, unbiased=False).mean().item())


def model_draw(model, tokenizer, text_encoder, config):
    """caption_steering's `draw` for a model: the given frames encoded, the next latent frames
    generated as score_held_out_clips generates them (EvalVideos.image_to_video), decoded."""
    videos = EvalVideos(model, tokenizer, config)

    def draw(frames, captions, num_frames, row):
        B, k, _, H, W = frames.shape
        cond = (tokenizer.encode(frames.to(videos.device)) if k else  # text-to-image: none given
                torch.zeros(B, 0, tokenizer.channels, H // tokenizer.spatial,
                            W // tokenizer.spatial, device=videos.device))
        caption = None if captions is None else text_encoder(captions)
        latents = videos.image_to_video(cond, caption, row, tokenizer.latent_frames(num_frames))
        return tokenizer.decode(latents).clamp(-1, 1)
    return draw


def score_steering(model, tokenizer, text_encoder, config):
    """eval.py's caption steering: image-to-video's first generated step ("first_step"), the
    authors' released setting of two given latent frames ("two_given"), and text-to-image's
    colour ("text_to_image"); and sampling-free, the head's loss on the first generated step
    ("likelihood"), and how near the head's mean of that step lies to the truth ("prediction")."""
    draw = model_draw(model, tokenizer, text_encoder, config)
    return dict(first_step=caption_steering(draw, tokenizer, config, given=1),
                two_given=caption_steering(draw, tokenizer, config, given=2),
                text_to_image=caption_colour(draw, config),
                likelihood=caption_likelihood(model, tokenizer, text_encoder, config),
                prediction=first_step_prediction(model, tokenizer, text_encoder, config))


def summary(result, steering):
    """One line for the end of a training run, from score_held_out_clips and caption_steering's
    true and reversed caption."""
    m, c = result["model"], result["copy"]
    return (f"quality on {result['n']} held-out clips ({result['num_frames']} frames): PSNR model "
            f"{m['psnr']:.1f} dB vs copy-first-frame {c['psnr']:.1f} dB (SSIM {m['ssim']:.3f} vs "
            f"{c['ssim']:.3f}); objects present {m['presence']:.0%} "
            f"(last third {m['presence_last_third']:.0%}), "
            f"position error {m['position_error']:.2f} px, direction {m['direction']:.0%}; "
            f"first step along the caption's way: true/reversed caption "
            f"{steering['true caption']['along']:+.2f}/{steering['reversed caption']['along']:+.2f}"
            f" px")
