"""
The test suite: CPU, fast. Run with `python -m pytest -q test_all.py`.

Every test compares against something a wrong implementation would get wrong: values computed
independently from closed forms, a straightforward reference loop, or an invariance of the method.
"""
import math

import pytest
import torch

from diffusion import DiffLoss, create_diffusion
from model import KVCache, PRESETS, VideoMAR, VideoMARConfig, patchify, sample_mask_ratios, unpatchify
from rope3d import apply_rope, rope_frequencies
from sample import frame_temperature, generate


def tiny_config(**overrides):
    base = dict(latent_channels=8, n_layer=2, n_embd=48, n_head=2, diffloss_d=2, diffloss_w=32,
                text_dim=16, text_len=6, num_sampling_steps="10")
    return VideoMARConfig(**{**base, **overrides})


def random_model(seed=0, **overrides):
    """A tiny model with every weight random (also the zero-initialised ones), in eval mode."""
    torch.manual_seed(seed)
    model = VideoMAR(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.02)
    return model


def random_text(batch, config, seed=1):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, config.text_len, config.text_dim, generator=g)
    mask = torch.ones(batch, config.text_len, dtype=torch.bool)
    mask[0, config.text_len // 2:] = False  # padding in the first caption
    return emb, mask


# ----------------------------------------------------------------------------------------------
# model.py: frame-wise causal attention, masks, tokens

def frames_output(model, tokens, mask, grid):
    context = model.text_context(*random_text(tokens.shape[0], model.config))
    with torch.no_grad():
        return model.forward_frames(tokens, mask, 0, grid, context)


def test_frame_causal_and_bidirectional_inside_frame():
    model = random_model()
    grid, T = (3, 3), 4
    L = grid[0] * grid[1]
    tokens = torch.randn(2, T * L, model.config.token_dim)
    mask = torch.rand(2, T * L) < 0.3
    z = frames_output(model, tokens, mask, grid)
    for t in range(T - 1):
        changed = tokens.clone()
        changed[:, (t + 1) * L + 4] += 1.0  # one token of frame t + 1
        z2 = frames_output(model, changed, mask, grid)
        assert torch.allclose(z[:, :(t + 1) * L], z2[:, :(t + 1) * L], atol=1e-6), f"frame {t + 1} leaks into frames <= {t}"
        assert (z[:, (t + 1) * L:] - z2[:, (t + 1) * L:]).abs().amax() > 1e-4
    # one token of frame 1 changes every other token of frame 1: bidirectional inside the frame
    changed = tokens.clone()
    changed[:, L + 8] += 1.0
    z2 = frames_output(model, changed, mask, grid)
    delta = (z[:, L:2 * L] - z2[:, L:2 * L]).abs().amax(dim=-1)
    assert (delta[:, :8] > 1e-5).all()
    # the ablation without causal attention does see the future (so the test above can fail)
    model.config.causal = False
    changed = tokens.clone()
    changed[:, 3 * L] += 1.0
    assert not torch.allclose(frames_output(model, tokens, mask, grid)[:, :L], frames_output(model, changed, mask, grid)[:, :L], atol=1e-5)


def test_masked_token_input_is_ignored():
    """A masked token's value must not reach the model: only the learned mask token does."""
    model = random_model()
    tokens = torch.randn(1, 2 * 4, model.config.token_dim)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 5] = True
    changed = tokens.clone()
    changed[0, 5] = 100.0
    assert torch.equal(frames_output(model, tokens, mask, (2, 2)), frames_output(model, changed, mask, (2, 2)))


def test_text_padding_is_masked_and_text_matters():
    model = random_model()
    tokens = torch.randn(2, 4, model.config.token_dim)
    emb, mask = random_text(2, model.config)
    context = model.text_context(emb, mask)
    padded = emb.clone()
    padded[0, ~mask[0]] = 50.0  # change only padding positions of caption 0
    with torch.no_grad():
        z = model.forward_frames(tokens, None, 0, (2, 2), context)
        z_pad = model.forward_frames(tokens, None, 0, (2, 2), model.text_context(padded, mask))
        z_null = model.forward_frames(tokens, None, 0, (2, 2), model.null_context(2))
    assert torch.allclose(z, z_pad, atol=1e-6)
    assert (z - z_null).abs().amax() > 1e-3


