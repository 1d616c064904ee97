"""IAPO: information-aware token bonuses on top of a group-normalised outcome advantage.

Formula (official code ``g2rpo_trainer.py`` L1236-1335 and L1999-2050, method called G2RPO there), per response i
over its response tokens t = 0..L-1 (the mask positions in order):

    A^_i    = (r_i - mean_g r) / (std_g r + eps)                 unbiased std, eps = 1e-4 (GRPO, TRL-style)
    E_t     = H_t (``mode="next_token"``, the policy's entropy)  or  the answer entropy after the early-exit postfix
              "</think><answer>" cut before token t (``mode="last_token"``, given as ``token_scores``)
    S_t     = (E_t + E_{t-1}) / 2 - E_{t+1},   E_{-1} = E_L = 0                          ("surprise")
    C_t     = H_t                                                                        ("confidence")
    S~, C~  = (S - mean S) / (std S + 1e-8), same for C  (``normalisation="zscore"``, default)
              S - mean S / (std S + 1e-8)                (``normalisation="upstream"``: the released precedence slip,
                                                          a per-row constant shift, not a z-score)
    if horizon > 1:  S~_t = sum_{k<horizon} decay^k S_{t+k}  (raw S, zero beyond the response; replaces S~)
    A_{i,t} = A^_i + w_s S~_t / (||S~||_2 + 1e-8) - sign(r_i) w_c C~_t / (||C~||_2 + 1e-8)

Means, unbiased stds and L2 norms run over each row's response tokens.

Paper: "IAPO: Information-Aware Policy Optimization for Token-Efficient Reasoning" (arXiv 2602.19049). Official
code: ``YinhanHe123/IAPO`` (a patched TRL GRPOTrainer). The paper body was not read: this is the code's reading.

Inputs: rewards, group, mask, entropy [B, T]; in ``last_token`` mode also token_scores [B, T] holding the answer
entropy E_t (a lab-pass generator computes it with one cached forward and chunked postfix forwards).

Conventions:
- Groups whose rewards are all equal, and singletons, get A^ = 0, but the token terms stay (as upstream): IAPO does
  not give 0 on constant groups.
- sign(r_i) is the sign of the raw reward: with 0/1 rewards the confidence term vanishes on incorrect responses
  (upstream's rewards are +-0.5 / +-1.5, never 0).
- A row of one token has std 0 and a zero z-score (its bonus is 0); fully masked rows get 0.
- entropy and token_scores may hold anything outside the mask; NaN or Inf inside it raises, naming the rows.

Differences from the official code:
- Upstream normalises over the whole padded row (padding entropies and the zero padding across processes enter the
  means, stds and norms, and E after the last response token is the padding's); here only response tokens count,
  and a non-contiguous mask is read as the sequence of its positions. Not offered as an option (it depends on the
  padding).
- Upstream's torch.std of a one-response group is NaN; here it is the singleton convention (A^ = 0).
- The weights are the config dataclass's w_s = w_c = 1 (the CLI default is 1e-6, which makes the bonus vanish; the
  README grid is {1e-6, 1e-4, 1e-2, 1}; which weights each table used is not verified).
- The ``G2RPOCritics`` variant (a critic's entropies, S_t = E_t - E_{t+1}) is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_int, require_range
from canonrl.methods._normalise import group_normalised
from canonrl.methods.progrpo import masked_token_values
from canonrl.registry import Estimator, Paper, param, register

IAPO_PAPER = Paper("IAPO: Information-Aware Policy Optimization for Token-Efficient Reasoning", "2602.19049")
MODES = ("next_token", "last_token")
NORMALISATIONS = ("zscore", "upstream")
STD_EPS = 1e-8
NORM_EPS = 1e-8


def compact(batch: RolloutBatch) -> tuple[Tensor, Tensor]:
    """(order [B, T], inside [B, T]): ``order`` puts each row's mask positions first, in order; ``inside`` marks
    the leading ``length`` entries of the compacted rows."""
    inside = batch.mask != 0
    positions = torch.arange(inside.shape[1], device=batch.device)
    key = torch.where(inside, positions, positions + inside.shape[1])
    order = torch.argsort(key, dim=-1)
    lengths = inside.sum(-1, keepdim=True)
    return order, positions[None, :] < lengths


def _row_stats(values: Tensor, inside: Tensor) -> tuple[Tensor, Tensor]:
    """[B, 1] mean and unbiased std over ``inside`` (std 0 for rows of fewer than two tokens)."""
    count = inside.sum(-1, keepdim=True).double()
    mean = values.sum(-1, keepdim=True) / count.clamp_min(1)
    deviation = torch.where(inside, values - mean, 0.0)
    variance = (deviation * deviation).sum(-1, keepdim=True) / (count - 1).clamp_min(1)
    return mean, variance.sqrt()


def _normalised(values: Tensor, inside: Tensor, normalisation: str) -> Tensor:
    mean, std = _row_stats(values, inside)
    if normalisation == "upstream":
        shifted = values - mean / (std + STD_EPS)
    else:
        shifted = (values - mean) / (std + STD_EPS)
    return torch.where(inside, shifted, 0.0)


def _unit(values: Tensor) -> Tensor:
    return values / (values.norm(dim=-1, keepdim=True) + NORM_EPS)


@register
class IAPO(Estimator):
    name = "iapo"
    description = "GRPO advantage + per-token information (surprise) bonus and confidence term, L2-normalised"
    paper = IAPO_PAPER
    level = "token"
    requires = ("entropy",)
    verified = False
    simulator_alignment = "z"
    works_in = "library, lab, verl (with the patch), TRL; `last_token` mode: library (needs a generator)"
    inputs_note = "`entropy`; `token_scores` (answer entropy) in `last_token` mode"
    producer = "answer entropy at each cut prefix: one forward pass per prefix (`last_token` mode only)"

    @dataclass
    class Params:
        mode: str = param("next_token", "'next_token': E = entropy; 'last_token': E = token_scores (answer entropy)")
        w_s: float = param(1.0, "surprise_weight (dataclass 1.0; CLI 1e-6; README grid 1e-6..1)")
        w_c: float = param(1.0, "confidence_weight (dataclass 1.0; CLI 1e-6)")
        normalisation: str = param("zscore", "'zscore' (S - mean)/std; 'upstream' the code's S - mean/std slip")
        horizon: int = param(1, "surprise_horizon: > 1 replaces S~ by a forward decay-discounted sum of raw S")
        decay: float = param(0.5, "surprise_decay of that sum")
        eps: float = param(1e-4, "added to the group std of the rewards (TRL 1e-4)")

        def __post_init__(self) -> None:
            require_choice("mode", self.mode, MODES)
            require_choice("normalisation", self.normalisation, NORMALISATIONS)
            require_range("w_s", self.w_s, 0.0)
            require_range("w_c", self.w_c, 0.0)
            require_int("horizon", self.horizon, 1)
            require_range("decay", self.decay, 0.0)
            require_range("eps", self.eps, 0.0)

    def required_inputs(self) -> tuple[str, ...]:
        return ("entropy", "token_scores") if self.params.mode == "last_token" else ("entropy",)

    def token_terms(self, batch: RolloutBatch) -> Tensor:
        """[B, T] float64 w_s S~/||S~|| - sign(r) w_c C~/||C~|| at mask positions (0 elsewhere)."""
        p = self.params
        order, inside = compact(batch)
        entropy = masked_token_values(batch, "entropy").double().gather(1, order)
        if p.mode == "last_token":
            answer = masked_token_values(batch, "token_scores").double().gather(1, order)
        else:
            answer = entropy
        zero = answer.new_zeros(answer.shape[0], 1)
        before = torch.cat([zero, answer[:, :-1]], 1)
        after = torch.where(inside, torch.cat([answer[:, 1:], zero], 1), 0.0)  # E beyond the response is 0
        surprise = torch.where(inside, (answer + before) / 2 - after, 0.0)
        if p.horizon > 1:
            shaped = surprise.clone()
            for k in range(1, p.horizon):
                shaped[:, :-k] += p.decay**k * surprise[:, k:]
            shaped = torch.where(inside, shaped, 0.0)
        else:
            shaped = _normalised(surprise, inside, p.normalisation)
        confidence = _normalised(entropy, inside, p.normalisation)
        sign = torch.sign(batch.rewards.double())[:, None]
        terms = p.w_s * _unit(shaped) - sign * p.w_c * _unit(confidence)
        out = torch.zeros_like(terms)
        out.scatter_(1, order, torch.where(inside, terms, 0.0))
        return out

    def compute(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        base = group_normalised(batch, batch.rewards, eps=p.eps, std="unbiased", scale="group", singleton="zero")
        advantage = base.double()[:, None] + self.token_terms(batch)
        return torch.where(batch.mask != 0, advantage * batch.mask.double(), 0.0).float()
