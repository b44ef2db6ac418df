"""task preference: the losses of section `preference` on per-sequence log-probabilities.

Pure torch, per pair (or per row for KTO), no reduction: the loop averages them. Each
loss takes summed or length-averaged log-probabilities of completions and returns
`(losses, rewards)`, rewards being detached per-pair tensors for logging.

Shape legend: B pairs (or rows), T positions, V the vocabulary. "logps" is always the
log-probability of a whole completion's target tokens: `sum` (summed over its tokens) or
`avg` (the sum divided by its number of tokens).

Choices, each where several implementations differ:
- IPO uses length-AVERAGED log-probabilities, as TRL does since huggingface/trl#1265: the
  paper's (Azar et al., Eq. 17) pi(y|x) reads as a sequence probability, but its authors
  told TRL (HF blog "pref-tuning", 2024) that the log-likelihoods are to be averaged, so
  that the target margin 1 / (2 beta) does not depend on the completions' lengths.
  torchtune followed (meta-pytorch/torchtune#1291).
- KTO's reference point z0 is an input (see `kto_kl_estimate`), as in TRL's KTOTrainer;
  its rewards and log-ratios use summed log-probabilities, as TRL and the paper.
- ORPO's logged rewards are lambda x the averaged log-probabilities: TRL's convention
  (`chosen_rewards = beta * policy_chosen_logps`, where TRL's ORPO beta IS the paper's
  lambda, our `orpo_lambda`; `preference.beta` stays unused by ORPO as its docs say).
- SimPO's rewards are beta x the averaged log-probabilities (TRL's CPOTrainer, simpo).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bigft.config import PreferenceConfig
from bigft.losses import target_mask, task_losses

Rewards = dict[str, torch.Tensor]

# ORPO's log-odds log(p / (1 - p)) diverge at p = 1. A completion's average log-prob is
# capped at -1e-6 (p within one part in a million of certainty): fp32 log-softmax values
# carry an absolute error of about 1e-6 per token (logits of magnitude ~10 at 2^-24
# relative precision), so values closer to 0 are rounding noise. The cap keeps the
# log-odds (<= ~13.8) and their gradient finite where TRL's formula gives inf / NaN.
ORPO_MAX_AVG_LOGP = -1e-6


def logps_from_token_losses(
    token_losses: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability (B,) fp32, target tokens (B,) long) of each row, from
    per-position cross-entropy losses (B, T) or (B, T, 1) and the labels ALIGNED with
    them (B, T), -100 = not a target: `bigft.losses.task_losses(logits[:, :-1],
    labels[:, 1:])`, or the (B, L, 1) layout of a `HeadRequest` answer against its
    `labels`. (Today's chunked head answers with the batch's SUM at position 0 and zeros
    elsewhere: per-row sums need it to return each position's loss.)

    Positions that are not targets count for nothing, whatever their loss holds (NaN
    included)."""
    if token_losses.dim() == 3 and token_losses.size(-1) == 1:
        token_losses = token_losses.squeeze(-1)
    if token_losses.shape != labels.shape:
        raise ValueError(
            f"token losses {tuple(token_losses.shape)} and labels {tuple(labels.shape)}: "
            "give the labels aligned with the losses, position by position"
        )
    mask = target_mask(labels)
    zero = torch.zeros((), dtype=torch.float32, device=token_losses.device)
    sums = -torch.where(mask, token_losses.float(), zero).sum(-1)
    return sums, mask.sum(-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability (B,) fp32, target tokens (B,) long) of each row's targets.

    logits (B, T, V) in any dtype, labels (B, T) as a causal-LM batch holds them (-100 =
    not a target): position t's logits predict labels[:, t + 1]. The cross-entropy is
    bigft's own (`task_losses`, the SFT full path's: an fp32 copy of the logits and
    cross_entropy with reduction none, no extra log-softmax or gather), so preference and
    SFT score tokens alike."""
    losses = task_losses(logits[:, :-1], labels[:, 1:])
    return logps_from_token_losses(losses, labels[:, 1:])


@dataclass
class PairLogps:
    """One model's log-probabilities of a batch of pairs, each (B,): `chosen` / `rejected`
    summed over the completion's target tokens, with their token counts (needed to
    average: ipo, simpo, orpo; a precomputed reference may hold sums only).

    `chosen_nll`: ORPO's SFT term per pair; None = the mean token NLL of the chosen
    completion, -chosen / chosen_tokens."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None
    chosen_nll: torch.Tensor | None = None

    def averages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) log-probabilities per token (a row without target tokens
        counts as one token, so its average is 0, not NaN)."""
        if self.chosen_tokens is None or self.rejected_tokens is None:
            raise ValueError("the policy's token counts are needed to average log-probs")
        return (
            self.chosen.float() / self.chosen_tokens.clamp(min=1),
            self.rejected.float() / self.rejected_tokens.clamp(min=1),
        )


@dataclass
class KtoLogps:
    """One model's log-probabilities of a KTO batch (unpaired rows), each (B,).

    `completion`: each row's summed log-prob of its completion; `desirable`: bool, the
    row's label; `kl`: summed log-probs of MISMATCHED completions, prompt i with the
    completion of row i - 1 (TRL's `_get_kl_dataset` rotates the completions by one), for
    the reference point z0 (see `kto_kl_estimate`; None when the caller passes z0)."""

    completion: torch.Tensor
    desirable: torch.Tensor
    kl: torch.Tensor | None = None


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Rewards]:
    """DPO (Rafailov et al. 2023, Eq. 7) on summed logps; label_smoothing e > 0 is cDPO
    (Mitchell 2023): with z = beta((pc - rc) - (pr - rr)),
    loss = -(1 - e) log sigma(z) - e log sigma(-z); rewards beta(pc - rc), beta(pr - rr)."""
    chosen = policy_chosen.float() - reference_chosen.detach().float()
    rejected = policy_rejected.float() - reference_rejected.detach().float()
    z = beta * (chosen - rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, _rewards(beta * chosen, beta * rejected)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, Rewards]:
    """IPO (Azar et al. 2023, Eq. 17) on length-AVERAGED logps (module docstring): with
    h = (pc - rc) - (pr - rr), loss = (h - 1 / (2 beta))^2, beta being the paper's tau;
    rewards beta(pc - rc), beta(pr - rr) of the averages, as TRL logs them."""
    chosen = policy_chosen.float() - reference_chosen.detach().float()
    rejected = policy_rejected.float() - reference_rejected.detach().float()
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return losses, _rewards(beta * chosen, beta * rejected)


def simpo_loss(
    chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float
) -> tuple[torch.Tensor, Rewards]:
    """SimPO (Meng et al. 2024, Eq. 6), no reference: on the policy's averaged logps,
    loss = -log sigma(beta avg_c - beta avg_r - gamma); rewards beta avg_c, beta avg_r."""
    chosen, rejected = beta * chosen_avg.float(), beta * rejected_avg.float()
    return -F.logsigmoid(chosen - rejected - gamma), _rewards(chosen, rejected)


def log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(avg_logps), stably: log(1 - p) is log(-expm1(x))
    near 0 and log1p(-exp(x)) below -log 2 (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"); x is capped at ORPO_MAX_AVG_LOGP."""
    x = avg_logps.float().clamp(max=ORPO_MAX_AVG_LOGP)
    near = x > -math.log(2)
    # Each branch sees only inputs where it is accurate, so the branch torch.where drops
    # has a finite gradient too (0 x inf would be NaN).
    log_1mp = torch.where(
        near,
        torch.log(-torch.expm1(torch.where(near, x, -1.0))),
        torch.log1p(-torch.exp(torch.where(near, -1.0, x))),
    )
    return x - log_1mp


def orpo_loss(
    chosen_avg: torch.Tensor,
    rejected_avg: torch.Tensor,
    chosen_nll: torch.Tensor,
    orpo_lambda: float,
) -> tuple[torch.Tensor, Rewards]:
    """ORPO (Hong et al. 2024, Eqs. 4-7), no reference: on the policy's averaged logps,
    L_OR = -log sigma(log_odds(avg_c) - log_odds(avg_r)) and loss = chosen_nll + lambda
    L_OR; rewards lambda avg_c, lambda avg_r (TRL's convention, module docstring)."""
    ratio = log_odds(chosen_avg) - log_odds(rejected_avg)
    losses = chosen_nll.float() - orpo_lambda * F.logsigmoid(ratio)
    return losses, _rewards(orpo_lambda * chosen_avg.float(), orpo_lambda * rejected_avg.float())


def kto_kl_estimate(policy_kl: torch.Tensor, reference_kl: torch.Tensor) -> torch.Tensor:
    """KTO's batch estimate of KL(policy || reference) (Ethayarajh et al. 2024, Sec. 4.1):
    mean over rows of policy - reference summed logps of mismatched completions (see
    `KtoLogps.kl`), detached, not yet clamped. Under data parallelism average it over the
    processes (an all_reduce mean) before `kto_loss` clamps it at 0, as TRL does; the
    policy's KL logps may be computed under no_grad (TRL does)."""
    return (policy_kl.detach().float() - reference_kl.detach().float()).mean()


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Rewards]:
    """KTO (Ethayarajh et al. 2024, Eq. 8; TRL's KTOTrainer) per row, on summed logps:
    with log-ratio r = policy - reference and z0 = max(0, kl) (detached, in the same
    nats as r), a desirable row's loss is w_d (1 - sigma(beta (r - z0))), an undesirable
    one's w_u (1 - sigma(beta (z0 - r))). rewards: {"reward": beta r} per row."""
    ratio = policy.float() - reference.detach().float()
    z0 = kl.detach().float().clamp(min=0)
    margin = torch.where(desirable.bool(), ratio - z0, z0 - ratio)
    weight = torch.where(desirable.bool(), desirable_weight, undesirable_weight)
    losses = weight * (1 - torch.sigmoid(beta * margin))
    return losses, {"reward": (beta * ratio).detach()}