def test_patchify_round_trip_and_raster_order():
    latents = torch.randn(2, 3, 4, 6, 8)
    tokens = patchify(latents, 2)
    assert tokens.shape == (2, 3, 12, 16)
    assert torch.equal(unpatchify(tokens, 2, 6, 8), latents)
    # token 1 of a frame is the patch at row 0, column 1, channels major then (dy, dx)
    assert torch.equal(tokens[0, 0, 1], latents[0, 0, :, 0:2, 2:4].reshape(-1))


def test_mask_ratio_is_marss_truncated_normal():
    r = sample_mask_ratios(200_000, 0.7, 0.25, "cpu").double()
    assert r.min() >= 0.7 and r.max() <= 1.0
    # moments of the normal N(1, 0.25^2) truncated to [0.7, 1], from the closed form
    a, b = (0.7 - 1) / 0.25, 0.0
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    mean = 1 + 0.25 * (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))
    assert abs(r.mean().item() - mean) < 2e-3


def test_training_loss_only_on_masked_tokens_of_target_frame(monkeypatch):
    """Capture what reaches the diffusion head: only masked tokens of one frame, 4 copies each,
    and the transformer never sees frames after the target frame."""
    model = random_model().train()
    seen = {}

    def fake_diffloss(target, z):
        seen["target"], seen["z"] = target, z
        return target.sum() * 0
    monkeypatch.setattr(model.diffloss, "forward", fake_diffloss)
    real = model.forward_frames

    def spy(tokens, mask, *args, **kwargs):
        seen["tokens"], seen["mask"] = tokens, mask
        return real(tokens, mask, *args, **kwargs)
    monkeypatch.setattr(model, "forward_frames", spy)
    latents = torch.randn(3, 4, 8, 4, 4)
    torch.manual_seed(3)
    model(latents, *random_text(3, model.config))
    L = 16
    n_frames = seen["tokens"].shape[1] // L
    target = n_frames - 1
    mask = seen["mask"].view(3, n_frames, L)
    assert not mask[:, :target].any(), "frames before t must be fully visible"
    n_masked = mask[:, target].sum(dim=1)
    assert ((n_masked >= math.ceil(0.7 * L)) & (n_masked <= L)).all()
    expected = patchify(latents, 1)[:, target][mask[:, target]]
    assert torch.equal(seen["target"], expected.repeat(4, 1))
    assert seen["z"].shape == (4 * int(n_masked.sum()), model.config.n_embd)


def test_videomar_preset_has_1_4b_parameters():
    with torch.device("meta"):
        model = VideoMAR(VideoMARConfig(**PRESETS["videomar"]))
    n = sum(p.numel() for p in model.parameters())
    assert 1.3e9 <= n <= 1.5e9, n
    assert (model.config.n_layer, model.config.n_embd, model.config.diffloss_d, model.config.diffloss_w) == (36, 1536, 3, 1280)


# ----------------------------------------------------------------------------------------------
# rope3d.py

def test_rope_scores_depend_only_on_offsets():
    head_dim, grid = 32, (4, 5, 6)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)

    def score(pos_q, pos_k, shift):
        (dt, dh, dw) = shift
        F, H, W = grid[0] + dt, grid[1] + dh, grid[2] + dw
        freqs = rope_frequencies(head_dim, grid[0], H, W, frame_offset=dt)
        index = lambda t, r, c: (t) * H * W + (r + dh) * W + (c + dw)
        fq = freqs[index(*pos_q)][None, None, None]
        fk = freqs[index(*pos_k)][None, None, None]
        return (apply_rope(q.view(1, 1, 1, -1), fq) * apply_rope(k.view(1, 1, 1, -1), fk)).sum().item()

    pairs = [((0, 0, 0), (3, 4, 5)), ((2, 1, 3), (1, 4, 0)), ((3, 2, 2), (3, 2, 2))]
    for pos_q, pos_k in pairs:
        base = score(pos_q, pos_k, (0, 0, 0))
        for shift in [(1, 0, 0), (0, 3, 0), (0, 0, 7), (5, 2, 9), (1000, 200, 300)]:
            assert abs(score(pos_q, pos_k, shift) - base) < 1e-4 * max(1, abs(base)), (pos_q, pos_k, shift)
    # each axis matters: moving only the key along one axis changes the score
    base = score((0, 0, 0), (0, 0, 0), (0, 0, 0))
    for other in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert abs(score((0, 0, 0), other, (0, 0, 0)) - base) > 1e-3


