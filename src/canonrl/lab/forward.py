"""The training-side forwards: the sampled response tokens' log-probs under a model, with the sampler's conventions.

`sequence_logprobs` runs prompt + response with grad (the update's forward); `reference_logprobs` runs it without
grad over a whole batch in micro-batches (a frozen model's log-probs: the KL penalty's reference, ACE's input);
`response_hidden` gives the last hidden state before each response token (a critic's features);
`SharedPrompts` runs each distinct prompt of a micro-batch's rows once and lets the responses continue from its KV
cache, carrying the gradients back through the prompt forward once (`backward`).
"""

from __future__ import annotations

import torch

from canonrl.lab.decoding import LlamaDecoder, positions_from_mask
from canonrl.lab.sampling import Rollouts


def sequence_logprobs(
    model, rollouts: Rollouts, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [N, T] of the response tokens under `model` (with grad), at the sampling temperature.

    Entropy [N, T] comes along when asked (detached: it is a metric here, not a loss term).
    """
    prompt_len = rollouts.prompt_ids.shape[1]
    input_ids = torch.cat([rollouts.prompt_ids, rollouts.response_ids], dim=1)
    attention = torch.cat([rollouts.prompt_mask, rollouts.attention], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions_from_mask(attention)).logits
    logits = logits[:, prompt_len - 1 : -1, :].float() / temperature
    log_dist = logits.log_softmax(dim=-1)
    token_logprobs = log_dist.gather(-1, rollouts.response_ids.unsqueeze(-1)).squeeze(-1) * rollouts.response_mask
    token_entropy = None
    if with_entropy:
        with torch.no_grad():
            token_entropy = -(log_dist.exp() * log_dist).nansum(dim=-1) * rollouts.response_mask
    return token_logprobs, token_entropy


def response_hidden(model, rollouts: Rollouts, before: bool = True) -> torch.Tensor:
    """[N, T, H] the model's last hidden state before each response token (with grad, if enabled): the state the
    token was sampled from, where verl's critic reads a token's value (its ``[-T - 1 : -1]`` slice); with
    ``before=False``, the hidden state at each response token itself."""
    prompt_len = rollouts.prompt_ids.shape[1]
    input_ids = torch.cat([rollouts.prompt_ids, rollouts.response_ids], dim=1)
    attention = torch.cat([rollouts.prompt_mask, rollouts.attention], dim=1)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions_from_mask(attention),
                output_hidden_states=True)  # fmt: skip
    start = prompt_len - 1 if before else prompt_len
    return out.hidden_states[-1][:, start : start + rollouts.response_ids.shape[1], :].float()


def micro_batches(rollouts: Rollouts, size: int):
    """(row indices, `rollouts.select` of them) over micro-batches of `size` rows of similar response lengths, each
    cut to its own longest response (a no-grad pass over a whole batch pays no padding it does not need)."""
    if rollouts.response_ids.shape[0] == 0:
        return
    for chunk in rollouts.lengths.argsort(stable=True).split(size):
        yield chunk, rollouts.select(chunk)


@torch.no_grad()
def reference_logprobs(model, rollouts: Rollouts, temperature: float = 1.0, micro_batch_size: int = 32) -> torch.Tensor:
    """Log-probs [N, T] of the response tokens under `model`, without grad (0 outside the mask).

    `sequence_logprobs` (the KL penalty's reference forward) over micro-batches of rows of similar lengths, each
    cut to its own longest response: one forward over prompt + response per row.
    """
    out = torch.zeros_like(rollouts.logprobs)
    if out.shape[1] == 0:
        return out
    for chunk, mini in micro_batches(rollouts, micro_batch_size):
        logprobs, _ = sequence_logprobs(model, mini, temperature)
        out[chunk, : logprobs.shape[1]] = logprobs
    return out



class SharedPrompts:
    """Run each distinct prompt of some rows once, with grad, and let micro-batches of responses continue from it.

    The update's forward over prompt + response repeats each prompt for every one of its `repeats` responses.
    Here the prompts run once; their KV cache and last logits become leaf tensors that every micro-batch's
    response forward reads (so each micro-batch's backward stops at them and accumulates their gradients), and
    `backward()` then carries those gradients through the prompt forward once. The result equals the full
    forward's gradients up to float rounding. Llama-architecture models (`LlamaDecoder.supports`) only.
    """

    def __init__(self, model, rollouts: Rollouts, rows: torch.Tensor, temperature: float = 1.0):
        if not LlamaDecoder.supports(model):
            raise ValueError("SharedPrompts supports Llama-architecture float32 models only")
        self.model = model
        self.temperature = temperature
        prompts, inverse = (rows // rollouts.repeats).unique(return_inverse=True)
        self.slot = torch.full((rollouts.response_ids.shape[0],), -1, dtype=torch.long, device=rows.device)
        self.slot[rows] = inverse
        first_rows = prompts * rollouts.repeats
        mask = rollouts.prompt_mask[first_rows]
        first = int(mask.any(dim=0).long().argmax())  # left padding none of these prompts uses
        self.prompt_ids = rollouts.prompt_ids[first_rows, first:]
        self.prompt_mask = mask[:, first:]
        out = model(
            input_ids=self.prompt_ids, attention_mask=self.prompt_mask,
            position_ids=positions_from_mask(self.prompt_mask), use_cache=True,
        )  # fmt: skip
        self.outputs = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        self.outputs.append(out.logits[:, -1, :])
        self.leaves = [t.detach().requires_grad_() for t in self.outputs]

    def logprobs(self, rows: torch.Tensor, mini: Rollouts) -> torch.Tensor:
        """Log-probs [n, T] of `mini`'s response tokens (`mini` = the rollouts' `select(rows)`), with grad."""
        from transformers import DynamicCache

        slots = self.slot[rows].to(self.prompt_ids.device)
        # index_select, not advanced indexing: its backward (index_add) sums in a fixed order on CPU, which
        # advanced indexing's (index_put with accumulate) does not with several threads — resume stays bit-exact
        cache = DynamicCache()
        for layer in range(len(self.leaves) // 2):
            keys, values = self.leaves[2 * layer], self.leaves[2 * layer + 1]
            cache.update(keys.index_select(0, slots), values.index_select(0, slots), layer)
        prompt_mask = self.prompt_mask[slots]
        first_logits = self.leaves[-1].index_select(0, slots).unsqueeze(1)
        width = mini.response_ids.shape[1]
        if width > 1:
            inputs = mini.response_ids[:, : width - 1]
            read = mini.attention[:, : width - 1]
            attention = torch.cat([prompt_mask, read], dim=1)
            # the sampler's positions: one more per token read, none for a hole (decoding.LlamaDecoder.step)
            positions = prompt_mask.sum(dim=1, keepdim=True) + read.cumsum(dim=1) - read
            out = self.model(
                input_ids=inputs, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True
            )
            logits = torch.cat([first_logits, out.logits], dim=1)
        else:
            logits = first_logits
        log_dist = (logits.float() / self.temperature).log_softmax(dim=-1)
        return log_dist.gather(-1, mini.response_ids.unsqueeze(-1)).squeeze(-1) * mini.response_mask

    def backward(self) -> None:
        """Carry the gradients the micro-batches left on the prompt leaves through the prompt forward."""
        pairs = [(out, leaf.grad) for out, leaf in zip(self.outputs, self.leaves) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
