"""The BOND loss on hand-computed values (DESIGN §4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kubedistill_trainer.bond import bond_loss, exact_kl, preference_loss, sequence_logps

LN3 = math.log(3.0)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row 0 is y⁺, row 1 is y⁻; vocabulary of 2; position 0 of each row is a prompt token."""
    policy = torch.tensor(
        [
            [[5.0, -5.0], [0.0, 0.0], [LN3, 0.0]],  # y⁺: prompt, p(0)=1/2, p(0)=3/4
            [[1.0, 2.0], [0.0, LN3], [0.0, 0.0]],  # y⁻: prompt, p(1)=3/4, p(1)=1/2
        ]
    )
    labels = torch.tensor([[1, 0, 0], [0, 1, 1]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    is_chosen = torch.tensor([True, False])
    pairs = torch.tensor([[0, 1]])
    return policy, labels, mask, is_chosen, pairs


def test_beta_zero_gamma_zero_is_token_mean_sft() -> None:
    policy, labels, mask, is_chosen, pairs = _batch()
    ref = torch.zeros_like(policy)
    loss = bond_loss(policy, ref, labels, mask, is_chosen, pairs, beta=0.0, gamma=0.0, tau=0.1)
    expected = -(math.log(0.5) + math.log(0.75)) / 2  # y⁺ response tokens only; prompt and y⁻ ignored
    assert loss.sft.item() == pytest.approx(expected, rel=1e-6)
    assert loss.total.item() == pytest.approx(expected, rel=1e-6)


def test_sft_matches_cross_entropy_on_random_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    policy = torch.randn(4, 7, 11, generator=gen)
    labels = torch.randint(0, 11, (4, 7), generator=gen)
    mask = (torch.rand(4, 7, generator=gen) > 0.3).long()
    is_chosen = torch.tensor([True, True, False, True])
    loss = bond_loss(
        policy,
        policy,
        labels,
        mask,
        is_chosen,
        torch.empty(0, 2, dtype=torch.long),
        beta=0.0,
        gamma=0.0,
        tau=1,
    )
    keep = (mask.bool() & is_chosen.unsqueeze(-1)).reshape(-1)
    expected = F.cross_entropy(policy.reshape(-1, 11)[keep], labels.reshape(-1)[keep])
    assert loss.total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_policy_equal_to_reference_gives_log2_and_zero_kl() -> None:
    policy, labels, mask, is_chosen, pairs = _batch()
    loss = bond_loss(policy, policy.clone(), labels, mask, is_chosen, pairs, beta=0.5, gamma=0.1, tau=0.1)
    assert loss.pref.item() == pytest.approx(math.log(2.0), rel=1e-7)
    assert loss.kl.item() == pytest.approx(0.0, abs=1e-7)
    assert loss.total.item() == pytest.approx(0.5 * loss.sft.item() + 0.5 * math.log(2.0), rel=1e-6)


def test_preference_term_by_hand() -> None:
    policy, labels, mask, is_chosen, pairs = _batch()
    ref = torch.zeros_like(policy)  # uniform: every response token has log-prob log 1/2
    loss = bond_loss(policy, ref, labels, mask, is_chosen, pairs, beta=1.0, gamma=0.0, tau=0.5)
    chosen_gain = (math.log(0.5) + math.log(0.75)) - 2 * math.log(0.5)
    rejected_gain = (math.log(0.75) + math.log(0.5)) - 2 * math.log(0.5)
    margin = chosen_gain - rejected_gain  # = 0: both rows gained log 1.5
    assert loss.pref.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * margin))), rel=1e-6)
    assert preference_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), tau=0.1
    ).item() == pytest.approx(math.log(1 + math.exp(-0.1 * 2.0)), rel=1e-6)


def test_exact_kl_over_vocabulary_on_chosen_response_positions_only() -> None:
    policy, labels, mask, is_chosen, pairs = _batch()
    ref = torch.zeros_like(policy)
    loss = bond_loss(policy, ref, labels, mask, is_chosen, pairs, beta=0.0, gamma=1.0, tau=0.1)
    # y⁺ positions 1, 2: KL(½,½ ‖ ½,½) = 0 and KL(¾,¼ ‖ ½,½) = ¾ log 1.5 + ¼ log 0.5. The y⁻ row and
    # the prompt position (whose policy is far from uniform) must not count.
    expected = (0.0 + (0.75 * math.log(1.5) + 0.25 * math.log(0.5))) / 2
    assert loss.kl.item() == pytest.approx(expected, rel=1e-6)
    assert exact_kl(torch.tensor([LN3, 0.0]), torch.tensor([0.0, 0.0])).item() == pytest.approx(
        0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6
    )


def test_total_is_the_weighted_sum() -> None:
    policy, labels, mask, is_chosen, pairs = _batch()
    ref = torch.full_like(policy, 0.3) + torch.arange(2.0)
    loss = bond_loss(policy, ref, labels, mask, is_chosen, pairs, beta=0.3, gamma=0.2, tau=0.1)
    assert loss.total.item() == pytest.approx(
        0.7 * loss.sft.item() + 0.3 * loss.pref.item() + 0.2 * loss.kl.item(), rel=1e-6
    )
    assert set(loss.as_floats()) == {"loss", "sft", "pref", "kl"}


def test_no_pairs_means_no_preference_term() -> None:
    policy, labels, mask, is_chosen, _ = _batch()
    no_pairs = torch.empty(0, 2, dtype=torch.long)
    loss = bond_loss(
        policy, torch.zeros_like(policy), labels, mask, is_chosen, no_pairs, beta=0.5, gamma=0.0, tau=1
    )
    assert loss.pref.item() == 0.0
    assert loss.total.item() == pytest.approx(0.5 * loss.sft.item(), rel=1e-6)


def test_a_gradient_step_raises_the_chosen_over_rejected_margin() -> None:
    policy0, labels, mask, is_chosen, pairs = _batch()
    ref = policy0.clone()
    policy = torch.nn.Parameter(policy0.clone())
    optimiser = torch.optim.SGD([policy], lr=1.0)

    def margin() -> float:
        seq = sequence_logps(policy.detach(), labels, mask)
        return float(seq[0] - seq[1])

    before = margin()
    loss = bond_loss(policy, ref, labels, mask, is_chosen, pairs, beta=1.0, gamma=0.0, tau=0.1)
    loss.total.backward()
    optimiser.step()
    assert margin() > before + 1e-3


def test_gradient_flows_to_policy_only() -> None:
    policy0, labels, mask, is_chosen, pairs = _batch()
    policy = policy0.clone().requires_grad_(True)
    ref = policy0.clone().requires_grad_(True)
    loss = bond_loss(policy, ref, labels, mask, is_chosen, pairs, beta=0.5, gamma=0.1, tau=0.1)
    loss.total.backward()
    assert policy.grad is not None
    assert ref.grad is None or float(ref.grad.abs().sum()) == 0.0
