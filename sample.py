"""
Sample a video from a trained VideoMAR: frame by frame with a KV cache, the tokens of each frame
in parallel by masked generation (§4.3).

Usage:
    python sample.py --image x.png --prompt "a red square moves left slowly"
    python sample.py --video clip.mp4 --cond_frames 2 --prompt "..."       # video-to-video
    python sample.py --prompt "..."                                         # text-to-video
    python sample.py --image x.png --frames 49 --height 64 --width 96      # extrapolation

From Python:
    latents = generate(model, cond_latents, (text, text_mask), num_frames=7)
"""
import math

import torch

from model import KVCache, patchify, unpatchify


def frame_temperature(temperature, i):
    """§4.3 and Appendix B: "progressive" gives the i-th generated frame 0.9 + 10^-(i+1)
    (1.0, 0.91, 0.901, ...): lower temperature for later frames suppresses accumulated error."""
    if temperature == "progressive":
        return 0.9 + 10.0 ** -(i + 1)
    return float(temperature)


def merge_contexts(conditional, unconditional):
    """Stack the text contexts of the conditional rows and the null-text rows along the batch."""
    kvs = [(torch.cat([k, uk]), torch.cat([v, uv])) for (k, v), (uk, uv) in zip(conditional[0], unconditional[0])]
    return kvs, torch.cat([conditional[1], unconditional[1]])


@torch.no_grad()
def generate(model, cond_latents, text, num_frames, num_iter=64, cfg=3.0, temperature="progressive",
             use_kv_cache=True, generator=None, clip_range=None, progress=None):
    """Continue `cond_latents` (B, k, C, h, w), k >= 0 given latent frames, to `num_frames`
    latent frames. `text` is (embeddings (B, S, text_dim), mask (B, S)) of the captions; with
    cfg != 1 the batch is doubled with the null text (MAR's linear CFG schedule). `clip_range`
    clamps the sampled latents of frames after the first generated one (the tokenizer's range).
    Returns (B, num_frames, C, h, w), the given frames bit-exact."""
    config, device = model.config, cond_latents.device
    p = config.patch_size
    B, k, C, h, w = cond_latents.shape
    grid = (h // p, w // p)
    L = grid[0] * grid[1]
    num_iter = min(num_iter, L)
    guided = cfg != 1.0
    if not config.causal and use_kv_cache:
        raise ValueError("a model without frame-wise causal attention cannot use the KV cache")
    double = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)

    tokens = torch.zeros(B, num_frames, L, config.token_dim, device=device)
    tokens[:, :k] = patchify(cond_latents, p)
    context = model.text_context(*text)
    if guided:
        context = merge_contexts(context, model.null_context(B))
    cache = KVCache(config, len(context[1]), num_frames * L, device) if use_kv_cache else None
    if use_kv_cache and k > 0:  # prefill: the given frames, fully visible, once
        model.forward_frames(double(tokens[:, :k].flatten(1, 2)), None, 0, grid, context, cache, commit=True)

    for f in range(k, num_frames):
        frame_temp = frame_temperature(temperature, f - k)
        order = torch.rand(B, L, generator=generator, device=device).argsort(dim=1)
        mask = torch.ones(B, L, dtype=torch.bool, device=device)
        num_masked = L
        for step in range(num_iter):
            if use_kv_cache:
                z = model.forward_frames(double(tokens[:, f]), double(mask), f, grid, context, cache)
            else:
                # "w/o KV cache" (Table 2): re-run all previous frames under the causal mask; a
                # model without causal attention also sees the (fully masked) future frames
                seen = f + 1 if config.causal else num_frames
                full_mask = torch.zeros(B, seen, L, dtype=torch.bool, device=device)
                full_mask[:, f] = mask
                full_mask[:, f + 1:] = True
                z = model.forward_frames(double(tokens[:, :seen].flatten(1, 2)), double(full_mask.flatten(1)),
                                         0, grid, context)[:, f * L:(f + 1) * L]
            # cosine schedule: after this step cos(pi/2 (step+1)/num_iter) of the frame stays masked,
            # at least one token until the last step (MAR)
            mask_len = math.floor(L * math.cos(math.pi / 2 * (step + 1) / num_iter))
            mask_len = max(1, min(num_masked - 1, mask_len))
            if step == num_iter - 1:
                next_mask, num_masked = torch.zeros_like(mask), 0
            else:
                next_mask, num_masked = torch.zeros_like(mask).scatter_(1, order[:, :mask_len], True), mask_len
            to_predict = mask & ~next_mask
            z_rows = torch.cat([z[:B][to_predict], z[B:][to_predict]]) if guided else z[to_predict]
            cfg_step = 1 + (cfg - 1) * (L - mask_len) / L
            tokens[:, f][to_predict] = model.diffloss.sample(z_rows, frame_temp, cfg_step, generator=generator).to(tokens.dtype)
            mask = next_mask
        if clip_range is not None and f > k:
            tokens[:, f].clamp_(*clip_range)
        if use_kv_cache:  # commit: the finished frame once more, fully visible, into the cache
            model.forward_frames(double(tokens[:, f]), None, f, grid, context, cache, commit=True)
        if progress is not None:
            progress.update(1)
    return unpatchify(tokens, p, h, w)
