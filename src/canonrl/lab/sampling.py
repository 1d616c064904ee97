"""Rollouts: sample responses with a KV cache, recording the sampling policy's log-probs and entropies.

`generate` runs one forward over the (left-padded) prompts, then one single-token forward per new token with
the model's KV cache — no `model.generate` (its per-step logits processors, stopping criteria and bookkeeping
cost more than the forward itself for a model of a few million parameters). At each step it records, under the
temperature-scaled distribution the token is drawn from (before top-p truncation, as verl does), the token's
log-prob and the distribution's entropy, so an on-policy single-epoch update needs no second forward pass.

`sequence_logprobs` is the training-side forward over prompt + response with the same conventions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from canonrl.lab.decoding import make_decoder, positions_from_mask


@dataclass
class Rollouts:
    """Sampled responses. Rows are responses; response tensors are right-padded to the longest response."""

    prompt_ids: torch.Tensor  # [N, P] long, left-padded
    prompt_mask: torch.Tensor  # [N, P] long
    response_ids: torch.Tensor  # [N, T] long, pad after the end
    response_mask: torch.Tensor  # [N, T] float32: 1 on generated tokens, EOS included
    logprobs: torch.Tensor  # [N, T] float32, 0 outside the mask
    entropy: torch.Tensor  # [N, T] float32, 0 outside the mask
    finished: torch.Tensor  # [N] bool: the response ended with EOS within the budget

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)

    def select(self, rows: torch.Tensor) -> "Rollouts":
        """These rows only, without the columns that are padding in all of them (cheaper forwards)."""
        prompt_mask = self.prompt_mask[rows]
        response_mask = self.response_mask[rows]
        first = int(prompt_mask.any(dim=0).long().argmax())  # prompts are left-padded
        width = int(response_mask.sum(dim=1).max().item()) if rows.numel() else 0
        return Rollouts(
            self.prompt_ids[rows, first:], prompt_mask[:, first:], self.response_ids[rows, :width],
            response_mask[:, :width], self.logprobs[rows, :width], self.entropy[rows, :width], self.finished[rows],
        )  # fmt: skip


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token once the mass before it already reaches top_p (the most likely token always stays)
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Rollouts:
    """Sample (or, with `greedy`, decode) up to `max_new_tokens` tokens per prompt row.

    Finished rows leave the decode batch once a quarter of it has finished (where the decoder can drop rows),
    so the cost follows the live rows rather than the longest response.
    """
    rows = prompt_ids.shape[0]
    device = prompt_ids.device
    decoder = make_decoder(model, prompt_ids, prompt_mask, max_new_tokens)
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
    logprobs = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
    entropy = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    live = torch.arange(rows, device=device)  # original row of each decoder row
    alive = torch.ones(rows, dtype=torch.bool, device=device)  # per decoder row
    for step in range(max_new_tokens):
        logits = decoder.logits.float() / temperature
        log_dist = logits.log_softmax(dim=-1)
        if greedy:
            token = logits.argmax(dim=-1)
        else:
            sample_logits = _top_p_filter(logits, top_p) if top_p < 1.0 else logits
            token = torch.multinomial(sample_logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        rows_now = live[alive]
        tokens[rows_now, step] = token[alive]
        mask[rows_now, step] = 1.0
        logprobs[rows_now, step] = log_dist.gather(1, token.unsqueeze(1)).squeeze(1)[alive]
        entropy[rows_now, step] = -(log_dist.exp() * log_dist).nansum(dim=-1)[alive]
        ended = alive & (token == eos_id)
        finished[live[ended]] = True
        alive = alive & ~ended
        remaining = int(alive.sum())
        if remaining == 0 or step == max_new_tokens - 1:
            break
        if decoder.can_drop_rows and remaining <= 0.75 * alive.numel():
            kept = alive.nonzero().squeeze(1)
            decoder.keep(kept)
            live, token, alive = live[kept], token[kept], alive[kept]
        decoder.step(token, alive)
    used = int(mask.sum(dim=0).nonzero().max().item()) + 1 if mask.any() else 0
    return Rollouts(
        prompt_ids, prompt_mask, tokens[:, :used], mask[:, :used], logprobs[:, :used], entropy[:, :used], finished
    )


def sequence_logprobs(
    model, rollouts: Rollouts, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [N, T] of the response tokens under `model` (with grad), at the sampling temperature.

    Entropy [N, T] comes along when asked (detached: it is a metric here, not a loss term).
    """
    prompt_len = rollouts.prompt_ids.shape[1]
    input_ids = torch.cat([rollouts.prompt_ids, rollouts.response_ids], dim=1)
    attention = torch.cat([rollouts.prompt_mask, rollouts.response_mask.long()], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions_from_mask(attention)).logits
    logits = logits[:, prompt_len - 1 : -1, :].float() / temperature
    log_dist = logits.log_softmax(dim=-1)
    token_logprobs = log_dist.gather(-1, rollouts.response_ids.unsqueeze(-1)).squeeze(-1) * rollouts.response_mask
    token_entropy = None
    if with_entropy:
        with torch.no_grad():
            token_entropy = -(log_dist.exp() * log_dist).nansum(dim=-1) * rollouts.response_mask
    return token_logprobs, token_entropy
