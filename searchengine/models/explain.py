"""Where a query matches a photo: Grad-CAM over the Q-Former's cross-attention, as LAVIS
computes it for BLIP's image-text matching.

ITM decides from the 32 query tokens, and only they look at the photo: through the
cross-attention layers (every other Q-Former layer), each an attention map from the queries to
the ViT's patches. For one image and one text, one forward and one backward of the ITM head:

    map[patch] = sum over cross-attention layers of
                 mean over heads and queries of  attention × max(0, d decision / d attention)

so a patch counts where the queries looked at it *and* looking more would raise the match.
The decision is the match logit minus the no-match one (P(match) is its sigmoid); LAVIS
differentiates the match logit alone, which on the two-squares test model pointed a little
less often (0.84 against 0.88 of 100 maps). The ViT's class token is left out; the rest is the
patch grid (16 × 16 for ViT-g at 224 px), scaled so its peak is 1. LAVIS takes one layer of
BLIP's text encoder; here every cross-attention layer is summed, so no layer has to be picked
per checkpoint.

transformers' fused attention (SDPA) returns no attention maps. While a map is computed, a
hook replaces each cross-attention's output by the same attention written out (the softmax of
the scaled query-key products, masked as the layer masks it) for the calling thread only, so
the maps are part of the graph; the ITM logits it gives equal the fused ones (tested).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class HeatMap:
    grid: np.ndarray  # [g, g] float32, peak 1 (all 0 where nothing raised the match)
    itm: float  # P(match) of the text and the image, as re-ranking scores it
    logit: float  # the decision the map explains: match logit minus no-match logit


def cross_attentions(model) -> list:
    """The Q-Former's cross-attention modules (queries -> ViT patches) of a RetrievalModel
    (which calls this module: its type is not imported here), bottom first."""
    return [layer.crossattention.attention for layer in model.model.qformer.encoder.layer if layer.has_cross_attention]


class _Written:
    """The hook: for one thread, each cross-attention computed as written, its map kept."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.maps: list = []

    def __call__(self, module, args, kwargs, output):
        if threading.get_ident() != self.thread:
            return output
        import torch

        hidden, enc = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        mask = kwargs.get("encoder_attention_mask")
        b, n, d = hidden.shape[0], module.num_attention_heads, module.attention_head_size
        q = module.query(hidden).view(b, -1, n, d).transpose(1, 2)
        k = module.key(enc).view(b, -1, n, d).transpose(1, 2)
        v = module.value(enc).view(b, -1, n, d).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * module.scaling
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # [B, heads, queries, patches]
        self.maps.append(probs)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, -1, n * d)
        return out, probs


def grad_cam(model, text: str, vit: "torch.Tensor") -> HeatMap:
    """The map of `text` over one image for a RetrievalModel, from its ViT output [1, P, W]
    (or [P, W])."""
    import torch

    tok = model.tokenize([text])
    ids, mask = tok["input_ids"].to(model.device), tok["attention_mask"].to(model.device)
    hook = _Written()
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in cross_attentions(model)]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # a copy made here: an inference tensor (the ViT's output) takes no gradient
            vit = vit.reshape(1, *vit.shape[-2:]).to(model.device, dtype=model.vision_dtype).clone().requires_grad_(True)
            logits = model.itm_logits(ids, mask, vit).float()  # [1, 2]
            decision = logits[0, 1] - logits[0, 0]
            grads = torch.autograd.grad(decision, hook.maps)
    finally:
        for h in handles:
            h.remove()
    cam = sum((a.detach().float() * g.float().clamp(min=0)).mean(dim=(1, 2))[0] for a, g in zip(hook.maps, grads))
    patches = cam[1:]  # the class token first
    side = math.isqrt(patches.numel())
    grid = patches[: side * side].reshape(side, side).cpu().numpy().astype(np.float32)
    peak = float(grid.max())
    if peak > 0:
        grid = grid / peak
    p = torch.softmax(logits[0].detach(), dim=-1)[1]
    return HeatMap(grid=grid, itm=float(p), logit=float(decision.detach()))
