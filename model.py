"""
VideoMAR: a decoder-only, masked autoregressive video model on continuous tokens (§4.1).

A video's latents (B, T, C, h, w) become T frames of L tokens. One transformer stack sees every
token, visible or masked; attention is frame-wise causal (a token sees all tokens of its own
and earlier frames), the only position encoding is 3D RoPE, and text enters through
cross-attention. Each token's output z conditions a small diffusion head (diffusion.py) that
models the token's continuous value. Training uses the next-frame diffusion loss (Eq. 4.1);
sampling (`VideoMAR.generate`, §4.3) runs frame by frame with a KV cache, the tokens of each
frame in parallel by masked generation.

Usage:
    model = VideoMAR(VideoMARConfig(**PRESETS["tiny"]))   # VideoMARConfig(): the paper's 1.4B
    loss = model(latents, text, text_mask)        # latents (B, T, C, h, w), text (B, S, text_dim)
    video = model.generate(first_latent_frame, (text, text_mask), num_latent_frames=7)
"""
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import DiffLoss
from rope3d import apply_rope, rope_frequencies


@dataclass
class VideoMARConfig:
    # The defaults are §5.1's 1.4B model; PRESETS["tiny"] is the model that trains on a CPU.
    # Every field is an option of train.py; its metadata's "help" is what `--help` says of it.
    # tokens: latent channels C of the tokenizer, patched p x p into tokens of size C p p
    latent_channels: int = field(default=16, metadata=dict(help="latent channels C"))
    patch_size: int = field(default=1, metadata=dict(help="p: a token is p x p latents, C p p "
                                                          "values"))
    # the transformer (§5.1: 36 layers of width 1536)
    n_layer: int = 36
    n_embd: int = 1536
    n_head: int = 24
    mlp_ratio: float = 4.0
    qk_norm: bool = field(default=True, metadata=dict(
        help="RMSNorm of each head's queries and keys before RoPE (the paper is silent; the "
             "authors' Step-Video blocks have it), which keeps attention logits bounded at "
             "scale"))
    rope_theta: float = field(default=10000.0, metadata=dict(
        help="3D RoPE's base (the paper gives none: RoPE's usual 10000); a smaller one tells "
             "apart nearby positions of a small grid (RESULTS.md)"))
    # text condition (§5.1: Qwen2-1.5B hidden states, cross-attention)
    text_dim: int = field(default=1536, metadata=dict(help="width of the text's hidden states"))
    text_len: int = field(default=300, metadata=dict(
        help="S_max, a caption's tokens at most (300: the authors' released null text)"))
    text_drop_prob: float = field(default=0.1, metadata=dict(
        help="classifier-free guidance: drop the caption for 10% of clips"))
    # masking (MAR): training mask ratio ~ truncated normal, centre 1.0, std 0.25, on [0.7, 1.0]
    mask_ratio_min: float = field(default=0.7, metadata=dict(
        help="training masks hide this share of a frame's tokens at least (MAR's truncated "
             "normal, centre 1.0)"))
    mask_ratio_std: float = field(default=0.25, metadata=dict(
        help="the standard deviation of that truncated normal"))
    # the diffusion head (§5.1: an MLP of 3 blocks of width 1280)
    diffloss_d: int = field(default=3, metadata=dict(help="the head's residual blocks"))
    diffloss_w: int = field(default=1280, metadata=dict(help="the head's width"))
    num_sampling_steps: str = field(default="100", metadata=dict(
        help="diffusion steps when sampling, of the 1000 of training (ADM's respacing)"))
    diffusion_batch_mul: int = field(default=4, metadata=dict(
        help="noise draws per token in the loss (MAR's)"))
    # ablations of Table 4
    causal: bool = field(default=True, metadata=dict(
        help="frame-wise causal attention (Table 4; else every token sees every frame)"))
    next_frame_loss: bool = field(default=True, metadata=dict(
        help="the next-frame loss of Eq. 4.1 (Table 4; else \"total mask\", Eq. 3.1)"))
    # beyond the paper: off by default, each adds work only when on (RESULTS.md: their effects)
    all_frames: bool = field(default=False, metadata=dict(
        help="beyond the paper: Eq. 4.1 for every target frame t in one pass (all_frames_z), "
             "not one t a batch: the same objective, T times the signal a step (RESULTS.md)"))
    text_pooled: bool = field(default=False, metadata=dict(
        help="beyond the paper: the caption's mean added to every token before the first block, "
             "so that the first self-attention already sees the caption (RESULTS.md)"))
    token_regression: float = field(default=0.0, metadata=dict(
        help="beyond the paper: weight of an MSE of the masked tokens after frame 0 read "
             "linearly from z, added to the diffusion loss to teach z a token's mean sooner "
             "(RESULTS.md)"))
    context_erase_prob: float = field(default=0.0, metadata=dict(
        help="beyond the paper: with all_frames, each context frame after frame 0 has, with this "
             "probability, its 1-8 most salient tokens set to the frame's median token, the "
             "targets kept true: the model learns to draw an object its last frame lost "
             "(RESULTS.md)"))

    @property
    def token_dim(self):
        return self.latent_channels * self.patch_size ** 2


