"""Rollouts: sample responses with a KV cache, recording the sampling policy's log-probs and entropies.

`generate` runs one forward over the (left-padded) prompts, then one single-token forward per new token with
the model's KV cache — no `model.generate` (its per-step logits processors, stopping criteria and bookkeeping
cost more than the forward itself for a model of a few million parameters). At each step it records, under the
temperature-scaled distribution the token is drawn from (before top-p truncation, as verl does), the token's
log-prob and the distribution's entropy, so an on-policy single-epoch update needs no second forward pass.

The training-side forwards over prompt + response, with the same conventions, are in `canonrl.lab.forward`.
`prompt_confidence` scores prompts alone (ProGRPO); `generate(..., prompt_confidence=True)` reads the same
numbers off its prefill at no extra forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from canonrl.lab.decoding import make_decoder, positions_from_mask, prompt_confidence_from_logits


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
    repeats: int = 1  # rows r*repeats .. (r+1)*repeats-1 share one prompt
    #: [N] float32 confidence of each row's prompt under the sampling model (`generate(prompt_confidence=True)`)
    prompt_confidence: torch.Tensor | None = None
    #: [N, T] long attention over the response: 1 on every token the policy read (its own and, in a multi-turn
    #: rollout, the environment's observations, which `response_mask` leaves out of the loss), 0 on padding and on
    #: the holes of rows that waited for others; None: `response_mask` (a single-turn rollout)
    response_attention: torch.Tensor | None = None
    #: the episodes' turns, for a multi-turn rollout (`canonrl.lab.multi_turn.Turns`)
    turns: object | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)

    @property
    def attention(self) -> torch.Tensor:
        """[N, T] long attention over the response tokens (see `response_attention`)."""
        return self.response_mask.long() if self.response_attention is None else self.response_attention

    def select(self, rows: torch.Tensor) -> Rollouts:
        """These rows only, without the columns that are padding in all of them (cheaper forwards).

        The selected rows no longer come in groups of one prompt, so `repeats` is 1.
        """
        prompt_mask = self.prompt_mask[rows]
        first = int(prompt_mask.any(dim=0).long().argmax())  # prompts are left-padded
        attention = self.attention[rows]
        width = int((attention.flip(1).cumsum(dim=1) > 0).sum(dim=1).max().item()) if rows.numel() else 0  # last read + 1
        confidence = self.prompt_confidence[rows] if self.prompt_confidence is not None else None
        return Rollouts(
            self.prompt_ids[rows, first:], prompt_mask[:, first:], self.response_ids[rows, :width],
            self.response_mask[rows, :width], self.logprobs[rows, :width], self.entropy[rows, :width], self.finished[rows],
            prompt_confidence=confidence,
            response_attention=None if self.response_attention is None else attention[:, :width],
            turns=None if self.turns is None else self.turns.select(rows, width),
        )  # fmt: skip


def left_padded(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, W] ids, [N, W] attention mask) of token-id lists, left-padded as the sampler's prompts are."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        mask[row, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    # drop a token once the mass before it already reaches top_p (the most likely token always stays)
    drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def draw_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, greedy: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token [N], log-distribution, distribution): one token per row from `logits` [N, V] at `temperature` —
    greedy, top-p, or plain sampling; the distributions are the temperature-scaled ones before top-p (the log-probs
    and entropies a rollout records, as verl does)."""
    scaled = logits.float() / temperature
    log_dist = scaled.log_softmax(dim=-1)
    dist = log_dist.exp()
    if greedy:
        token = scaled.argmax(dim=-1)
    elif top_p < 1.0:
        token = torch.multinomial(_top_p_filter(scaled, top_p).softmax(dim=-1), 1, generator=generator).squeeze(1)
    else:
        token = torch.multinomial(dist, 1, generator=generator).squeeze(1)
    return token, log_dist, dist


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
    repeats: int = 1,
    prompt_confidence: bool = False,
) -> Rollouts:
    """Sample (or, with `greedy`, decode) up to `max_new_tokens` tokens, `repeats` responses per prompt row.

    Rows come out in `repeat_interleave` order (prompt 0's responses first); each distinct prompt is run
    through the model once. With `prompt_confidence`, the rollouts carry each row's prompt confidence (see
    `canonrl.lab.decoding.prompt_confidence_from_logits`), read off that prompt forward's logits at temperature 1:
    no extra forward, and no change to the samples.

    Finished rows leave the decode batch once a quarter of it has finished (where the decoder can drop rows),
    so the cost follows the live rows rather than the longest response.
    """
    device = prompt_ids.device
    decoder = make_decoder(model, prompt_ids, prompt_mask, max_new_tokens, repeats, score_prompt=prompt_confidence)
    confidence = decoder.prompt_confidence.repeat_interleave(repeats) if prompt_confidence else None
    prompt_ids = prompt_ids.repeat_interleave(repeats, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(repeats, dim=0)
    rows = prompt_ids.shape[0]
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    live = torch.arange(rows, device=device)  # original row of each decoder row
    alive = torch.ones(rows, dtype=torch.bool, device=device)  # per decoder row
    # per step: where its values go (flat row * max_new_tokens + step) and the values; scattered once at the end
    slots, step_tokens, step_logprobs, step_entropy = [], [], [], []
    for step in range(max_new_tokens):
        token, log_dist, dist = draw_tokens(decoder.logits, temperature, top_p, greedy, generator)
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        rows_alive = alive.nonzero().squeeze(1)
        slots.append(live[rows_alive] * max_new_tokens + step)
        step_tokens.append(token[rows_alive])
        step_logprobs.append(log_dist.gather(1, token.unsqueeze(1)).squeeze(1)[rows_alive])
        step_entropy.append(-(dist * log_dist).nansum(dim=-1)[rows_alive])
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
    index = torch.cat(slots)
    tokens = torch.full((rows * max_new_tokens,), pad_id, dtype=torch.long, device=device)
    tokens[index] = torch.cat(step_tokens)
    tokens = tokens.view(rows, max_new_tokens)
    mask = torch.zeros(rows * max_new_tokens, dtype=torch.float32, device=device)
    mask[index] = 1.0
    mask = mask.view(rows, max_new_tokens)
    logprobs = torch.zeros(rows * max_new_tokens, dtype=torch.float32, device=device)
    logprobs[index] = torch.cat(step_logprobs)
    logprobs = logprobs.view(rows, max_new_tokens)
    entropy = torch.zeros(rows * max_new_tokens, dtype=torch.float32, device=device)
    entropy[index] = torch.cat(step_entropy)
    entropy = entropy.view(rows, max_new_tokens)
    used = int(mask.sum(dim=0).nonzero().max().item()) + 1 if mask.any() else 0
    return Rollouts(
        prompt_ids, prompt_mask, tokens[:, :used], mask[:, :used], logprobs[:, :used], entropy[:, :used], finished,
        repeats, confidence,
    )  # fmt: skip


@torch.no_grad()
def prompt_confidence(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """[N] each (left-padded) prompt's confidence under `model` from one forward over the prompts alone: what
    `generate(..., prompt_confidence=True)` reads off its prefill (`prompt_confidence_from_logits`)."""
    positions = positions_from_mask(prompt_mask)
    logits = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions).logits
    return prompt_confidence_from_logits(logits, prompt_ids, prompt_mask)
