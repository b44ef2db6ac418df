"""task preference's losses on fixed log-probabilities, each expected value worked out by
hand from the paper's formula with math.log / math.exp on the literal numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bigft.config import PreferenceConfig
from bigft.losses import task_losses
from bigft.preference_losses import (
    KtoLogps,
    PairLogps,
    kto_kl_estimate,
    log_odds,
    logps_from_token_losses,
    needs_reference,
    orpo_loss,
    preference_loss,
    sequence_logps,
)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_close(actual: torch.Tensor, expected: list[float], rel: float = 1e-5) -> None:
    assert actual.dtype == torch.float32
    assert actual.tolist() == pytest.approx(expected, rel=rel, abs=1e-6)


# -- per-sequence log-probabilities ------------------------------------------------------

LN2, LN3 = math.log(2), math.log(3)


def hand_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """2 rows x 4 positions x 3 tokens. Row 0: prompt token, targets 0 then 2, padding;
    row 1: prompt token, targets 2, 1, 0. Position t's logits predict label t + 1."""
    logits = torch.zeros(2, 4, 3)
    logits[0, 0] = t(LN2, 0, 0)  # p = (2/4, 1/4, 1/4): label 0 -> log(1/2)
    logits[0, 1] = t(0, 0, 0)  # label 2 -> log(1/3)
    logits[0, 2] = t(50, -50, 7)  # predicts padding: not a target
    logits[0, 3] = t(99, 0, -99)  # the last position predicts nothing
    logits[1, 0] = t(0, 0, 0)  # label 2 -> log(1/3)
    logits[1, 1] = t(0, LN3, 0)  # p = (1/5, 3/5, 1/5): label 1 -> log(3/5)
    logits[1, 2] = t(LN2, LN2, 0)  # p = (2/5, 2/5, 1/5): label 0 -> log(2/5)
    labels = torch.tensor([[-100, 0, 2, -100], [-100, 2, 1, 0]])
    return logits, labels


def test_sequence_logps_sums_the_targets_of_each_row() -> None:
    logits, labels = hand_batch()
    sums, counts = sequence_logps(logits, labels)
    row0 = math.log(1 / 2) + math.log(1 / 3)
    row1 = math.log(1 / 3) + math.log(3 / 5) + math.log(2 / 5)
    assert_close(sums, [row0, row1])
    assert counts.tolist() == [2, 3]


def test_logps_from_the_heads_per_position_losses() -> None:
    """The (B, L, 1) layout a head answering a HeadRequest uses: labels shifted left and
    padded with -100, so position t's loss is that of label t + 1; a non-target position
    counts for nothing, even NaN."""
    logits, labels = hand_batch()
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    losses = task_losses(logits, targets).unsqueeze(-1)
    losses[0, 3, 0] = math.nan
    sums, counts = logps_from_token_losses(losses, targets)
    assert_close(sums, sequence_logps(logits, labels)[0].tolist())
    assert counts.tolist() == [2, 3]
    with pytest.raises(ValueError, match="aligned"):
        logps_from_token_losses(losses, labels[:, 1:])


def test_bf16_logits_score_with_fp32_accuracy() -> None:
    """Logits in bf16 are scored in fp32: the sums match a float64 computation on the
    same bf16 values within 1e-4 nats (~1e-6 per token), where bf16 arithmetic is off
    by more than 1e-2; the gradient reaches the logits in their dtype."""
    torch.manual_seed(0)
    logits = (4 * torch.randn(2, 9, 64)).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 64, (2, 9))
    labels[0, :3] = -100
    sums, counts = sequence_logps(logits, labels)
    exact = F.log_softmax(logits.detach().double()[:, :-1], -1)
    target = labels[:, 1:]
    picked = exact.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = (picked * (target != -100)).sum(-1)
    assert sums.dtype == torch.float32 and counts.tolist() == [6, 8]
    assert (sums.double() - expected).abs().max().item() < 1e-4
    low = F.log_softmax(logits.detach()[:, :-1], -1).gather(-1, target.clamp(min=0)[..., None])
    naive = (low.squeeze(-1) * (target != -100)).sum(-1, dtype=torch.bfloat16)
    assert (naive.double() - expected).abs().max().item() > 1e-2
    sums.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    assert logits.grad.abs().sum() > 0


# -- the losses --------------------------------------------------------------------------


def test_dpo_with_and_without_label_smoothing() -> None:
    """Pair 0: (pc - rc) - (pr - rr) = (-10 + 11) - (-12 + 11) = 2; pair 1: 0.5 - 0.5 = 0.
    DPO: -log sigma(beta h); cDPO: -(1 - e) log sigma(beta h) - e log sigma(-beta h)."""
    policy = PairLogps(t(-10, -5), t(-12, -4))
    reference = PairLogps(t(-11, -5.5), t(-11, -4.5))
    losses, metrics = preference_loss(PreferenceConfig(loss="dpo", beta=0.1), policy, reference)
    assert_close(losses, [-log_sigmoid(0.1 * 2), math.log(2)])
    assert_close(metrics["rewards/chosen"], [0.1 * 1, 0.1 * 0.5])
    assert_close(metrics["rewards/rejected"], [0.1 * -1, 0.1 * 0.5])
    assert_close(metrics["rewards/margin"], [0.2, 0.0])
    assert metrics["rewards/accuracy"].tolist() == [1.0, 0.0]  # a tie is not a win
    assert_close(metrics["logps/chosen"], [-10, -5])
    assert_close(metrics["logps/rejected"], [-12, -4])

    cfg = PreferenceConfig(loss="dpo", beta=0.1, label_smoothing=0.2)
    smoothed, _ = preference_loss(cfg, policy, reference)
    assert_close(
        smoothed,
        [-0.8 * log_sigmoid(0.2) - 0.2 * log_sigmoid(-0.2), math.log(2)],
    )


