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


def has_answer_probe(env) -> bool:
    return callable(getattr(env, "answer_probe", None))


def turn_starts(turn_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the response column where each turn's first action token sits."""
    starts: list[list[int]] = []
    for row in turn_ids.tolist():
        seen, columns = set(), []
        for column, turn in enumerate(row):
            if turn >= 0 and turn not in seen:
                seen.add(turn)
                columns.append(column)
        starts.append(columns)
    return starts


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
        width = max(len(sequences[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for slot, i in enumerate(chunk):  # left padding, as the sampler's prompts
            ids[slot, width - len(sequences[i]) :] = torch.tensor(sequences[i])
            mask[slot, width - len(sequences[i]) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits.float()
        log_dist = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for slot, i in enumerate(chunk):
            out[i] = float(log_dist[slot, -answers[i] :].mean())
    return out
