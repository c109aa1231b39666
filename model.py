"""
VideoMAR: a decoder-only, masked autoregressive video model on continuous tokens (§4.1).

A video's latents (B, T, C, h, w) become T frames of L tokens. One transformer stack sees every
token, visible or masked; attention is frame-wise causal (a token sees all tokens of its own
and earlier frames), the only position encoding is 3D RoPE, and text enters through
cross-attention. Each token's output z conditions a small diffusion head (diffusion.py) that
models the token's continuous value. Training uses the next-frame diffusion loss (Eq. 4.1);
sampling (sample.py) runs frame by frame with a KV cache, which lives here too.

Usage:
    model = VideoMAR(VideoMARConfig(**PRESETS["tiny"]))
    loss = model(latents, text, text_mask)        # latents (B, T, C, h, w), text (B, S, text_dim)
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import DiffLoss
from rope3d import apply_rope, rope_frequencies


@dataclass
class VideoMARConfig:
    # tokens: latent channels C of the tokenizer, patched p x p into tokens of size C p p
    latent_channels: int = 16
    patch_size: int = 1
    # the transformer (§5.1: 36 layers of width 1536)
    n_layer: int = 36
    n_embd: int = 1536
    n_head: int = 24
    mlp_ratio: float = 4.0
    # RMSNorm of each head's queries and keys, before RoPE, in self- and cross-attention: not in
    # the paper, but in the authors' released model (Step-Video blocks); the videomar preset has it
    qk_norm: bool = False
    # text condition (§5.1: Qwen2-1.5B hidden states, cross-attention); S_max tokens at most
    text_dim: int = 1536
    text_len: int = 32
    text_drop_prob: float = 0.1  # classifier-free guidance: drop the caption for 10% of clips
    # masking (MAR): training mask ratio ~ truncated normal, centre 1.0, std 0.25, on [0.7, 1.0]
    mask_ratio_min: float = 0.7
    mask_ratio_std: float = 0.25
    # the diffusion head (§5.1: an MLP of 3 blocks of width 1280)
    diffloss_d: int = 3
    diffloss_w: int = 1280
    num_sampling_steps: str = "100"
    diffusion_batch_mul: int = 4
    # ablations of Table 4: frame-wise causal attention, and the next-frame loss (else "total mask", Eq. 3.1)
    causal: bool = True
    next_frame_loss: bool = True

    @property
    def token_dim(self):
        return self.latent_channels * self.patch_size ** 2


PRESETS = {
    # §5.1: the paper's 1.4B model; Cosmos CV4x8x8 latents (16 channels), Qwen2-1.5B text (1536).
    # Where the paper is silent, the authors' released model: captions of up to 300 tokens (its
    # null text `fake_latent` is (1, 300, dim)) and QK-norm (its Step-Video blocks).
    "videomar": dict(latent_channels=16, n_layer=36, n_embd=1536, n_head=24, diffloss_d=3,
                     diffloss_w=1280, text_dim=1536, text_len=300, qk_norm=True),
    # what trains on a 2-core CPU in minutes: PatchTokenizer(4, 4) latents, MiniLM text (384);
    # the synthetic captions (21 MiniLM tokens at most) fit whole. The plain block (no QK-norm): at
    # toy scale in fp32 there is no instability for it to cure, and the tiny model keeps its
    # parameters and the tests their meaning.
    "tiny": dict(latent_channels=192, n_layer=4, n_embd=192, n_head=6, diffloss_d=3,
                 diffloss_w=256, text_dim=384, text_len=32, qk_norm=False),
}


# ----------------------------------------------------------------------------------------------
# Tokens and masks

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
    """MAR's truncated normal on [minimum, 1] with centre 1: inverse-CDF sampling of its lower half."""
    lower = torch.special.ndtr(torch.tensor((minimum - 1.0) / std, dtype=torch.float64))
    u = lower + (0.5 - lower) * torch.rand(n, dtype=torch.float64)
    return (1.0 + std * torch.special.ndtri(u)).float().to(device)


def random_masks(batch, length, ratios, device):
    """(batch, length) bool, True = masked: ceil(r L) tokens of each row, in a random order."""
    num_masked = torch.ceil(ratios * length).long().clamp(1, length)
    order = torch.rand(batch, length, device=device).argsort(dim=1)
    return order.argsort(dim=1) < num_masked[:, None].to(device)


def frame_causal_mask(query_frames, key_frames):
    """bool (Nq, Nk), True = may attend: a token sees every token of its own and earlier frames."""
    return query_frames[:, None] >= key_frames[None, :]


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
        if self.k[layer] is None:  # allocated at first use, on k's device in k's dtype (bf16 under autocast)
            self.k[layer], self.v[layer] = k.new_zeros(self.shape), v.new_zeros(self.shape)
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def commit(self, num_tokens):
        self.length += num_tokens


class HeadRMSNorm(nn.RMSNorm):
    """RMSNorm over the last (head) dimension, computed in fp32 as Step-Video's, also under bf16
    autocast, and returned in the input's dtype."""

    def forward(self, x):
        return super().forward(x.float()).type_as(x)