def test_ipo_uses_length_averaged_logps() -> None:
    """Averages: pc -12/4 = -3, pr -20/5 = -4, rc -14/4 = -3.5, rr -17.5/5 = -3.5, so
    h = 0.5 - (-0.5) = 1 and (h - 1 / (2 x 0.25))^2 = 1 (sums would give (4.5 - 2)^2)."""
    policy = PairLogps(t(-12), t(-20), torch.tensor([4]), torch.tensor([5]))
    reference = PairLogps(t(-14), t(-17.5))  # precomputed: sums only
    losses, metrics = preference_loss(PreferenceConfig(loss="ipo", beta=0.25), policy, reference)
    assert_close(losses, [(1.0 - 1 / (2 * 0.25)) ** 2])
    assert_close(metrics["rewards/chosen"], [0.25 * 0.5])
    assert_close(metrics["rewards/rejected"], [0.25 * -0.5])
    assert_close(metrics["logps/chosen"], [-12])  # logged summed
    with pytest.raises(ValueError, match="token counts"):
        preference_loss(PreferenceConfig(loss="ipo"), PairLogps(t(-1), t(-2)), reference)


def test_simpo_margin_gamma_and_no_reference() -> None:
    """avg_c = -6/5 = -1.2, avg_r = -3/2 = -1.5, beta 2:
    -log sigma(2(-1.2) - 2(-1.5) - gamma) = -log sigma(0.6 - gamma)."""
    policy = PairLogps(t(-6), t(-3), torch.tensor([5]), torch.tensor([2]))
    for gamma in (0.5, 0.0):
        cfg = PreferenceConfig(loss="simpo", beta=2.0, simpo_gamma=gamma)
        losses, metrics = preference_loss(cfg, policy)
        assert_close(losses, [-log_sigmoid(2 * -1.2 - 2 * -1.5 - gamma)])
        assert_close(metrics["rewards/chosen"], [2 * -1.2])
        assert_close(metrics["rewards/rejected"], [2 * -1.5])


def test_orpo_nll_plus_lambda_odds_ratio() -> None:
    """avg_c = -1/2, avg_r = -6/3 = -2; log odds = x - log(1 - e^x);
    loss = NLL (mean token NLL of the chosen: 0.5) - lambda log sigma(lo_c - lo_r)."""
    policy = PairLogps(t(-1), t(-6), torch.tensor([2]), torch.tensor([3]))
    lo_c = -0.5 - math.log(1 - math.exp(-0.5))
    lo_r = -2.0 - math.log(1 - math.exp(-2.0))
    losses, metrics = preference_loss(PreferenceConfig(loss="orpo", orpo_lambda=0.1), policy)
    assert_close(losses, [0.5 - 0.1 * log_sigmoid(lo_c - lo_r)])
    assert_close(metrics["rewards/chosen"], [0.1 * -0.5])  # TRL: lambda x average logps
    assert_close(metrics["rewards/rejected"], [0.1 * -2.0])
    policy.chosen_nll = t(3.0)  # an SFT term the caller computed itself
    losses, _ = preference_loss(PreferenceConfig(loss="orpo", orpo_lambda=0.1), policy)
    assert_close(losses, [3.0 - 0.1 * log_sigmoid(lo_c - lo_r)])


def test_orpo_log_odds_stay_accurate_and_finite() -> None:
    """Near p = 1, log(1 - p) = log(-expm1(x)): float32 1 - exp(-1e-5) keeps ~2 digits.
    Very negative x: log odds -> x. At x = 0 the cap -1e-6 keeps it finite."""
    x = t(-1e-5, -1e-3, -0.5, -50, -200, 0.0).requires_grad_(True)
    got = log_odds(x)
    expected = [v - math.log(-math.expm1(v)) for v in (-1e-5, -1e-3, -0.5)]
    expected += [-50.0, -200.0, -1e-6 - math.log(-math.expm1(-1e-6))]
    assert_close(got.detach(), expected)
    naive = x.detach()[0] - torch.log(1 - torch.exp(x.detach()[0]))
    assert abs(naive.item() - expected[0]) > 1e-3
    got.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # d/dx (x - log(1 - e^x)) = 1 / (1 - e^x)
    assert x.grad[0].item() == pytest.approx(1 / -math.expm1(-1e-5), rel=1e-4)
    both_certain, _ = orpo_loss(t(0.0), t(0.0), t(0.0), 0.1)
    assert_close(both_certain, [-0.1 * log_sigmoid(0.0)])


