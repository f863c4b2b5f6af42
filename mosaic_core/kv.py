"""Key/value positions: RoPE on keys (`rotate`), position ids that skip left padding, and deep blocks packed as one
key/value slot after a request (`pack_deep_blocks`). Plain tensors and the backbone's rotary embedding; no batch,
no bank. The request's own keys/values are cached one layer up, in mosaic_core.cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) counting only real tokens, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """RoPE on keys (..., n, hd) with cos/sin (..., n, hd) broadcastable; `inverse` undoes it."""
    half = k.shape[-1] // 2
    rot = torch.cat((-k[..., half:], k[..., :half]), -1)  # transformers' rotate_half
    return k * cos - rot * sin if inverse else k * cos + rot * sin


def pack_deep_blocks(
    model: Any, blocks: Sequence[torch.Tensor], start: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B rows' deep blocks as one key/value slot, each left-padded to the longest block C.

    blocks: B tensors (layers, 2, H, c_i, hd), keys before RoPE; start: (B,) long, the position of each row's first
    block token (its keys get RoPE at start_i .. start_i + c_i - 1). Returns keys (layers, B, H, C, hd) with RoPE,
    values (layers, B, H, C, hd) and the slot's attention mask (B, C) long, on `start`'s device."""
    B, C = len(blocks), max(b.shape[3] for b in blocks)
    n_layers, H, hd = blocks[0].shape[0], blocks[0].shape[2], blocks[0].shape[-1]
    dev = start.device
    kc = torch.zeros(n_layers, B, H, C, hd, dtype=dtype, device=dev)
    vc = torch.zeros(n_layers, B, H, C, hd, dtype=dtype, device=dev)
    cmask = torch.zeros(B, C, dtype=torch.long, device=dev)
    pos = torch.zeros(B, C, dtype=torch.long, device=dev)
    for i, b in enumerate(blocks):
        c = b.shape[3]
        if c:
            kc[:, i, :, C - c :], vc[:, i, :, C - c :] = b[:, 0].to(dtype), b[:, 1].to(dtype)
            cmask[i, C - c :] = 1
            pos[i, C - c :] = start[i] + torch.arange(c, device=dev)
    cos, sin = model.get_decoder().rotary_emb(kc[0], pos)  # (B, C, hd)
    return rotate(kc, cos[:, None], sin[:, None]), vc, cmask