def test_rope_is_a_rotation():
    x = torch.randn(2, 3, 40, 24)
    y = apply_rope(x, rope_frequencies(24, 2, 4, 5, frame_offset=7))
    assert torch.allclose(x.norm(dim=-1), y.norm(dim=-1), atol=1e-5)
    assert torch.allclose(apply_rope(x, rope_frequencies(24, 2, 4, 5, frame_offset=0))[:, :, :20], x[:, :, :20] * 0 + apply_rope(x[:, :, :20], rope_frequencies(24, 1, 4, 5)), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# diffusion.py: MAR's head, ADM's formulation

def test_cosine_schedule_matches_closed_form():
    d = create_diffusion("")
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = torch.tensor([f((i + 1) / 1000) / f(0) for i in range(1000)], dtype=torch.float64)
    assert d.num_timesteps == 1000
    assert torch.allclose(d.alphas_cumprod[:999], expected[:999], rtol=1e-9)
    assert abs(d.betas[-1].item() - 0.999) < 1e-12  # max_beta clips the last step
    assert torch.all(d.betas[:-1] < 0.999)


def test_respacing_to_100_steps():
    base, spaced = create_diffusion(""), create_diffusion("100")
    assert spaced.num_timesteps == 100
    assert spaced.timestep_map == [round(i * 999 / 99) for i in range(100)]
    assert spaced.timestep_map[0] == 0 and spaced.timestep_map[-1] == 999
    assert torch.allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map])
    expected_betas = 1 - spaced.alphas_cumprod[1:] / spaced.alphas_cumprod[:-1]
    assert torch.allclose(spaced.betas[1:], expected_betas)


def test_training_losses_vlb_term():
    d = create_diffusion("")
    x0 = torch.rand(6, 5) * 1.6 - 0.8
    noise = torch.randn(6, 5)
    t = torch.tensor([0, 1, 10, 200, 700, 999])
    # the model predicts the true noise and v = -1 (the true posterior variance): KL = 0 for t >= 1
    perfect = torch.cat([noise, -torch.ones(6, 5)], dim=1)
    out = d.training_losses(lambda x, tt: perfect, x0, t, noise=noise)
    vb_perfect = out["vb"]
    assert torch.allclose(out["mse"], torch.zeros(6), atol=1e-10)
    assert (out["vb"][1:].abs() < 1e-4).all()
    assert out["vb"][0] > 0  # t = 0: the discretised decoder NLL, not a KL
    assert torch.allclose(out["loss"], out["mse"] + out["vb"])
    # a wrong variance costs VLB; its gradient reaches only the variance half of the output
    output = torch.cat([noise + 0.1, torch.ones(6, 5)], dim=1).requires_grad_()
    out = d.training_losses(lambda x, tt: output, x0, t, noise=noise)
    assert (out["vb"][1:] > vb_perfect[1:] + 1e-5).all()
    out["vb"].sum().backward()
    assert torch.all(output.grad[:, :5] == 0) and output.grad[:, 5:].abs().sum() > 0
    output.grad = None
    out = d.training_losses(lambda x, tt: output, x0, t, noise=noise)
    out["mse"].sum().backward()
    assert torch.all(output.grad[:, 5:] == 0) and output.grad[:, :5].abs().sum() > 0