def kto_rows() -> tuple[KtoLogps, KtoLogps]:
    policy = KtoLogps(
        completion=t(-10, -20, -15, -8),
        desirable=torch.tensor([True, False, True, False]),
        kl=t(-30, -25, -40, -35),
    )
    reference = KtoLogps(t(-11, -18, -15, -9), policy.desirable, t(-30.5, -25.5, -40.5, -35.5))
    return policy, reference


def test_kto_desirable_and_undesirable_rows() -> None:
    """r = policy - reference = (1, -2, 0, 1); z0 = max(0, mean(0.5, 0.5, 0.5, 0.5)) = 0.5;
    desirable: w_d (1 - sigma(beta (r - z0))), undesirable: w_u (1 - sigma(beta (z0 - r)))."""
    policy, reference = kto_rows()
    cfg = PreferenceConfig(
        loss="kto", beta=0.5, kto_desirable_weight=1.0, kto_undesirable_weight=1.5
    )
    losses, metrics = preference_loss(cfg, policy, reference)
    assert_close(
        losses,
        [
            1.0 * (1 - sigmoid(0.5 * (1 - 0.5))),
            1.5 * (1 - sigmoid(0.5 * (0.5 - -2))),
            1.0 * (1 - sigmoid(0.5 * (0 - 0.5))),
            1.5 * (1 - sigmoid(0.5 * (0.5 - 1))),
        ],
    )
    chosen, rejected = metrics["rewards/chosen"], metrics["rewards/rejected"]
    assert chosen[[0, 2]].tolist() == [0.5, 0.0] and chosen[[1, 3]].isnan().all()
    assert rejected[[1, 3]].tolist() == [-1.0, 0.5] and rejected[[0, 2]].isnan().all()
    assert metrics["logps/chosen"][[0, 2]].tolist() == [-10, -15]
    assert_close(metrics["kl"], [0.5] * 4)
    assert "rewards/margin" not in metrics

    # A negative estimate is clamped to 0; an estimate given (all processes') wins.
    reference.kl = t(-29.5, -24.5, -39.5, -34.5)
    assert kto_kl_estimate(policy.kl, reference.kl).item() == pytest.approx(-0.5)  # type: ignore[arg-type]
    losses, metrics = preference_loss(cfg, policy, reference)
    assert_close(losses[:1], [1 - sigmoid(0.5 * 1)])
    losses, metrics = preference_loss(cfg, policy, reference, kl=torch.tensor(2.0))
    assert_close(losses[:2], [1 - sigmoid(0.5 * (1 - 2)), 1.5 * (1 - sigmoid(0.5 * (2 + 2)))])


# -- gradients and the dispatcher ----------------------------------------------------------


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "orpo", "kto"])
def test_gradient_reaches_the_policy_never_the_reference(loss: str) -> None:
    def leaf(*values: float) -> torch.Tensor:
        return t(*values).requires_grad_(True)

    counts = torch.tensor([3, 4])
    if loss == "kto":
        desirable = torch.tensor([True, False])
        policy: PairLogps | KtoLogps = KtoLogps(leaf(-3, -4), desirable, leaf(-6, -7))
        reference: PairLogps | KtoLogps = KtoLogps(leaf(-3.5, -3), desirable, leaf(-6, -7.5))
    else:
        policy = PairLogps(leaf(-3, -5), leaf(-4, -2), counts, counts)
        reference = PairLogps(leaf(-3.5, -5), leaf(-3, -2.5), counts, counts)
    losses, metrics = preference_loss(PreferenceConfig(loss=loss), policy, reference)
    assert losses.shape == (2,) and losses.dtype == torch.float32
    assert all(not m.requires_grad for m in metrics.values())
    losses.sum().backward()
    if isinstance(policy, KtoLogps):
        policy_grads = [policy.completion.grad]
        assert policy.kl is not None and policy.kl.grad is None  # z0 is a constant
    else:
        policy_grads = [policy.chosen.grad, policy.rejected.grad]
    assert all(g is not None and g.abs().sum() > 0 for g in policy_grads)
    ref_tensors = (
        [reference.chosen, reference.rejected]
        if isinstance(reference, PairLogps)
        else [reference.completion, reference.kl]
    )
    assert all(r is not None and r.grad is None for r in ref_tensors)


def test_which_losses_need_a_reference() -> None:
    wanted = {"dpo": True, "ipo": True, "kto": True, "simpo": False, "orpo": False}
    assert {k: needs_reference(PreferenceConfig(loss=k)) for k in wanted} == wanted
    pairs = PairLogps(t(-1), t(-2), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="reference"):
        preference_loss(PreferenceConfig(loss="dpo"), pairs)
    with pytest.raises(TypeError, match="KtoLogps"):
        preference_loss(PreferenceConfig(loss="kto"), pairs, pairs)
    with pytest.raises(TypeError, match="PairLogps"):
        preference_loss(PreferenceConfig(loss="simpo"), kto_rows()[0])
