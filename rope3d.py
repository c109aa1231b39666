"""
3D rotary position embedding over (frame, row, column): §4.3 and Appendix A of the paper.

The head dimension is split into a temporal half and two equal spatial quarters (the proportions
of Step-Video's blocks; see split_head_dim); each part is an ordinary 1D RoPE over the frame
index, the row and the column. Positions are absolute integer indices, so the attention score
between two tokens depends only on their offset (dt, dh, dw): that is what lets a checkpoint
run at more frames and a larger grid than it was trained on (§5.3, Appendix D), and what lets
the KV cache hold keys of earlier frames.

Usage:
    freqs = rope_frequencies(head_dim=64, frames=3, height=8, width=8, frame_offset=5)
    q = apply_rope(q, freqs)  # q: (B, heads, 3*8*8, 64), tokens frame-major, raster order
"""
import torch


def split_head_dim(head_dim):
    """(temporal, row, column) parts of the head dimension, all even, the two spatial ones equal.

    Appendix A gives no split. Step-Video's blocks (upstream code) split a head of 128 channels
    64, 32, 32 (`rope_ch_split`): time half, rows and columns a quarter each. This code keeps
    those proportions at other head sizes, its own extrapolation, since neither the paper nor
    upstream gives a split for them: 32, 16, 16 of the videomar preset's 64 and 16, 8, 8 of
    tiny's 32. With head_dim not a multiple of 8, time takes the remainder, so every part stays
    even."""
    spatial = 2 * (head_dim // 8)
    temporal = head_dim - 2 * spatial
    assert head_dim % 2 == 0 and spatial > 0, f"head_dim {head_dim} is too small for 3D RoPE"
    return temporal, spatial, spatial


def rope_angles_1d(positions, dim, theta=10000.0):
    """Angles (N, dim/2) of ordinary 1D RoPE: position * theta^(-2i/dim)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
    inv_freq = theta ** -exponents
    return positions.to(torch.float64)[:, None] * inv_freq[None, :]


def rope_frequencies(head_dim, frames, height, width, frame_offset=0, theta=10000.0, device=None):
    """cos and sin, shape (frames*height*width, head_dim/2, 2), for a block of frames starting at
    frame index `frame_offset`; tokens ordered frame-major, then row-major inside a frame."""
    t, r, c = torch.meshgrid(
        torch.arange(frame_offset, frame_offset + frames, device=device),
        torch.arange(height, device=device),
        torch.arange(width, device=device),
        indexing="ij",
    )
    dim_t, dim_r, dim_c = split_head_dim(head_dim)
    angles = torch.cat([
        rope_angles_1d(t.flatten(), dim_t, theta),
        rope_angles_1d(r.flatten(), dim_r, theta),
        rope_angles_1d(c.flatten(), dim_c, theta),
    ], dim=-1)  # float64 so that large frame indices keep their precision
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x, freqs):
    """Rotate consecutive pairs of channels of x (B, heads, N, head_dim) by the angles in freqs."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs.unbind(-1)
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)