def _rewards(chosen: torch.Tensor, rejected: torch.Tensor) -> Rewards:
    return {"chosen": chosen.detach(), "rejected": rejected.detach()}


Logps = PairLogps | KtoLogps
PairLoss = Callable[[PreferenceConfig, PairLogps, PairLogps | None], tuple[torch.Tensor, Rewards]]


def _dpo(cfg: PreferenceConfig, p: PairLogps, r: PairLogps | None) -> tuple[torch.Tensor, Rewards]:
    assert r is not None  # needs_reference
    return dpo_loss(p.chosen, p.rejected, r.chosen, r.rejected, cfg.beta, cfg.label_smoothing)


def _ipo(cfg: PreferenceConfig, p: PairLogps, r: PairLogps | None) -> tuple[torch.Tensor, Rewards]:
    assert r is not None  # needs_reference
    pc, pr = p.averages()  # a ValueError without the policy's token counts
    assert p.chosen_tokens is not None and p.rejected_tokens is not None
    # The reference scored the same tokens: the policy's counts average both.
    rc = r.chosen.float() / p.chosen_tokens.clamp(min=1)
    rr = r.rejected.float() / p.rejected_tokens.clamp(min=1)
    return ipo_loss(pc, pr, rc, rr, cfg.beta)


def _simpo(
    cfg: PreferenceConfig, p: PairLogps, r: PairLogps | None
) -> tuple[torch.Tensor, Rewards]:
    return simpo_loss(*p.averages(), cfg.beta, cfg.simpo_gamma)


