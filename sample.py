"""
Sample a video from a trained VideoMAR, as it was trained (`VideoMAR.generate_as_trained` in
model.py): frame by frame with a KV cache, the tokens of each frame in parallel by masked
generation (§4.3, `VideoMAR.generate`).

Usage:
    python sample.py --image x.png --prompt "a red square moves left slowly"
    python sample.py --video clip.mp4 --cond_frames 2 --prompt "..."       # video-to-video
    python sample.py --prompt "..."                                         # text-to-video
    python sample.py --image x.png --frames 49 --height 64 --width 96      # extrapolation
"""
import sys
from pathlib import Path

import torch

from checkpoint import trained_model
from cli import ArgumentParser, add_generation_options, autocast, check_writable, positive_int
from errors import BadInput
from videoio import read_image, read_video, resize_center_crop, save_image_grid, write_video


def parse_args(argv=None):
    parser = ArgumentParser(description="Generate a video with a trained VideoMAR.")
    parser.add_argument("--image", help="first frame (image-to-video); without --image or "
                                        "--video: text-to-video")
    parser.add_argument("--video", help="a clip whose first frames condition the video "
                                        "(video-to-video)")
    parser.add_argument("--cond_frames", type=positive_int, default=1,
                        help="latent frames of --video to keep (§5.3: 2)")
    parser.add_argument("--prompt", default="", help="the caption")
    add_generation_options(parser)
    parser.add_argument("--num_samples", type=positive_int, default=1)
    parser.add_argument("--no_kv_cache", action="store_true",
                        help="the slow reference path of Table 2")
    parser.add_argument("--out", default="out/sample.mp4",
                        help=".mp4 or .gif; a .png contact sheet goes beside it")
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
        num_frames = tokenizer.pixel_frames(args.cond_frames)
        video = read_video(args.video, num_frames=num_frames)
        pixels = resize_center_crop(video, height, width)[None]
    else:
        h, w = height // tokenizer.spatial, width // tokenizer.spatial
        return torch.zeros(args.num_samples, 0, tokenizer.channels, h, w, device=device)
    return tokenizer.encode(pixels.to(device)).to(device).expand(args.num_samples, -1, -1, -1, -1)


def sample(args):
    for path in (args.out, Path(args.out).with_suffix(".png")):
        check_writable(path)
    given = 1 if args.image else args.cond_frames if args.video else 0
    trained = trained_model(args.ckpt, args.device, args.frames, args.height, args.width,
                            batch=args.num_samples, cfg=args.cfg, num_iter=args.num_iter,
                            given=given)
    model, tokenizer = trained.model, trained.tokenizer
    device = torch.device(args.device)
    cond = conditioning_latents(args, tokenizer, trained.height, trained.width, device)
    caption = trained.text_encoder([args.prompt] * args.num_samples)

    generator = torch.Generator(device).manual_seed(args.seed)
    with autocast(device):
        latents = model.generate_as_trained(
            cond, caption, tokenizer.latent_frames(trained.num_frames),
            use_kv_cache=not args.no_kv_cache, num_iter=trained.num_iter, cfg=trained.cfg,
            temperature=args.temperature, generator=generator,
            sampler=model.diffloss.sampler(tokenizer.clip_range))
    video = tokenizer.decode(latents).clamp(-1, 1).cpu()  # (num_samples, T, 3, H, W)
    write_video(args.out, torch.cat(list(video), dim=-1))  # samples side by side
    sheet = Path(args.out).with_suffix(".png")
    save_image_grid(sheet, list(video))
    print(f"wrote {args.out} ({video.shape[1]} frames of {trained.height}x{trained.width}) and "
          f"{sheet}")


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
