"""KTAE: Key-token Advantage Estimation — token-level advantages from a group's own statistics.

Within each prompt group, rollouts with reward > 0 are correct (n_T of them), the others incorrect (n_F). For every
token id v occurring in the group: a, b = numbers of correct / incorrect rollouts containing v (c = n_T - a,
d = n_F - b), and cnt_T, cnt_F = its occurrences among the L_T / L_F response tokens of each side. Then

    F(v)  = exp(-2 p)  with p Fisher's two-sided exact p-value of [[a, b], [c, d]];  F = 0 when p = 1
    IG(v) = H(Y) - H(Y | v present)  in bits
    h(v)  = asin(sqrt(a / n_T)) - asin(sqrt(b / n_F))
    TF_s  = tf_s (k1 + 1) / (tf_s + k1 (1 - b_bm25 + b_bm25 L_s / L_avg)),  tf_s = cnt_s / L_s,  L_avg = (L_T + L_F) / 2
    D(v)  = h(v) + h3 * (TF_T / (TF_F + 1e-5) - TF_F / (TF_T + 1e-5))
    K(v)  = top * (2 sigmoid(z) - 1),  z = (h1 F + h2 IG) D / (h1 + h2)     (form="code", the published numbers)
    K(v)  = top * (sigmoid((h1 F + h2 IG) D) - 1/2)                         (form="paper", as summarised)

and the advantage of token t of rollout i is A_i + K(y_{i,t}) at mask positions, A_i from the ``base`` estimator
(GRPO by default; any registered sequence-level estimator: dr_grpo, dapo, canon, ...).

Paper: "KTAE: A Model-Free Algorithm to Key-Tokens Advantage Estimation in Mathematical Reasoning", Sun et al.
(arXiv 2505.16826). Official code: ``xiaolizh1/KTAE`` (a verl fork).

Inputs: rewards, group, mask, token_ids [B, T] (and whatever ``base`` needs).

Numerics: ``numerics="exact"`` (default) computes the statistics in float64 with a two-sided p-value that agrees
with scipy (ties within 1e-7 relative count as ties, p = 1 is exactly 1, so a token present in every rollout or
equally often on both sides gets F = 0). ``numerics="upstream"`` reproduces the official float32 computation, where
p usually lands a few ulps below 1 and F ~ 0.135 instead of 0 — e.g. for G = 16 split 8/8 a token in 4 of 8 rollouts
on each side (12 vs 4 occurrences) gets K = +0.089 upstream and 0 exactly; a table [5, 0, 9, 2] gets p = 0.5417
upstream where the exact p is 1.

Defaults are those in effect in the official code: h1 = h2 = 1 (its scripts' ``beta_ig=2.0`` is never read),
h3 = 1 (a weight here; an on/off switch upstream), top = 1, BM25 k1 = 2, b = 0.5.

Edge cases: groups that are all correct or all incorrect (and singletons) get no key (K = 0; the base advantage
decides); a token in every rollout gets 0 (exact numerics); masked positions are ignored and get 0; rare one-sided
tokens are not smoothed (their TF ratio is large and K saturates near +-top, as upstream) unless ``min_count`` is
set — a canonrl deviation that zeroes tokens present in fewer than ``min_count`` rollouts of the group;
``ignore_token_ids`` (default none; upstream hard-codes Qwen's 151643) zeroes the key of e.g. pad/eos ids, which
still count in the statistics. Pass a tokenizer's ids as ``ignore_token_ids=(tok.pad_token_id, tok.eos_token_id)``.

Cost: one sort of the batch's mask positions keyed by (group, token id, row) and segment reductions — linear in
tokens apart from the sort; no [groups x vocabulary] table is built, so any vocabulary size works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_rows
from canonrl.methods._common import require_choice, require_range
from canonrl.methods._fisher import fisher_two_sided, fisher_two_sided_upstream
from canonrl.methods._wrapped import HasBase
from canonrl.registry import Estimator, Paper, SequenceEstimator, estimator_class, param, register

KTAE_PAPER = Paper(
    "KTAE: A Model-Free Algorithm to Key-Tokens Advantage Estimation in Mathematical Reasoning", "2505.16826"
)
FORMS = ("code", "paper")
NUMERICS = ("exact", "upstream")
PROPORTION_EPS = 1e-10
TF_RATIO_EPS = 1e-5


@dataclass
class KeyTokens:
    """Key-token scores of a batch: one entry per (group, token id) present, plus the per-position tensor.

    ``score`` is K(v); ``a``/``b`` the numbers of correct/incorrect rollouts containing the token, ``count_correct``
    / ``count_incorrect`` its occurrences, ``p_value``, ``fisher`` (F), ``information_gain`` and ``direction`` (D) the
    statistics behind it. ``positions`` [B, T] holds K at every mask position (0 elsewhere).
    """

    group: Tensor
    token_id: Tensor
    score: Tensor
    a: Tensor
    b: Tensor
    count_correct: Tensor
    count_incorrect: Tensor
    p_value: Tensor
    fisher: Tensor
    information_gain: Tensor
    direction: Tensor
    positions: Tensor

    def for_group(self, group: int) -> dict[int, float]:
        """token id -> key score for one group (its index among the batch's groups, 0..num_groups-1)."""
        rows = self.group == group
        return dict(zip(self.token_id[rows].tolist(), self.score[rows].tolist()))


def _plogp(p: Tensor) -> Tensor:
    return torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), 0.0)


