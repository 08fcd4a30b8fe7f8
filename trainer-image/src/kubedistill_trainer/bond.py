"""The BOND loss (DESIGN §4) as pure torch functions: tensors in, tensors out, no model, no I/O.

    L = (1 − β)·L_sft + β·L_pref + γ·L_kl
    L_sft  = token-mean NLL of y⁺ given x (prompt tokens masked)
    L_pref = mean over pairs −log σ(τ·[(log πθ(y⁺|x) − log π_ref(y⁺|x)) − (log πθ(y⁻|x) − log π_ref(y⁻|x))])
    L_kl   = token-mean exact KL(πθ(·|ctx) ‖ π_ref(·|ctx)) over the vocabulary, on y⁺ positions

A batch holds chosen and rejected sequences side by side (one padded forward pass); `is_chosen` says
which rows are y⁺ and `pairs` which (chosen, rejected) rows form a preference pair. Logits are
aligned with labels: `logits[:, t]` is the distribution that predicts `labels[:, t]` (the caller
shifts once, so every function here agrees on positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class BondLoss:
    """The total to backpropagate and its parts, each a scalar tensor (parts are for reporting)."""

    total: Tensor
    sft: Tensor
    pref: Tensor
    kl: Tensor

    def as_floats(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "sft": float(self.sft.detach()),
            "pref": float(self.pref.detach()),
            "kl": float(self.kl.detach()),
        }


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label) under each row of logits: [..., V] × [...] → [...] (float32)."""
    logits = logits.float()
    # Padding labels may be -100; any valid index works because the caller masks those positions.
    safe = labels.clamp(min=0).unsqueeze(-1)
    return logits.gather(-1, safe).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: Tensor, labels: Tensor, response_mask: Tensor) -> Tensor:
    """log π(y|x) per row: the sum of response-token log-probabilities, [B]."""
    return (token_logps(logits, labels) * response_mask).sum(dim=-1)


def preference_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, tau: float
) -> Tensor:
    """Mean over pairs of −log σ(τ·[(πθ⁺ − π_ref⁺) − (πθ⁻ − π_ref⁻)]) on sequence log-probs; 0 with no pairs."""
    if policy_chosen.numel() == 0:
        return policy_chosen.sum() * 0.0
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(tau * margin).mean()


def exact_kl(policy_logits: Tensor, ref_logits: Tensor) -> Tensor:
    """KL(πθ ‖ π_ref) over the last (vocabulary) axis, one value per position: [..., V] → [...]."""
    policy_logp = F.log_softmax(policy_logits.float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    return (policy_logp.exp() * (policy_logp - ref_logp)).sum(dim=-1)


def bond_loss(
    policy_logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    response_mask: Tensor,
    is_chosen: Tensor,
    pairs: Tensor,
    *,
    beta: float,
    gamma: float,
    tau: float,
) -> BondLoss:
    """The BOND loss of one batch.

    policy_logits, ref_logits: [B, T, V] (ref without grad); labels: [B, T] token ids;
    response_mask: [B, T], 1 on response tokens (prompt and padding are 0); is_chosen: [B] bool;
    pairs: [P, 2] long, (chosen row, rejected row). A batch without pairs (prompts that had no
    rejected candidate) has L_pref = 0, so it trains on SFT + KL only.
    """
    # Only response positions carry loss: work on those [N, V] rows, never a float32 copy of the
    # whole [B, T, V] batch (the vocabulary makes that the largest tensor of a step).
    rows, cols = response_mask.bool().nonzero(as_tuple=True)
    policy = policy_logits[rows, cols]
    ref = ref_logits.detach()[rows, cols]  # π_ref is a constant, whatever graph its logits came from
    targets = labels[rows, cols]
    policy_lp, ref_lp = token_logps(policy, targets), token_logps(ref, targets)

    on_chosen = is_chosen[rows]
    chosen_tokens = on_chosen.sum().clamp(min=1)
    sft = -policy_lp[on_chosen].sum() / chosen_tokens
    kl = exact_kl(policy[on_chosen], ref[on_chosen]).sum() / chosen_tokens

    batch = response_mask.shape[0]
    policy_seq = policy_lp.new_zeros(batch).index_add(0, rows, policy_lp)
    ref_seq = ref_lp.new_zeros(batch).index_add(0, rows, ref_lp)
    chosen_rows, rejected_rows = pairs[:, 0], pairs[:, 1]
    pref = preference_loss(
        policy_seq[chosen_rows], policy_seq[rejected_rows], ref_seq[chosen_rows], ref_seq[rejected_rows], tau
    )

    total = (1.0 - beta) * sft + beta * pref + gamma * kl
    return BondLoss(total=total, sft=sft, pref=pref, kl=kl)
