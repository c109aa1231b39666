"""
The per-token diffusion head of VideoMAR (§5.1: "we mostly follow MAR").

Every token is sampled by a small MLP denoiser conditioned on the transformer's output z for
that token: MAR's diffusion loss. The formulation is exactly MAR's, which is DiT's and ADM's:
cosine noise schedule over 1000 steps, epsilon prediction, learned-range variance trained with
the VLB term, sampling respaced to 100 steps, a temperature that scales the sampling noise, and
classifier-free guidance on epsilon. Parameter names equal MAR's `DiffLoss`, so a MAR checkpoint
of the head loads here weight for weight. `DiffLoss.sample` is the sampler `VideoMAR.generate`
hands each token's z to.

Usage:
    head = DiffLoss(target_channels=16, z_channels=1536, depth=3, width=1280,
                    num_sampling_steps="100")
    loss = head(target, z)                              # target (N, 16), z (N, 1536)
    x = head.sample(torch.cat([z_cond, z_uncond]), temperature=0.95, cfg=3.0)   # (N, 16)
"""
import math
from functools import partial

import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------------------
# The denoiser: MAR's SimpleMLPAdaLN

def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the (original, not respaced) timestep, then an MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
            nn.Linear(hidden_size, hidden_size))

    def forward(self, t, max_period=10000):
        half = self.frequency_embedding_size // 2
        steps = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * steps / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class ResBlock(nn.Module):
    """An MLP residual block whose LayerNorm is modulated (AdaLN) by time + condition."""

    def __init__(self, channels):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(),
                                 nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x, modulation):
        shift, scale, gate = modulation
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, model_channels, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(),
                                              nn.Linear(model_channels, 2 * model_channels))

    def forward(self, x, modulation):
        shift, scale = modulation
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """MAR's denoiser: x_t (N, C), timestep t (N,), condition c (N, z_channels) -> (N, 2C),
    the predicted noise epsilon and the variance interpolation v (learned-range variance)."""

    def __init__(self, in_channels, model_channels, out_channels, z_channels, num_res_blocks):
        super().__init__()
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # Zero-initialised modulation and output: every block starts as the identity (DiT's
        # adaLN-Zero)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def modulations(self, t, c):
        """Shift, scale (and gate) of every AdaLN layer. They depend on t and c but not on x_t."""
        y = self.time_embed(t) + self.cond_embed(c)
        blocks = [block.adaLN_modulation(y).chunk(3, dim=-1) for block in self.res_blocks]
        return blocks, self.final_layer.adaLN_modulation(y).chunk(2, dim=-1)

    def modulations_per_step(self, timesteps, c):
        """The modulations of every sampling step, for conditions c (N, z_channels), computed in
        one batched pass: a list with, per step, what `denoise` takes."""
        steps, rows = len(timesteps), c.shape[0]
        blocks, final = self.modulations(timesteps.repeat_interleave(rows), c.repeat(steps, 1))
        per_step = lambda chunks: [chunk.view(steps, rows, -1).unbind(0) for chunk in chunks]
        blocks, final = [per_step(block) for block in blocks], per_step(final)
        return [([[m[i] for m in block] for block in blocks], [m[i] for m in final])
                for i in range(steps)]

    def denoise(self, x, modulations):
        """The MLP on x_t under given modulations: the part of forward that depends on x_t."""
        blocks, final = modulations
        x = self.input_proj(x)
        for block, modulation in zip(self.res_blocks, blocks):
            x = block(x, modulation)
        return self.final_layer(x, final)

    def forward(self, x, t, c):
        return self.denoise(x, self.modulations(t, c))


# ----------------------------------------------------------------------------------------------
# Gaussian diffusion: ADM's formulation (epsilon prediction, learned-range variance, MSE + VLB)

def cosine_betas(num_steps, max_beta=0.999):
    """Improved DDPM's cosine schedule: alpha_bar(s) = cos^2(((s + 0.008) / 1.008) * pi / 2)."""
    alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps),
                             max_beta) for i in range(num_steps)], dtype=torch.float64)


