"""The click loss: binary cross-entropy, optionally with the positive class weighted and focal modulation.

    loss = −w_y · (1 − p_t)^γ · log p_t,   p_t = p if y = 1 else 1 − p,   w_1 = pos_weight, w_0 = 1

pos_weight > 1 counts each positive as that many (a rare click class); focal loss (Lin et al. 2017) with
γ > 0 scales down the loss of samples the model already gets right, so training dwells on the hard ones.
γ = 0 and pos_weight = 1 is plain binary cross-entropy (computed by the same call, so exactly equal)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def click_loss(logits: Tensor, labels: Tensor, pos_weight: float = 1.0, gamma: float = 0.0) -> Tensor:
    """logits (B,), labels (B,) 0/1 floats → per-sample losses (B,)."""
    if pos_weight <= 0 or gamma < 0:
        raise ValueError(f"pos_weight must be > 0 and gamma ≥ 0, got {pos_weight}, {gamma}")
    weight = None if pos_weight == 1.0 else torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight, reduction="none")  # (B,)
    if gamma > 0:
        p = torch.sigmoid(logits)  # (B,)
        p_t = torch.where(labels > 0.5, p, 1 - p)  # (B,) the probability given to the true class
        loss = loss * (1 - p_t) ** gamma
    return loss