def test_diffloss_parameter_names_are_mars():
    names = set(DiffLoss(16, 64, 3, 32).state_dict())
    for name in ["net.time_embed.mlp.0.weight", "net.time_embed.mlp.2.weight", "net.cond_embed.weight",
                 "net.input_proj.weight", "net.res_blocks.0.in_ln.weight", "net.res_blocks.0.mlp.0.weight",
                 "net.res_blocks.2.mlp.2.bias", "net.res_blocks.0.adaLN_modulation.1.weight",
                 "net.final_layer.linear.weight", "net.final_layer.adaLN_modulation.1.weight"]:
        assert name in names
    assert not any("diffusion" in n for n in names)  # schedules are not weights


def reference_cfg_sampler(head, z, cfg, temperature, noise, generator):
    """A straight port of MAR's DiffLoss.sample: forward_with_cfg on both halves, ADM's loop."""
    d, n, C = head.gen_diffusion, noise.shape[0], head.in_channels
    x = torch.cat([noise, noise])
    for i in reversed(range(d.num_timesteps)):
        half = x[:n]
        out = head.net(torch.cat([half, half]), d.timesteps[i].expand(2 * n), z)
        eps, rest = out[:, :C], out[:, C:]
        guided = eps[n:] + cfg * (eps[:n] - eps[n:])
        out = torch.cat([torch.cat([guided, guided]), rest], dim=1)
        ac, ac_prev = d.alphas_cumprod[i].item(), d.alphas_cumprod_prev[i].item()
        beta = d.betas[i].item()
        x0 = (x - math.sqrt(1 - ac) * out[:, :C]) / math.sqrt(ac)
        mean = beta * math.sqrt(ac_prev) / (1 - ac) * x0 + (1 - ac_prev) * math.sqrt(1 - beta) / (1 - ac) * x
        post_var = [beta * (1 - ac_prev) / (1 - ac) for beta, ac, ac_prev in zip(d.betas.tolist(), d.alphas_cumprod.tolist(), d.alphas_cumprod_prev.tolist())]
        min_log = math.log(post_var[max(i, 1)])
        frac = (out[:, C:] + 1) / 2
        log_var = frac * math.log(beta) + (1 - frac) * min_log
        if i > 0:
            step_noise = torch.randn(n, C, generator=generator)
            x = mean + torch.exp(0.5 * log_var) * temperature * torch.cat([step_noise, step_noise])
        else:
            x = mean
    return x[:n]