def _binary_entropy(p: Tensor) -> Tensor:
    return -(_plogp(p) + _plogp(1 - p))


def _information_gain(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    n = a + b + c + d
    present, absent = a + b, c + d
    h_y = _binary_entropy((a + c) / n)
    h_y_given_x = present / n * _binary_entropy(a / present.clamp_min(1)) + absent / n * _binary_entropy(
        c / absent.clamp_min(1)
    )
    return h_y - h_y_given_x


def _information_gain_upstream(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """The official float32 formula, operation for operation."""
    n = a + b + c + d

    def entropy(p: Tensor) -> Tensor:
        return -p * torch.where(p > 0, torch.log2(p), torch.tensor(0.0, dtype=p.dtype))

    def conditional(x1: Tensor, x2: Tensor) -> Tensor:
        total = x1 + x2
        return torch.where(total > 0, entropy(x1 / total) + entropy(x2 / total), torch.tensor(0.0, dtype=x1.dtype))

    h_y = entropy((a + c) / n) + entropy((b + d) / n)
    return h_y - ((a + b) / n * conditional(a, b) + (c + d) / n * conditional(c, d))


def _table_statistics(
    a: Tensor, b: Tensor, c: Tensor, d: Tensor, width: Tensor | None, *, radix: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """p-value, F, IG and the arcsine term of each table [[a, b], [c, d]], computed once per distinct table.

    They depend only on the table (and, upstream, its k-grid ``width``), and a batch has a few hundred distinct
    tables among millions of (group, token) entries. ``radix`` exceeds every count, so each table packs into one
    int64 code and a 1-D unique finds them (far faster than a unique over rows). The float dtype of ``a`` decides
    the numerics: float32 reproduces the official code, float64 is exact.
    """
    columns = [x.long() for x in (a, b, c, d)] + ([] if width is None else [width])
    if radix ** len(columns) >= 2**63:
        raise ValueError(f"ktae supports groups of up to 6,000 responses, got {radix - 2}")
    code = torch.zeros_like(columns[0])
    for column in columns:
        code = code * radix + column
    distinct, entry_table = torch.unique(code, return_inverse=True)
    entries = torch.arange(code.numel(), device=code.device)
    representative = torch.zeros_like(distinct).scatter_(0, entry_table, entries)  # one entry of each table
    ta, tb, tc, td = (x[representative] for x in (a, b, c, d))
    if width is not None:
        p_value = fisher_two_sided_upstream(ta, tb, tc, td, width[representative])
        fisher = torch.where(p_value != 1.0, torch.exp(-2 * p_value), 0.0)
        information_gain = _information_gain_upstream(ta, tb, tc, td)
    else:
        p_value = fisher_two_sided(ta, tb, tc, td)
        fisher = torch.where(p_value < 1.0, torch.exp(-2 * p_value), 0.0)
        information_gain = _information_gain(ta, tb, tc, td)
    proportion = torch.asin(torch.sqrt((ta / (ta + tc + PROPORTION_EPS)).clamp(0, 1))) - torch.asin(
        torch.sqrt((tb / (tb + td + PROPORTION_EPS)).clamp(0, 1))
    )
    return tuple(x[entry_table] for x in (p_value, fisher, information_gain, proportion))


@dataclass
class _Occurrences:
    """(group, token) entries of a batch and how each mask position maps to one."""

    group: Tensor  # [U]
    token: Tensor  # [U]
    a: Tensor  # [U] correct rollouts containing the token
    b: Tensor  # [U] incorrect rollouts containing it
    count_correct: Tensor  # [U] occurrences in correct rollouts
    count_incorrect: Tensor  # [U]
    flat_positions: Tensor  # [N] flat indices of the mask positions
    entry_of_position: Tensor  # [N] entry index of each mask position


def _occurrences(batch: RolloutBatch, correct: Tensor) -> _Occurrences:
    rows_count, tokens_count = batch.mask.shape
    flat_positions = (batch.mask != 0).flatten().nonzero().flatten()
    rows = torch.div(flat_positions, tokens_count, rounding_mode="floor")
    token_ids = batch.token_ids.flatten()[flat_positions].long()
    if token_ids.numel() and token_ids.min() < 0:
        negative = torch.zeros(rows_count, dtype=torch.bool, device=batch.device)
        negative[rows[token_ids < 0]] = True
        raise ValueError(f"token_ids must be >= 0 inside the mask, negative at rows {describe_rows(negative)}")
    vocabulary = int(token_ids.max().item()) + 1 if token_ids.numel() else 1
    if batch.num_groups * vocabulary * rows_count >= 2**62:
        raise ValueError(
            f"token_ids up to {vocabulary - 1} with {batch.num_groups} groups and {rows_count} rows overflow the "
            "64-bit sort key; split the batch"
        )
    # One sort orders positions by (group, token, row): rollouts containing a token are runs of equal keys.
    key = (batch.group_index[rows] * vocabulary + token_ids) * rows_count + rows
    sorted_key, order = torch.sort(key)
    triple_key, triple_of_sorted, occurrences = torch.unique_consecutive(
        sorted_key, return_inverse=True, return_counts=True
    )
    entry_key = torch.div(triple_key, rows_count, rounding_mode="floor")
    triple_row = triple_key - entry_key * rows_count
    unique_key, entry_of_triple = torch.unique_consecutive(entry_key, return_inverse=True)
    side = correct[triple_row].float()
    occurrences = occurrences.float()

    def per_entry(values: Tensor) -> Tensor:
        return torch.zeros(unique_key.numel(), device=values.device).index_add_(0, entry_of_triple, values)

    entry_of_position = torch.empty_like(order)
    entry_of_position[order] = entry_of_triple[triple_of_sorted]
    group = torch.div(unique_key, vocabulary, rounding_mode="floor")
    return _Occurrences(
        group=group,
        token=unique_key - group * vocabulary,
        a=per_entry(side),
        b=per_entry(1 - side),
        count_correct=per_entry(occurrences * side),
        count_incorrect=per_entry(occurrences * (1 - side)),
        flat_positions=flat_positions,
        entry_of_position=entry_of_position,
    )


@register
class KTAE(HasBase, Estimator):
    name = "ktae"
    description = "Token-level: base advantage + key-token score from Fisher's test, IG and frequencies per group"
    paper = KTAE_PAPER
    level = "token"
    requires = ("token_ids",)
    simulator_alignment = "z"
    works_in = "library, lab, verl (with the patch), TRL"
    inputs_note = "`token_ids` (+ the base's)"

    @dataclass
    class Params:
        base: str = param("grpo", "sequence-level estimator giving A_i (grpo, dr_grpo, dapo, canon, ...)")
        base_params: dict | None = param(None, "hyperparameters of the base estimator, e.g. {'mu': 1.0}")
        h1: float = param(1.0, "weight of the Fisher term F (official code: alpha = 1)")
        h2: float = param(1.0, "weight of information gain (official code: beta_ig = 1; scripts' 2.0 is never read)")
        h3: float = param(1.0, "weight of the BM25 frequency-ratio term in the direction (official: on/off, 1)")
        top: float = param(1.0, "scale of the key score: K in (-top, top) (code form)")
        form: str = param("code", "'code': top*(2 sigmoid(z) - 1), z = S*D/(h1+h2); 'paper': sigmoid(S*D) - 1/2")
        numerics: str = param("exact", "'exact' float64 statistics; 'upstream' the official float32 quirks")
        ignore_token_ids: tuple = param((), "token ids whose key is forced to 0 (e.g. pad/eos; upstream: 151643)")
        min_count: int = param(0, "deviation: tokens in fewer rollouts of the group than this get 0 (0 = off)")
        bm25_k1: float = param(2.0, "BM25 saturation k1 of the frequency term")
        bm25_b: float = param(0.5, "BM25 length normalisation b of the frequency term")

        def __post_init__(self) -> None:
            require_choice("form", self.form, FORMS)
            require_choice("numerics", self.numerics, NUMERICS)
            for name in ("h1", "h2", "h3", "top", "bm25_k1"):
                require_range(name, getattr(self, name), 0.0)
            require_range("bm25_b", self.bm25_b, 0.0, 1.0)
            require_range("min_count", self.min_count, 0)
            if self.h1 + self.h2 <= 0:
                raise ValueError("h1 + h2 must be positive: the key score is (h1 F + h2 IG) D / (h1 + h2)")
            self.ignore_token_ids = tuple(int(t) for t in self.ignore_token_ids)
            base = estimator_class(self.base)
            if not issubclass(base, SequenceEstimator):
                raise ValueError(f"base must be a sequence-level estimator, {self.base!r} is {base.level}-level")

    def compute(self, batch: RolloutBatch) -> Tensor:
        self.base.step = self.step
        sequence = self.base.sequence_advantages(batch)
        return batch.broadcast(sequence) + self.key_tokens(batch).positions

    def key_tokens(self, batch: RolloutBatch) -> KeyTokens:
        """The key-token scores of a validated batch (see :class:`KeyTokens`)."""
        if batch.token_ids is None:
            raise ValueError("estimator 'ktae' needs 'token_ids', which was not given")
        p = self.params
        upstream = p.numerics == "upstream"
        dtype = torch.float32 if upstream else torch.float64
        grouping = batch.grouping
        correct = batch.valid & (batch.rewards > 0)
        n_correct = grouping.sum(correct.float())
        n_incorrect = grouping.count - n_correct
        lengths = batch.lengths
        length_correct = grouping.sum(lengths * correct)
        length_incorrect = grouping.sum(lengths * (batch.valid & ~correct))

        occ = _occurrences(batch, correct)
        g = occ.group
        a, b = occ.a.to(dtype), occ.b.to(dtype)
        c, d = n_correct[g].to(dtype) - a, n_incorrect[g].to(dtype) - b
        both_sides = (n_correct[g] > 0) & (n_incorrect[g] > 0)

        width = None
        if upstream:
            # Upstream evaluates each group's vocabulary on one k-grid as wide as its largest min(R1, C1) + 1,
            # which changes its float32 sums, so the grid width is part of the table here.
            widest = torch.minimum(a + b, a + c).long()
            width = torch.zeros(batch.num_groups, dtype=torch.long, device=batch.device)
            width = width.scatter_reduce(0, g, widest, reduce="amax", include_self=True)[g] + 1
        p_value, fisher, information_gain, proportion = _table_statistics(
            a, b, c, d, width, radix=int(grouping.count.max().item()) + 2
        )
        direction = proportion + p.h3 * self._frequency_ratio(
            occ, length_correct[g].to(dtype), length_incorrect[g].to(dtype), dtype
        )
        strength = p.h1 * fisher + p.h2 * information_gain
        if p.form == "code":
            score = (torch.sigmoid(strength * direction / (p.h1 + p.h2)) - 0.5) * 2 * p.top
        else:
            score = (torch.sigmoid(strength * direction) - 0.5) * p.top
        keep = both_sides & (a + b >= p.min_count)
        if p.ignore_token_ids:
            ignored = torch.tensor(p.ignore_token_ids, dtype=occ.token.dtype, device=occ.token.device)
            keep &= ~torch.isin(occ.token, ignored)
        score = torch.where(keep, score, 0.0).float()

        positions = torch.zeros(batch.mask.shape, dtype=torch.float32, device=batch.device)
        positions.view(-1)[occ.flat_positions] = score[occ.entry_of_position]
        return KeyTokens(
            group=g,
            token_id=occ.token,
            score=score,
            a=occ.a,
            b=occ.b,
            count_correct=occ.count_correct,
            count_incorrect=occ.count_incorrect,
            p_value=p_value.float(),
            fisher=fisher.float(),
            information_gain=information_gain.float(),
            direction=direction.float(),
            positions=positions,
        )

    def _frequency_ratio(self, occ: _Occurrences, length_correct: Tensor, length_incorrect: Tensor, dtype) -> Tensor:
        """TF_T / (TF_F + 1e-5) - TF_F / (TF_T + 1e-5) with BM25-saturated relative frequencies."""
        k1, b = self.params.bm25_k1, self.params.bm25_b
        average = (length_correct + length_incorrect) / 2

        def saturated(count: Tensor, length: Tensor) -> Tensor:
            frequency = count.to(dtype) / length.clamp_min(1)
            return frequency * (k1 + 1) / (frequency + k1 * (1 - b + b * (length / average.clamp_min(1))))

        tf_correct = saturated(occ.count_correct, length_correct)
        tf_incorrect = saturated(occ.count_incorrect, length_incorrect)
        return tf_correct / (tf_incorrect + TF_RATIO_EPS) - tf_incorrect / (tf_correct + TF_RATIO_EPS)


def key_token_scores(batch: RolloutBatch, **hyperparameters: Any) -> KeyTokens:
    """KTAE's key-token scores for a batch, e.g. to log which tokens drive learning."""
    return KTAE(**hyperparameters).key_tokens(batch)


