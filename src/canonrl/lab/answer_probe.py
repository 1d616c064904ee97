"""IGPO's answer probe: the policy's belief in the ground-truth answer after each turn of an episode.

For every episode row and every turn start k (k = 0 before the first action, then after each turn's observation),
a teacher-forced pass reads the context up to there, then the environment's answer prefix and the ground-truth
answer (``answer_probe(problem) -> (prefix, answer)``; lab-calc: ``("ans=", "17")``), and takes the mean log-prob
of the answer's tokens: l_k = mean_j log pi(answer_j | context_k, prefix, answer_<j) (IGPO's ``log_prob_diff``
reads l_k - l_{k-1}). ``prompt_values`` is l_0 and ``step_values`` holds, for each turn t, l after it (the last
turn's, which IGPO does not read, is l at the row's end).

One forward per (row, turn start), in micro-batches of similar lengths, without grad, under the policy that sampled
(official IGPO: ``scrl/llm_agent/generation.py``, one teacher-forced pass per turn per rollout).
"""

from __future__ import annotations

import torch

from canonrl.lab.decoding import positions_from_mask
from canonrl.lab.sampling import left_padded


def has_answer_probe(env) -> bool:
    return callable(getattr(env, "answer_probe", None))


def turn_starts(turn_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the response column where each turn's first action token sits (turn ids are 0, 1, ... in order)."""
    rows, width = turn_ids.shape
    turns = int(turn_ids.max()) + 1 if turn_ids.numel() else 0
    columns = torch.arange(width, device=turn_ids.device).expand(rows, width)
    first = torch.full((rows, max(turns, 1) + 1), width, dtype=torch.long, device=turn_ids.device)
    first = first.scatter_reduce(1, torch.where(turn_ids >= 0, turn_ids, turns), columns, reduce="amin")[:, :turns]
    return [[c for c in row if c < width] for row in first.tolist()]


def _row_ends(rollouts) -> list[int]:
    """Per row, the column after the last token it read."""
    read = rollouts.attention
    last = torch.where(read > 0, torch.arange(read.shape[1], device=read.device), -1).amax(1)
    return (last + 1).tolist()


@torch.no_grad()
def answer_logprobs(policy, rollouts, problems: list, env, micro_batch_size: int = 64) -> tuple[list[list[float]], torch.Tensor]:
    """(step_values per row per turn, prompt_values [B]) for IGPO (see the module docstring)."""
    model, tokenizer = policy.model, policy.tokenizer
    repeats = rollouts.repeats
    probes = []
    for problem in problems:
        prefix, answer = env.answer_probe(problem)
        probes.append((tokenizer(prefix, add_special_tokens=False).input_ids,
                       tokenizer(answer, add_special_tokens=False).input_ids))  # fmt: skip
    starts, ends = turn_starts(rollouts.turns.turn_ids), _row_ends(rollouts)
    queries = []  # (row, cut column) per probe: l of the context up to the column
    for row, columns in enumerate(starts):
        queries += [(row, column) for column in columns + [ends[row]]]
    sequences, answers = [], []
    for row, cut in queries:
        prompt = rollouts.prompt_ids[row][rollouts.prompt_mask[row].bool()]
        read = rollouts.response_ids[row, :cut][rollouts.attention[row, :cut].bool()]
        prefix, answer = probes[row // repeats]
        sequences.append(prompt.tolist() + read.tolist() + prefix + answer)
        answers.append(len(answer))
    scores = _mean_answer_logprobs(model, sequences, answers, policy.pad_id, rollouts.prompt_ids.device, micro_batch_size)
    per_row: list[list[float]] = [[] for _ in starts]
    for (row, _), score in zip(queries, scores):
        per_row[row].append(score)
    prompt_values = torch.tensor([values[0] for values in per_row], dtype=torch.float32)
    return [values[1:] for values in per_row], prompt_values


def _mean_answer_logprobs(model, sequences, answers, pad_id, device, micro_batch_size) -> list[float]:
    """The mean log-prob of the last `answers[i]` tokens of each sequence, in micro-batches of similar lengths."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [0.0] * len(sequences)
    for start in range(0, len(order), micro_batch_size):
        chunk = order[start : start + micro_batch_size]
        ids, mask = left_padded([sequences[i] for i in chunk], pad_id, device)  # as the sampler's prompts
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits.float()
        log_dist = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        count = torch.tensor([answers[i] for i in chunk], device=device)
        tail = torch.arange(log_dist.shape[1], device=device) >= log_dist.shape[1] - count[:, None]
        for i, mean in zip(chunk, ((log_dist * tail).sum(1) / count).tolist()):
            out[i] = mean
    return out