def space_timesteps(num_timesteps, section_counts):
    """ADM's respacing: "100" keeps 100 of the original steps, evenly strided, first and last
    included. A comma list ("10,15,20") spaces each equal section of the schedule separately."""
    counts = [int(x) for x in str(section_counts).split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count == 1 else (size - 1) / (count - 1)
        kept.update(start + round(stride * j) for j in range(count))
        start += size
    return sorted(kept)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data in [-1, 1] quantised to 256 bins (ADM's decoder term at t = 0)."""
    normal_cdf = lambda y: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi)
                                                   * (y + 0.044715 * y ** 3)))
    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus = normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion(nn.Module):
    """The diffusion process over the kept timesteps `timestep_map` of a base schedule.

    With every step kept this is the training process; with 100 kept it is ADM's SpacedDiffusion
    for sampling: betas are recomputed from alphas_cumprod at the kept steps, and the denoiser is
    called with the original timestep numbers. The per-step coefficients are float32 buffers
    (they follow the module to its device), computed once in float64 as ADM does."""

    def __init__(self, base_betas, timestep_map):
        super().__init__()
        base_alphas_cumprod = torch.cumprod(1.0 - base_betas, dim=0)
        self.timestep_map = list(timestep_map)
        self.num_timesteps = len(self.timestep_map)
        self.alphas_cumprod = base_alphas_cumprod[self.timestep_map]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.betas = 1.0 - self.alphas_cumprod / previous
        self.alphas_cumprod_prev = previous

        posterior_variance = self.betas * (1.0 - previous) / (1.0 - self.alphas_cumprod)
        coefficients = dict(
            timesteps=torch.tensor(self.timestep_map, dtype=torch.float64),
            sqrt_alphas_cumprod=self.alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - self.alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / self.alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / self.alphas_cumprod - 1).sqrt(),
            # the posterior variance is 0 at t = 0: ADM clips its log to the value at t = 1
            posterior_log_variance_clipped=torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            posterior_mean_coef1=self.betas * previous.sqrt() / (1.0 - self.alphas_cumprod),
            posterior_mean_coef2=(1.0 - previous) * (1.0 - self.betas).sqrt()
            / (1.0 - self.alphas_cumprod),
            log_betas=torch.log(self.betas),
        )
        for name, value in coefficients.items():
            self.register_buffer(name, value.float(), persistent=False)

    # q(x_t | x_0) and q(x_{t-1} | x_t, x_0)

    def q_sample(self, x_start, t, noise):
        return (self.sqrt_alphas_cumprod[t, None] * x_start
                + self.sqrt_one_minus_alphas_cumprod[t, None] * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (self.posterior_mean_coef1[t, None] * x_start
                + self.posterior_mean_coef2[t, None] * x_t)
        return mean, self.posterior_log_variance_clipped[t, None]

    # p(x_{t-1} | x_t) from the denoiser's output

    def p_mean_variance(self, model_output, x_t, t, clip_range=None):
        """Mean and log-variance of p(x_{t-1} | x_t); t is a (N,) tensor or a python int.
        `clip_range` clamps the predicted x_0 (ADM's clip_denoised; MAR uses none)."""
        eps, v = model_output.float().chunk(2, dim=-1)
        index = (t, None) if torch.is_tensor(t) else t
        # learned-range variance: interpolate between the posterior variance and beta_t
        frac = (v + 1) / 2
        log_variance = (frac * self.log_betas[index]
                        + (1 - frac) * self.posterior_log_variance_clipped[index])
        pred_xstart = (self.sqrt_recip_alphas_cumprod[index] * x_t
                       - self.sqrt_recipm1_alphas_cumprod[index] * eps)
        if clip_range is not None:
            pred_xstart = pred_xstart.clamp(*clip_range)
        mean = (self.posterior_mean_coef1[index] * pred_xstart
                + self.posterior_mean_coef2[index] * x_t)
        return mean, log_variance

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """MSE on epsilon plus the VLB term, per row. The VLB term sees the predicted epsilon
        detached, so its gradient reaches the variance output only (Improved DDPM, ADM)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.timesteps[t], **(model_kwargs or {}))
        eps, v = model_output.float().chunk(2, dim=-1)
        mse = ((noise - eps) ** 2).mean(dim=-1)

        true_mean, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        mean, log_variance = self.p_mean_variance(torch.cat([eps.detach(), v], dim=-1), x_t, t)
        kl = normal_kl(true_mean, true_log_variance, mean, log_variance).mean(dim=-1)
        kl = kl / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance).mean(dim=-1)
        nll = nll / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def p_sample(self, model_output, x, i, temperature=1.0, generator=None, clip_range=None):
        """One ancestral step x_i -> x_{i-1}; the temperature scales the added noise (MAR)."""
        mean, log_variance = self.p_mean_variance(model_output, x, i, clip_range)
        if i == 0:
            return mean
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return mean + torch.exp(0.5 * log_variance) * temperature * noise

    @torch.no_grad()
    def p_sample_loop(self, model, shape, noise=None, temperature=1.0, generator=None,
                      clip_range=None):
        """Ancestral sampling from x_T = noise (drawn if None) down to x_0. `model(x, i)` ->
        (N, 2C) is the denoiser at step i of the kept ones, whose timestep is self.timesteps[i]."""
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=self.timesteps.device)
        x = noise
        for i in reversed(range(self.num_timesteps)):
            x = self.p_sample(model(x, i), x, i, temperature, generator, clip_range)
        return x


def create_diffusion(timestep_respacing, diffusion_steps=1000):
    """ADM's factory, for the cosine schedule: "" or None keeps all `diffusion_steps`, "100"
    respaces to 100 steps."""
    kept = space_timesteps(diffusion_steps, timestep_respacing or str(diffusion_steps))
    return GaussianDiffusion(cosine_betas(diffusion_steps), kept)


# ----------------------------------------------------------------------------------------------
# The diffusion loss and the per-token sampler

class DiffLoss(nn.Module):
    def __init__(self, target_channels, z_channels, depth, width, num_sampling_steps="100"):
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, target_channels * 2, z_channels, depth)
        self.train_diffusion = create_diffusion(timestep_respacing="")
        self.gen_diffusion = create_diffusion(timestep_respacing=str(num_sampling_steps))

    def forward(self, target, z, mask=None, generator=None):
        """Mean diffusion loss of tokens `target` (N, C) given conditions `z` (N, z_channels),
        each with its own random timestep; `mask` (N,) weights the rows. A `generator` draws the
        timesteps and the noise, so that two calls can share them (metrics.caption_likelihood)."""
        num_timesteps, noise = self.train_diffusion.num_timesteps, None
        if generator is None:
            t = torch.randint(0, num_timesteps, (target.shape[0],), device=target.device)
        else:
            t = torch.randint(0, num_timesteps, (target.shape[0],), generator=generator,
                              device=generator.device).to(target.device)
            noise = torch.randn(target.shape, generator=generator,
                                device=generator.device).to(target)
        loss = self.train_diffusion.training_losses(self.net, target, t, dict(c=z), noise)["loss"]
        if mask is None:
            return loss.mean()
        return (loss * mask).sum() / mask.sum()

    @torch.no_grad()
    def sample(self, z, temperature=1.0, cfg=1.0, noise=None, generator=None, clip_range=None):
        """Sample one token per condition. With cfg != 1, z holds the conditional rows then the
        unconditional ones; both halves denoise the same x (the conditional half's), and the
        guided epsilon is uncond + cfg (cond - uncond). `noise` is the initial x_T (N, C).
        `clip_range` (lo, hi): the tokenizer's latent range, imposed on every predicted x_0, so
        the last step (whose mean is that x_0) lands inside it. MAR needs none after long
        training; a briefly trained head does: at t = 999 of the cosine schedule
        sqrt(alpha_bar) ~ 5e-5, so a small error in epsilon becomes a huge x_0."""
        diffusion, guided = self.gen_diffusion, cfg != 1.0
        n = z.shape[0] // 2 if guided else z.shape[0]
        # Hot path (every token of every frame, 100 steps, in many small calls): the AdaLN
        # modulations depend on the timestep and z, not on x_t, so those of every step are
        # computed at once, before the loop; the loop runs only the MLP on x_t and the update.
        modulations = self.net.modulations_per_step(diffusion.timesteps, z)

        def guided_denoiser(x, i):  # MAR's forward_with_cfg, at step i
            output = self.net.denoise(torch.cat([x, x]) if guided else x, modulations[i])
            if not guided:
                return output
            eps, v = output.chunk(2, dim=-1)
            eps_cond, eps_uncond = eps.chunk(2)
            return torch.cat([eps_uncond + cfg * (eps_cond - eps_uncond), v[:n]], dim=-1)

        return diffusion.p_sample_loop(guided_denoiser, (n, self.in_channels), noise, temperature,
                                       generator, clip_range)

    def sampler(self, clip_range=None):
        """`sample` with every predicted x_0 held in `clip_range` (lo, hi), the tokenizer's latent
        range: the sampler VideoMAR.generate draws tokens with (its `sampler`)."""
        return partial(self.sample, clip_range=clip_range)