PRESETS = {
    # §5.1: the paper's 1.4B model, the defaults above; Cosmos CV4x8x8 latents (16 channels),
    # Qwen2-1.5B text (1536)
    "videomar": {},
    # what trains on a 2-core CPU in minutes: latents of the default tokenizer pca:4x4x4:16 and
    # MiniLM text (train.py sizes both from the tokenizer and text encoder it is given); no
    # QK-norm (no instability to cure at this size in fp32); a narrow head, which leaves more of
    # each token to z; width 128 and 2 noise draws a token, cheap steps: more clips a minute,
    # which buys more than width (RESULTS.md); and the beyond-paper knobs on (RESULTS.md)
    "tiny": dict(latent_channels=16, n_layer=4, n_embd=128, n_head=4, diffloss_d=3,
                 diffloss_w=128, text_dim=384, text_len=32, qk_norm=False, diffusion_batch_mul=2,
                 all_frames=True, text_pooled=True, token_regression=1.0,
                 context_erase_prob=0.1),
}


# ----------------------------------------------------------------------------------------------
# Tokens, masks and the temperature schedule

def patchify(latents, p):
    """(B, T, C, h, w) -> (B, T, L, C p p), L = (h/p)(w/p) tokens per frame in raster order."""
    B, T, C, h, w = latents.shape
    x = latents.reshape(B, T, C, h // p, p, w // p, p)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, T, (h // p) * (w // p), C * p * p)


def unpatchify(tokens, p, h, w):
    """(B, T, L, C p p) -> (B, T, C, h, w), the inverse of patchify."""
    B, T, L, D = tokens.shape
    x = tokens.reshape(B, T, h // p, w // p, D // (p * p), p, p)
    return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, T, D // (p * p), h, w)


def sample_mask_ratios(n, minimum, std, device):
    """MAR's truncated normal on [minimum, 1] with centre 1: inverse-CDF sampling of its lower
    half."""
    lower = torch.special.ndtr(torch.tensor((minimum - 1.0) / std, dtype=torch.float64))
    u = lower + (0.5 - lower) * torch.rand(n, dtype=torch.float64)
    return (1.0 + std * torch.special.ndtri(u)).float().to(device)


def random_masks(batch, length, ratios, device):
    """(batch, length) bool, True = masked: ceil(r L) tokens of each row, in a random order."""
    num_masked = torch.ceil(ratios * length).long().clamp(1, length)
    order = torch.rand(batch, length, device=device).argsort(dim=1)
    return order.argsort(dim=1) < num_masked[:, None].to(device)


def erase_salient(tokens, prob, most=8):
    """Context frames (B, n, L, D) with objects erased: each frame after the first, with
    probability prob, has its k ~ U{1..most} tokens farthest from the frame's median token (the
    object's, on a plain background) set to that median token."""
    B, n, L, _ = tokens.shape
    median = tokens.median(dim=2, keepdim=True).values
    rank = (tokens - median).norm(dim=-1).argsort(dim=2, descending=True).argsort(dim=2)
    k = torch.randint(1, most + 1, (B, n, 1), device=tokens.device)
    hit = torch.rand(B, n, 1, device=tokens.device) < prob
    hit[:, 0] = False  # frame 0 is the given image: always true
    return torch.where((hit & (rank < k))[..., None], median, tokens)


def frame_causal_mask(query_frames, key_frames):
    """bool (Nq, Nk), True = may attend: a token sees every token of its own and earlier frames."""
    return query_frames[:, None] >= key_frames[None, :]


def all_frames_mask(T, L, device=None):
    """bool ((2T-1)L, (2T-1)L), True = may attend, of VideoMAR.all_frames_z's sequence: the clean
    frames 0..T-2, then a masked copy of every frame 0..T-1. A clean frame sees the clean frames
    up to its own (frame-wise causal); the copy of frame t sees the clean frames before t and
    itself (bidirectionally), never the clean frame t, a later one or another copy."""
    frame = torch.arange(T, device=device).repeat_interleave(L)
    frame = torch.cat([frame[:(T - 1) * L], frame])
    copy = torch.arange(len(frame), device=device) >= (T - 1) * L
    q_frame, k_frame, q_copy, k_copy = frame[:, None], frame[None], copy[:, None], copy[None]
    sees_clean = ~k_copy & ((k_frame < q_frame) | (~q_copy & (k_frame == q_frame)))
    return sees_clean | (q_copy & k_copy & (k_frame == q_frame))


def next_mask(mask, order, step, num_steps, total):
    """MAR's cosine masking schedule: after `step` of `num_steps`, cos(pi/2 (step+1)/num_steps) of
    the `total` tokens stay masked, the first of each row's `order` among those masked now; at
    least one until the last step, which reveals the rest. Returns the next mask and how many it
    keeps (MAR's mask_len, which its linear CFG schedule reads, also at the last step)."""
    mask_len = math.floor(total * math.cos(math.pi / 2 * (step + 1) / num_steps))
    mask_len = max(1, min(int(mask[0].sum()) - 1, mask_len))
    following = torch.zeros_like(mask)
    if step < num_steps - 1:
        following.scatter_(1, order[:, :mask_len], True)
    return following, mask_len


def frame_temperature(temperature, i):
    """§4.3 and Appendix B: "progressive" gives the i-th generated frame 0.9 + 10^-(i+1)
    (1.0, 0.91, 0.901, ...): lower temperature for later frames suppresses accumulated error.
    A number gives every frame that constant (Appendix B finds 0.9 about as good)."""
    if temperature == "progressive":
        return 0.9 + 10.0 ** -(i + 1)
    return float(temperature)


def rows_per_video(cfg):
    """Rows a video takes when sampling: with classifier-free guidance (cfg != 1) two, its
    caption's and the null text's, which both get the same tokens; else one."""
    return 2 if cfg != 1.0 else 1


def linear_cfg(cfg, num_masked, total):
    """MAR's linear CFG schedule: the guidance scale grows from 1 to cfg with the share of the
    `total` tokens that are no longer masked; 1 stays 1 (no guidance)."""
    return 1 + (cfg - 1) * (total - num_masked) / total


# ----------------------------------------------------------------------------------------------
# The transformer

class KVCache:
    """Keys (RoPE applied) and values of the finished frames, per layer, preallocated for the
    whole video. A step writes the current frame's K and V just after the finished ones and
    attends to everything up to there; `commit` makes that frame part of the cache."""

    def __init__(self, config, batch, max_tokens):
        self.shape = (batch, config.n_head, max_tokens, config.n_embd // config.n_head)
        self.k, self.v = [None] * config.n_layer, [None] * config.n_layer
        self.length = 0

    def write(self, layer, k, v):
        if self.k[layer] is None:  # at first use, on k's device in k's dtype (bf16 under autocast)
            self.k[layer], self.v[layer] = k.new_zeros(self.shape), v.new_zeros(self.shape)
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def commit(self, num_tokens):
        self.length += num_tokens


class TextContext(NamedTuple):
    """A caption as the model sees it: per layer the keys and values of its tokens (the same at
    every sampling step, so computed once), its mask (B, S), True = a real token, and with
    text_pooled the mean of its projected tokens (B, n_embd), else None."""
    kv: list
    mask: torch.Tensor
    pooled: torch.Tensor | None

    def cat(self, other):
        """This context's rows, then other's (CFG: the conditional rows, then the null text's)."""
        kv = [(torch.cat([k, other_k]), torch.cat([v, other_v]))
              for (k, v), (other_k, other_v) in zip(self.kv, other.kv)]
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled])
        return TextContext(kv, torch.cat([self.mask, other.mask]), pooled)


class HeadRMSNorm(nn.RMSNorm):
    """RMSNorm over the last (head) dimension, computed in fp32 as Step-Video's, also under bf16
    autocast, and returned in the input's dtype."""

    def forward(self, x):
        return super().forward(x.float()).type_as(x)


def qk_norms(config):
    """QK-norm as in Step-Video's attention blocks (upstream code; not in the paper): RMSNorm
    with a learned weight (eps 1e-6) over each head's channels, for queries and for keys; else
    identities."""
    if not config.qk_norm:
        return nn.Identity(), nn.Identity()
    head_dim = config.n_embd // config.n_head
    return HeadRMSNorm(head_dim, eps=1e-6), HeadRMSNorm(head_dim, eps=1e-6)


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.q_norm, self.k_norm = qk_norms(config)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, rope, attn_mask=None, cache=None, layer=None):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)  # before RoPE, as Step-Video
        q, k = apply_rope(q, rope), apply_rope(k, rope)  # §4.3 3D RoPE on queries and keys
        if cache is not None:
            k, v = cache.write(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Video tokens attend to the text tokens (§5.1, as FAR); padding tokens are masked."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.q = nn.Linear(config.n_embd, config.n_embd)
        self.kv = nn.Linear(config.n_embd, 2 * config.n_embd)
        self.q_norm, self.k_norm = qk_norms(config)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def text_kv(self, text):
        """Keys and values of the text; the same at every sampling step, so computed once."""
        B, S, D = text.shape
        k, v = self.kv(text).view(B, S, 2, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        return self.k_norm(k), v

    def forward(self, x, text_k, text_v, text_mask):
        B, N, D = x.shape
        q = self.q_norm(self.q(x).view(B, N, self.n_head, D // self.n_head).transpose(1, 2))
        y = F.scaled_dot_product_attention(q, text_k, text_v,
                                           attn_mask=text_mask[:, None, None, :])
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.cross_attn = CrossAttention(config)
        self.ln_3 = nn.LayerNorm(config.n_embd)
        hidden = int(config.mlp_ratio * config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, hidden), nn.GELU(),
                                 nn.Linear(hidden, config.n_embd))

    def forward(self, x, rope, attn_mask, text_kv, text_mask, cache=None, layer=None):
        x = x + self.attn(self.ln_1(x), rope, attn_mask, cache, layer)
        x = x + self.cross_attn(self.ln_2(x), *text_kv, text_mask)
        return x + self.mlp(self.ln_3(x))


class VideoMAR(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.config = config
        self.token_proj = nn.Linear(config.token_dim, config.n_embd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.n_embd))
        self.text_proj = nn.Linear(config.text_dim, config.n_embd)
        self.null_text = nn.Parameter(torch.zeros(1, config.text_len, config.n_embd))
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.diffloss = DiffLoss(config.token_dim, config.n_embd, config.diffloss_d,
                                 config.diffloss_w, config.num_sampling_steps)
        # used in training only: it shapes z, the head samples from it
        self.token_readout = (nn.Linear(config.n_embd, config.token_dim)
                              if config.token_regression else None)
        self.initialize_weights()

    def initialize_weights(self):
        """As MAR: xavier-uniform linears, zero biases, mask token and null text N(0, 0.02);
        the diffusion head keeps its own (zero-initialised modulation and output)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("diffloss"):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.null_text, std=0.02)

    # -- inputs ----------------------------------------------------------------------------

    def embed(self, tokens, mask=None):
        """Tokens (B, N, token_dim) -> (B, N, n_embd); masked ones become the learned mask token."""
        x = self.token_proj(tokens)
        if mask is None:
            return x
        return torch.where(mask[..., None], self.mask_token.to(x.dtype), x)

    def text_context(self, text, text_mask, drop=None):
        """The TextContext of text (B, S, text_dim) with its mask: the projected text's keys and
        values in every layer. Rows where `drop` is True get the learned null text, all of it and
        every position attended, exactly as CFG's unconditional branch sees it when sampling
        (null_context): the text is padded to text_len first."""
        text = self.text_proj(text)
        S = text.shape[1]
        if S > self.config.text_len:
            raise ValueError(f"text has {S} tokens, more than text_len={self.config.text_len}")
        if drop is not None:
            padding = self.config.text_len - S  # none for the encoders, which pad to text_len
            text, text_mask = F.pad(text, (0, 0, 0, padding)), F.pad(text_mask, (0, padding))
            text = torch.where(drop[:, None, None], self.null_text.to(text.dtype), text)
            text_mask = text_mask | drop[:, None]
        return self.context_of(text, text_mask)

    def null_context(self, batch):
        """The unconditional branch of CFG: the learned null text, every position attended."""
        text = self.null_text.expand(batch, -1, -1)
        mask = torch.ones(batch, self.config.text_len, dtype=torch.bool, device=text.device)
        return self.context_of(text, mask)

    def context_of(self, text, mask):
        """The TextContext of projected text (B, S, n_embd) with its mask."""
        pooled = None
        if self.config.text_pooled:  # the mean of the real tokens
            weights = mask[..., None].to(text.dtype)
            pooled = (text * weights).sum(1) / weights.sum(1)
        return TextContext([block.cross_attn.text_kv(text) for block in self.blocks], mask,
                           pooled)

    def rope(self, frame_offset, num_latent_frames, grid, device):
        return rope_frequencies(self.config.n_embd // self.config.n_head, num_latent_frames, *grid,
                                frame_offset, self.config.rope_theta, device=device)

    # -- the stack -------------------------------------------------------------------------

    def transformer(self, x, rope, attn_mask, context, cache=None):
        """x (B, N, n_embd) -> z (B, N, n_embd). With a cache, x's keys and values are written
        after the cached ones and x attends to all of them."""
        if self.config.text_pooled:
            x = x + context.pooled[:, None].to(x.dtype)
        for layer, (block, text_kv) in enumerate(zip(self.blocks, context.kv)):
            x = block(x, rope, attn_mask, text_kv, context.mask, cache, layer)
        return self.ln_f(x)

    def frames_mask(self, first_query_frame, num_query_frames, L, device):
        """Frame-wise causal mask of frames [first, first + n) over keys of frames [0, first + n);
        None where it would allow everything (one query frame) or the model is not causal."""
        if not self.config.causal or num_query_frames == 1:
            return None
        key_frames = torch.arange(first_query_frame + num_query_frames, device=device)
        key_frames = key_frames.repeat_interleave(L)
        return frame_causal_mask(key_frames[first_query_frame * L:], key_frames)

    def forward_frames(self, tokens, mask, first_frame, grid, context, cache=None, commit=False):
        """z (B, n L, n_embd) of the tokens (B, n L, token_dim) of frames [first, first + n),
        masked where `mask` is True. With a cache these frames attend to the cached ones too;
        `commit` appends their keys and values to it."""
        L = grid[0] * grid[1]
        num_latent_frames = tokens.shape[1] // L
        x = self.embed(tokens, mask)
        rope = self.rope(first_frame, num_latent_frames, grid, tokens.device)
        attn_mask = self.frames_mask(first_frame, num_latent_frames, L, tokens.device)
        z = self.transformer(x, rope, attn_mask, context, cache)
        if commit:
            cache.commit(tokens.shape[1])
        return z

    # -- §4.1 the next-frame diffusion loss (Eq. 4.1) ---------------------------------------

    def target_frame_z(self, tokens, target, mask, grid, context):
        """z (B, L, n_embd) of frame `target` of tokens (B, T, L, token_dim), masked where `mask`
        (B, L) is True, with the frames before it fully visible: Eq. 4.1 for one t. Frames after
        t would be fully masked and, under frame-wise causal attention, cannot reach frame t, so
        they are left out; the ablation without causal attention sees them, fully masked."""
        B, T, L, _ = tokens.shape
        seen = target + 1 if self.config.causal else T
        full_mask = torch.zeros(B, seen, L, dtype=torch.bool, device=tokens.device)
        full_mask[:, target] = mask
        full_mask[:, target + 1:] = True
        z = self.forward_frames(tokens[:, :seen].flatten(1, 2), full_mask.flatten(1), 0, grid,
                                context)
        return z.view(B, seen, L, -1)[:, target]

    def all_frames_z(self, tokens, masks, grid, context):
        """z (B, T, L, n_embd) of every frame t of tokens (B, T, L, token_dim), each masked where
        masks[:, t] is True and seeing the true frames before it: Eq. 4.1 for every t in one
        pass. The sequence holds the clean frames 0..T-2, then a masked copy of every frame
        0..T-1, each at its own frame's RoPE time; under all_frames_mask each copy computes
        exactly what target_frame_z computes for its t (MAGI's "complete teacher forcing")."""
        B, T, L, _ = tokens.shape
        clean = tokens[:, :T - 1]
        if self.training and self.config.context_erase_prob > 0:  # the targets stay true
            clean = erase_salient(clean, self.config.context_erase_prob)
        clean = self.embed(clean.flatten(1, 2))
        copies = self.embed(tokens.flatten(1, 2), masks.flatten(1))
        device = tokens.device
        rope = torch.cat([self.rope(0, T - 1, grid, device), self.rope(0, T, grid, device)])
        z = self.transformer(torch.cat([clean, copies], dim=1), rope,
                             all_frames_mask(T, L, device), context)
        return z[:, (T - 1) * L:].view(B, T, L, -1)

    def forward(self, latents, text, text_mask):
        """The training loss of latent clips (B, T, C, h, w) with their captions: §4.1's
        next-frame diffusion loss (Eq. 4.1) for one frame t drawn per batch, or for every frame at
        once (`all_frames`); or the "total mask" loss of Eq. 3.1 (Table 4)."""
        config, device = self.config, latents.device
        p = config.patch_size
        B, T, C, h, w = latents.shape
        grid = (h // p, w // p)
        tokens = patchify(latents, p)
        L = tokens.shape[2]
        drop = torch.rand(B, device=device) < config.text_drop_prob if self.training else None
        context = self.text_context(text, text_mask, drop)

        if config.next_frame_loss and config.causal and config.all_frames:
            ratios = sample_mask_ratios(B * T, config.mask_ratio_min, config.mask_ratio_std,
                                        device)
            masks = random_masks(B * T, L, ratios, device).view(B, T, L)
            z = self.all_frames_z(tokens, masks, grid, context)
            return self.diffusion_loss(tokens, z, masks, first_frame=0)
        ratios = sample_mask_ratios(B, config.mask_ratio_min, config.mask_ratio_std, device)
        if config.next_frame_loss:  # one target frame t, uniform over all (t = 0: text-to-image)
            target = int(torch.randint(T, (1,)))
            mask = random_masks(B, L, ratios, device)
            z = self.target_frame_z(tokens, target, mask, grid, context)
            return self.diffusion_loss(tokens[:, target:target + 1], z[:, None], mask[:, None],
                                       first_frame=target)
        # Eq. 3.1, the "total mask" baseline of Table 4: tokens masked anywhere in the video
        mask = random_masks(B, T * L, ratios, device)
        z = self.forward_frames(tokens.flatten(1, 2), mask, 0, grid, context)
        return self.diffusion_loss(tokens, z.view(B, T, L, -1), mask.view(B, T, L), first_frame=0)

    def diffusion_loss(self, tokens, z, mask, first_frame):
        """The loss of the frames `tokens` (B, n, L, token_dim), frames first_frame onwards, given
        their z (B, n, L, n_embd): the diffusion loss on the tokens masked in `mask` (B, n, L)
        only, each repeated 4 times with independent noise and timesteps (MAR's
        diffusion_batch_mul), the mean over all of them; plus, with token_regression only,
        regression_loss."""
        repeats = self.config.diffusion_batch_mul
        loss = self.diffloss(tokens[mask].float().repeat(repeats, 1), z[mask].repeat(repeats, 1))
        if self.token_readout is None:
            return loss
        return loss + self.regression_loss(tokens, z, mask, first_frame)

    def regression_loss(self, tokens, z, mask, first_frame):
        """token_regression (beyond the paper) times the MSE of the linear readout of z against
        the masked tokens of the frames after frame 0. Frame 0, drawn from the caption alone, is
        left out: its best regression is a blur of every picture the caption allows."""
        later = slice(1 if first_frame == 0 else 0, None)
        tokens, z, mask = tokens[:, later], z[:, later], mask[:, later]
        if not mask.any():
            return 0.0
        error = F.mse_loss(self.token_readout(z[mask]), tokens[mask].float())
        return self.config.token_regression * error

    def configure_optimizers(self, weight_decay, lr, betas, device_type):
        """§5.1's AdamW; weight decay on 2-D weight matrices only (MAR's): not on biases, norms,
        mask_token, null_text. Fused, one kernel for every parameter: on a CPU a quarter of the
        per-tensor loop's time, which was up to a seventh of the tiny step (RESULTS.md)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [dict(params=[p for p in params if p.dim() == 2], weight_decay=weight_decay),
                  dict(params=[p for p in params if p.dim() != 2], weight_decay=0.0)]
        return torch.optim.AdamW(groups, lr=lr, betas=betas,
                                 fused=device_type in ("cuda", "cpu"))

    # -- §4.3 inference: frame by frame with the KV cache, each frame by masked generation -------

    @torch.no_grad()
    def generate(self, cond_latents, caption, num_latent_frames, num_iter=64, cfg=3.0,
                 temperature="progressive", use_kv_cache=True, generator=None, sampler=None):
        """Continue `cond_latents` (B, k, C, h, w), k >= 0 given latent frames, to
        `num_latent_frames` latent frames, one frame at a time. `caption` is the text encoder's
        (text (B, S, text_dim), text_mask (B, S)), or None for the null text; `cfg` the guidance
        scale (1: none). `use_kv_cache=False` is Table 2's "w/o KV cache": every step re-runs all
        the frames so far. `sampler(z, temperature, cfg, generator=...)` draws one token per row
        of z: DiffLoss.sample, MAR's ancestral sampler, unless another is given;
        `self.diffloss.sampler(clip_range)` holds every x_0 it predicts in the tokenizer's range.
        Returns (B, num_latent_frames, C, h, w), the given frames bit-exact."""
        if use_kv_cache and not self.config.causal:
            raise ValueError("a model without frame-wise causal attention cannot use the KV cache")
        tokens, grid, context, cfg = self.generation_inputs(cond_latents, caption,
                                                            num_latent_frames, cfg)
        B, k, L = len(cond_latents), cond_latents.shape[1], tokens.shape[2]
        cache = KVCache(self.config, len(tokens), num_latent_frames * L) if use_kv_cache else None
        if use_kv_cache and k > 0:  # prefill: the given frames, fully visible, once
            self.forward_frames(tokens[:, :k].flatten(1, 2), None, 0, grid, context, cache,
                                commit=True)
        for f in range(k, num_latent_frames):
            self.generate_frame(tokens, f, grid=grid, context=context, cache=cache,
                                num_iter=num_iter, cfg=cfg,
                                temperature=frame_temperature(temperature, f - k),
                                generator=generator, sampler=sampler or self.diffloss.sample)
            if use_kv_cache and f < num_latent_frames - 1:
                # commit: the finished frame once more, fully visible, into the cache; the last
                # frame's keys and values would be read by nothing (the authors skip it too)
                self.forward_frames(tokens[:, f], None, f, grid, context, cache, commit=True)
        return unpatchify(tokens[:B], self.config.patch_size, *cond_latents.shape[-2:])

    def generate_frame(self, tokens, f, *, grid, context, cache, num_iter, cfg, temperature,
                       generator, sampler):
        """Frame f of `tokens` by MAR's masked generation, written into it: all L tokens start
        masked, in a random order; at each of num_iter steps the model gives the frame's z (with
        the cache, of this frame after the cached ones; without, of every frame up to f), and the
        tokens that leave the mask on the cosine schedule are drawn by the head at the frame's
        temperature, with MAR's linear CFG schedule. With CFG the rows are the videos, then the
        same videos with the null text, and both get the same tokens."""
        rows, L, copies = tokens.shape[0], tokens.shape[2], rows_per_video(cfg)
        num_iter = min(num_iter, L)
        order = torch.rand(rows // copies, L, generator=generator, device=tokens.device)
        order = order.argsort(dim=1).repeat(copies, 1)
        mask = torch.ones(rows, L, dtype=torch.bool, device=tokens.device)
        for step in range(num_iter):
            if cache is not None:
                z = self.forward_frames(tokens[:, f], mask, f, grid, context, cache)
            else:
                z = self.target_frame_z(tokens, f, mask, grid, context)
            following, mask_len = next_mask(mask, order, step, num_iter, L)
            to_predict = mask & ~following
            x = sampler(z[to_predict], temperature, linear_cfg(cfg, mask_len, L),
                        generator=generator)
            tokens[:, f][to_predict] = x.repeat(copies, 1).to(tokens.dtype)
            mask = following

    @torch.no_grad()
    def generate_total_mask(self, cond_latents, caption, num_latent_frames, num_iter=64, cfg=3.0,
                            temperature="progressive", generator=None, sampler=None):
        """The sampler of the "total mask" baseline of Table 4 (Eq. 3.1): MAR's masked generation
        over the whole video at once. Every token after the given frames starts masked, in one
        random order; `num_iter` steps per generated frame in all (the passes of `generate`
        without the cache) reveal them on the cosine schedule, each pass seeing the whole video.
        A token is sampled at its frame's temperature. Arguments and result as `generate`'s."""
        tokens, grid, context, cfg = self.generation_inputs(cond_latents, caption,
                                                            num_latent_frames, cfg)
        (B, k), L = cond_latents.shape[:2], tokens.shape[2]
        copies, sampler = rows_per_video(cfg), sampler or self.diffloss.sample
        video = tokens.flatten(1, 2)  # a view: the whole video as one sequence
        N = (num_latent_frames - k) * L  # the tokens to generate
        steps = min(num_iter * (num_latent_frames - k), N)
        frame_of = torch.arange(num_latent_frames * L, device=tokens.device) // L
        order = k * L + torch.rand(B, N, generator=generator, device=tokens.device).argsort(dim=1)
        order = order.repeat(copies, 1)
        mask = torch.zeros(len(tokens), num_latent_frames * L, dtype=torch.bool,
                           device=tokens.device)
        mask[:, k * L:] = True
        for step in range(steps):
            z = self.forward_frames(video, mask, 0, grid, context)
            following, mask_len = next_mask(mask, order, step, steps, N)
            to_predict, cfg_step = mask & ~following, linear_cfg(cfg, mask_len, N)
            for f in frame_of[to_predict.any(0)].unique().tolist():  # each frame its temperature
                rows = to_predict & (frame_of == f)
                x = sampler(z[rows], frame_temperature(temperature, f - k), cfg_step,
                            generator=generator)
                video[rows] = x.repeat(copies, 1).to(video.dtype)
            mask = following
        return unpatchify(tokens[:B], self.config.patch_size, *cond_latents.shape[-2:])

    @torch.no_grad()
    def generate_as_trained(self, cond_latents, caption, num_latent_frames, use_kv_cache=True,
                            **options):
        """Sample as the model was trained (Table 4): frame by frame (`generate`, with the KV cache
        unless use_kv_cache is False or attention is not frame-wise causal) after the next-frame
        loss, the whole video at once (`generate_total_mask`, which has no cache) after the
        "total mask" loss. `options` as theirs. The one call sample.py, eval.py and train.py
        sample through."""
        if self.config.next_frame_loss:
            return self.generate(cond_latents, caption, num_latent_frames,
                                 use_kv_cache=use_kv_cache and self.config.causal, **options)
        return self.generate_total_mask(cond_latents, caption, num_latent_frames, **options)

    def generation_inputs(self, cond_latents, caption, num_latent_frames, cfg):
        """What both samplers start from: the video's tokens (rows, T, L, token_dim), the given
        frames filled in; its grid of tokens; the captions' context (the null text's for caption
        None); and the guidance scale, 1 without a caption to guide by. With CFG every video has
        two rows, the captions' and then the null text's: its tokens twice, the context of both."""
        B, k, _, h, w = cond_latents.shape
        p = self.config.patch_size
        grid = (h // p, w // p)
        context = self.null_context(B) if caption is None else self.text_context(*caption)
        cfg = cfg if caption is not None else 1.0
        copies = rows_per_video(cfg)
        if copies == 2:
            context = context.cat(self.null_context(B))
        tokens = torch.zeros(copies * B, num_latent_frames, grid[0] * grid[1],
                             self.config.token_dim, device=cond_latents.device)
        tokens[:, :k] = patchify(cond_latents, p).repeat(copies, 1, 1, 1)
        return tokens, grid, context, cfg


# ----------------------------------------------------------------------------------------------
# Speed: torch.compile in place (train.py and bench.py --compile)

def compile_model(model, backend="inductor"):
    """torch.compile, in place, the parts of a VideoMAR with many small operations: the
    transformer blocks, the diffusion head's MLP in training (forward) and its denoiser in
    sampling (denoise). In place (Module.compile and an instance attribute), so parameter names
    and checkpoints stay those of the plain model; dynamic shapes, since the frames a step sees
    and the tokens it scores or samples change from step to step."""
    for module in [*model.blocks, model.diffloss.net]:
        module.compile(backend=backend, dynamic=True)
    head = model.diffloss.net
    head.denoise = torch.compile(head.denoise, backend=backend, dynamic=True)