def _orpo(cfg: PreferenceConfig, p: PairLogps, r: PairLogps | None) -> tuple[torch.Tensor, Rewards]:
    chosen, rejected = p.averages()
    nll = -chosen if p.chosen_nll is None else p.chosen_nll
    return orpo_loss(chosen, rejected, nll, cfg.orpo_lambda)


PAIR_LOSSES: dict[str, PairLoss] = {"dpo": _dpo, "ipo": _ipo, "simpo": _simpo, "orpo": _orpo}


def needs_reference(cfg: PreferenceConfig) -> bool:
    """Whether `cfg.loss` scores a reference model: dpo, ipo, kto yes; simpo, orpo no."""
    return cfg.loss in ("dpo", "ipo", "kto")


def preference_loss(
    cfg: PreferenceConfig,
    policy: Logps,
    reference: Logps | None = None,
    kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-pair losses (B,) fp32, per-pair metrics) of `cfg.loss`.

    `policy` / `reference`: PairLogps, or KtoLogps for kto. The reference is required when
    `needs_reference(cfg)` and never given gradient. `kl`: KTO's z0 estimate
    (`kto_kl_estimate`, averaged over processes); None = this batch's, from `KtoLogps.kl`.

    Metrics, detached (B,): rewards/chosen, rewards/rejected, rewards/margin,
    rewards/accuracy (1.0 where the chosen reward is above the rejected one), logps/chosen,
    logps/rejected (the policy's summed logps). KTO's rows are unpaired: rewards/chosen
    and logps/chosen hold the desirable rows, NaN elsewhere, rewards/rejected and
    logps/rejected the undesirable ones (average them with nanmean); no margin or
    accuracy, and kl, the clamped z0 repeated per row."""
    if needs_reference(cfg) and reference is None:
        raise ValueError(f"preference.loss {cfg.loss} needs the reference model's logps")
    if cfg.loss == "kto":
        return _kto(cfg, policy, reference, kl)
    if not isinstance(policy, PairLogps) or isinstance(reference, KtoLogps):
        raise TypeError(f"preference.loss {cfg.loss} takes PairLogps (KtoLogps is for kto)")
    losses, rewards = PAIR_LOSSES[cfg.loss](cfg, policy, reference)
    chosen, rejected = rewards["chosen"], rewards["rejected"]
    metrics = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margin": chosen - rejected,
        "rewards/accuracy": (chosen > rejected).float(),
        "logps/chosen": policy.chosen.detach().float(),
        "logps/rejected": policy.rejected.detach().float(),
    }
    return losses, metrics


def _kto(
    cfg: PreferenceConfig, policy: Logps, reference: Logps | None, kl: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if not isinstance(policy, KtoLogps) or not isinstance(reference, KtoLogps):
        raise TypeError("preference.loss kto takes KtoLogps for the policy and the reference")
    if kl is None:
        if policy.kl is None or reference.kl is None:
            raise ValueError("kto: give KtoLogps.kl for both models, or the estimate kl")
        kl = kto_kl_estimate(policy.kl, reference.kl)
    losses, rewards = kto_loss(
        policy.completion,
        reference.completion,
        policy.desirable,
        kl,
        cfg.beta,
        cfg.kto_desirable_weight,
        cfg.kto_undesirable_weight,
    )
    reward, good = rewards["reward"], policy.desirable.bool()
    nan = torch.full_like(reward, math.nan)
    logps = policy.completion.detach().float()
    metrics = {
        "rewards/chosen": torch.where(good, reward, nan),
        "rewards/rejected": torch.where(good, nan, reward),
        "logps/chosen": torch.where(good, logps, nan),
        "logps/rejected": torch.where(good, nan, logps),
        "kl": kl.detach().float().clamp(min=0).expand_as(reward).clone(),
    }
    return losses, metrics