def qk_norms(config):
    """QK-norm as the Step-Video blocks of the authors' released model: RMSNorm with a learned
    weight (eps 1e-6) over each head's channels, for queries and for keys; else identities."""
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
        y = F.scaled_dot_product_attention(q, text_k, text_v, attn_mask=text_mask[:, None, None, :])
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
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, hidden), nn.GELU(), nn.Linear(hidden, config.n_embd))

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
        self.diffloss = DiffLoss(config.token_dim, config.n_embd, config.diffloss_d, config.diffloss_w,
                                 config.num_sampling_steps)
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
        """Project the text and compute every layer's cross-attention keys and values once.
        Rows where `drop` is True get the learned null text (classifier-free guidance)."""
        text = self.text_proj(text)
        S = text.shape[1]
        if S > self.config.text_len:
            raise ValueError(f"text has {S} tokens, more than text_len={self.config.text_len}")
        if drop is not None:
            text = torch.where(drop[:, None, None], self.null_text[:, :S].to(text.dtype), text)
            text_mask = text_mask | drop[:, None]
        return [block.cross_attn.text_kv(text) for block in self.blocks], text_mask

    def null_context(self, batch):
        """The unconditional branch of CFG: the learned null text, every position attended."""
        text = self.null_text.expand(batch, -1, -1)
        mask = torch.ones(batch, self.config.text_len, dtype=torch.bool, device=text.device)
        return [block.cross_attn.text_kv(text) for block in self.blocks], mask

    def rope(self, frame_offset, num_frames, grid, device):
        return rope_frequencies(self.config.n_embd // self.config.n_head, num_frames, *grid, frame_offset, device=device)

    # -- the stack -------------------------------------------------------------------------

    def transformer(self, x, rope, attn_mask, context, cache=None):
        """x (B, N, n_embd) -> z (B, N, n_embd). With a cache, x's keys and values are written
        after the cached ones and x attends to all of them."""
        text_kvs, text_mask = context
        for layer, (block, text_kv) in enumerate(zip(self.blocks, text_kvs)):
            x = block(x, rope, attn_mask, text_kv, text_mask, cache, layer)
        return self.ln_f(x)

    def frames_mask(self, first_query_frame, num_query_frames, L, device):
        """Frame-wise causal mask of frames [first, first + n) over keys of frames [0, first + n);
        None where it would allow everything (one query frame) or the model is not causal."""
        if not self.config.causal or num_query_frames == 1:
            return None
        key_frames = torch.arange(first_query_frame + num_query_frames, device=device).repeat_interleave(L)
        return frame_causal_mask(key_frames[first_query_frame * L:], key_frames)

    def forward_frames(self, tokens, mask, first_frame, grid, context, cache=None, commit=False):
        """z (B, n L, n_embd) of the tokens (B, n L, token_dim) of frames [first, first + n),
        masked where `mask` is True. With a cache these frames attend to the cached ones too;
        `commit` appends their keys and values to it."""
        L = grid[0] * grid[1]
        num_frames = tokens.shape[1] // L
        x = self.embed(tokens, mask)
        rope = self.rope(first_frame, num_frames, grid, tokens.device)
        z = self.transformer(x, rope, self.frames_mask(first_frame, num_frames, L, tokens.device), context, cache)
        if commit:
            cache.commit(tokens.shape[1])
        return z

    # -- §4.1 the next-frame diffusion loss (Eq. 4.1) ---------------------------------------

    def forward(self, latents, text, text_mask, target_frame=None):
        """Training loss of a batch of latent clips (B, T, C, h, w) with their captions; the
        target frame is drawn at random unless given."""
        config, device = self.config, latents.device
        p = config.patch_size
        B, T, C, h, w = latents.shape
        tokens = patchify(latents, p)
        L = tokens.shape[2]
        drop = torch.rand(B, device=device) < config.text_drop_prob if self.training else None
        context = self.text_context(text, text_mask, drop)
        ratios = sample_mask_ratios(B, config.mask_ratio_min, config.mask_ratio_std, device)

        if config.next_frame_loss:
            # Eq. 4.1: one target frame t, uniform over all frames (t = 0 is text-to-image).
            # Frames before t stay fully visible; frames after t would be fully masked and carry
            # no loss, and with frame-wise causal attention they cannot affect frames <= t, so
            # dropping them gives the same loss for less compute.
            target = int(torch.randint(T, (1,))) if target_frame is None else target_frame
            num_frames = target + 1 if config.causal else T
            mask = torch.zeros(B, num_frames, L, dtype=torch.bool, device=device)
            mask[:, target] = random_masks(B, L, ratios, device)
            mask[:, target + 1:] = True
            loss_mask = torch.zeros_like(mask)
            loss_mask[:, target] = mask[:, target]
        else:
            # Eq. 3.1, the "total mask" baseline of Table 4: mask tokens anywhere in the video
            num_frames = T
            mask = random_masks(B, T * L, ratios, device).view(B, T, L)
            loss_mask = mask

        tokens = tokens[:, :num_frames].flatten(1, 2)
        z = self.forward_frames(tokens, mask.flatten(1), 0, (h // p, w // p), context)

        # the diffusion loss on the masked tokens of frame t only, each repeated 4 times with
        # independent noise and timesteps (MAR's diffusion_batch_mul)
        selected = loss_mask.flatten(1)
        target_tokens = tokens[selected].repeat(config.diffusion_batch_mul, 1)
        z = z[selected].repeat(config.diffusion_batch_mul, 1)
        return self.diffloss(target_tokens.float(), z)