def test_diffloss_sample_matches_reference_loop():
    torch.manual_seed(0)
    head = DiffLoss(6, 24, 2, 32, num_sampling_steps="20").eval()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(std=0.1)
    z = torch.randn(8, 24)
    noise = torch.randn(4, 6)
    with torch.no_grad():
        fast = head.sample(z, temperature=0.9, cfg=2.5, noise=noise, generator=torch.Generator().manual_seed(5))
        slow = reference_cfg_sampler(head, z, 2.5, 0.9, noise, torch.Generator().manual_seed(5))
    assert torch.allclose(fast, slow, rtol=1e-3, atol=1e-3 * slow.abs().max().item())
    # the guidance is really applied: cfg = 1 on the conditional rows alone gives another sample
    with torch.no_grad():
        plain = head.sample(z[:4], temperature=0.9, noise=noise, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(plain, fast, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# learning: the whole model overfits one clip

def test_tiny_model_overfits_one_clip():
    torch.manual_seed(0)
    config = tiny_config(latent_channels=4, n_embd=64, diffloss_w=64, text_drop_prob=0.0)
    model = VideoMAR(config)
    latents = torch.rand(1, 2, 4, 3, 3) * 1.6 - 0.8
    text = random_text(1, config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(400):
        loss = torch.stack([model(latents, *text) for _ in range(2)]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first / 4, (first, last)
    # the loss fell because z tells each token its value: predict frame 1 from a visible
    # frame 0 and compare the denoising error with z given to the wrong tokens
    model.eval()
    tokens = patchify(latents, 1).flatten(1, 2)
    mask = torch.arange(18) >= 9
    with torch.no_grad():
        z = model.forward_frames(tokens, mask[None], 0, (3, 3), model.text_context(*text))[0, 9:]
        target = tokens[0, 9:].repeat(20, 1)
        t = torch.arange(20).repeat_interleave(9) * 40 + 100
        noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
        mse = lambda cond: model.diffloss.train_diffusion.training_losses(
            model.diffloss.net, target, t, dict(c=cond.repeat(20, 1)), noise=noise)["mse"].mean()
        assert mse(z) < 0.5 * mse(z.roll(1, dims=0)), (mse(z), mse(z.roll(1, dims=0)))


# ----------------------------------------------------------------------------------------------
# sample.py: generation with the KV cache

def sample_setup(batch=2, k=1, grid=(3, 3), seed=0):
    model = random_model(seed)
    with torch.no_grad():  # keep sampled values in a sane range: a small, contracting head output
        model.diffloss.net.final_layer.linear.weight.mul_(0.1)
    cond = torch.randn(batch, k, model.config.latent_channels, *grid, generator=torch.Generator().manual_seed(seed))
    return model, cond, random_text(batch, model.config)


def test_kv_cache_matches_uncached_generation():
    model, cond, text = sample_setup()
    run = lambda cached: generate(model, cond, text, num_frames=5, num_iter=3, cfg=3.0, use_kv_cache=cached,
                                  generator=torch.Generator().manual_seed(7))
    cached, uncached = run(True), run(False)
    assert cached.shape == (2, 5, 8, 3, 3)
    assert torch.allclose(cached, uncached, atol=1e-4, rtol=1e-4)
    assert (cached[:, 1:] - cached[:, 1:].mean()).abs().mean() > 1e-3  # not a trivial constant video
    # same seed, same video; another seed, another video
    assert torch.equal(cached, run(True))
    other = generate(model, cond, text, 5, num_iter=3, cfg=3.0, generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(other, cached)


def test_cache_after_prefill_and_commits_equals_full_forward():
    model, cond, text = sample_setup(k=2)
    grid, L, T = (3, 3), 9, 4
    tokens = torch.randn(2, T * L, model.config.token_dim)
    context = model.text_context(*text)
    with torch.no_grad():
        stepwise = KVCache(model.config, 2, T * L, "cpu")
        model.forward_frames(tokens[:, :2 * L], None, 0, grid, context, stepwise, commit=True)  # prefill 2 frames
        for f in range(2, T):
            partial = torch.rand(2, L) < 0.5  # a masked step writes K/V but must not commit them
            model.forward_frames(tokens[:, f * L:(f + 1) * L], partial, f, grid, context, stepwise)
            model.forward_frames(tokens[:, f * L:(f + 1) * L], None, f, grid, context, stepwise, commit=True)
        full = KVCache(model.config, 2, T * L, "cpu")
        model.forward_frames(tokens, None, 0, grid, context, full, commit=True)
    assert stepwise.length == full.length == T * L
    for layer in range(model.config.n_layer):
        assert torch.allclose(stepwise.k[layer], full.k[layer], atol=1e-5)
        assert torch.allclose(stepwise.v[layer], full.v[layer], atol=1e-5)


def test_video_to_video_keeps_given_frames_and_extrapolates():
    model, cond, text = sample_setup(batch=1, k=2, grid=(5, 7))  # grid and length unlike training
    out = generate(model, cond, text, num_frames=9, num_iter=2, cfg=2.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 9, 8, 5, 7)
    assert torch.equal(out[:, :2], cond)
    assert torch.isfinite(out).all()


def test_text_to_video_and_clip_range():
    model, cond, text = sample_setup(k=0)
    out = generate(model, cond, text, num_frames=3, num_iter=2, cfg=1.0, clip_range=(-0.05, 0.05),
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 8, 3, 3)
    assert out[:, 1:].abs().max() <= 0.05  # clipped after the first generated frame
    assert out[:, 0].abs().max() > 0.05    # the first generated frame is not clipped


def test_progressive_temperature():
    assert [round(frame_temperature("progressive", i), 6) for i in range(4)] == [1.0, 0.91, 0.901, 0.9001]
    assert frame_temperature(0.95, 3) == 0.95
