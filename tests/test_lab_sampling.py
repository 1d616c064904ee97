"""`canonrl.lab.sampling` and `canonrl.lab.policy` on a tiny random Llama with the lab tokenizer.

The KV-cache sampler must agree with a plain full forward: greedy tokens are the argmax of the full forward at
each step (under left padding, prompts of different lengths), and the recorded log-probs and entropies are what
`sequence_logprobs` computes on the same rollouts.
"""

from __future__ import annotations

import math

import pytest
import torch

from canonrl.lab.forward import sequence_logprobs
from canonrl.lab.policy import Policy
from canonrl.lab.sampling import Rollouts, _top_p_filter, generate, positions_from_mask
from canonrl.lab.tasks.lab import LabTask
from conftest import tiny_lab_model

PROMPTS = ["1+2?", "7+5-3+8?", "3-1+9-2+4?", "9?", "4+4-8+6?", "2+2+2?"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy(one_thread) -> Policy:
    model, tokenizer = tiny_lab_model()
    model.eval()
    return Policy(model, tokenizer, "tiny")


@pytest.fixture(scope="module")
def prompts(policy):
    ids, mask = policy.encode_prompts(PROMPTS)
    return ids, mask


def _generate(policy, ids, mask, **kwargs) -> Rollouts:
    kwargs.setdefault("max_new_tokens", 16)
    return generate(policy.model, ids, mask, eos_id=policy.eos_id, pad_id=policy.pad_id, **kwargs)


def _unpadded_prompt(ids: torch.Tensor, mask: torch.Tensor, row: int) -> torch.Tensor:
    return ids[row][mask[row].bool()]


# ----------------------------------------------------------------------------------------------------------------
# Policy: encoding and decoding
# ----------------------------------------------------------------------------------------------------------------


def test_encode_prompts_left_pads(policy, prompts):
    ids, mask = prompts
    tok = policy.tokenizer
    assert ids.shape == mask.shape == (len(PROMPTS), max(len(p) for p in PROMPTS) + 1)  # one token a char + BOS
    for row, prompt in enumerate(PROMPTS):
        n = len(prompt) + 1
        width = ids.shape[1]
        assert mask[row].tolist() == [0] * (width - n) + [1] * n
        assert ids[row, : width - n].tolist() == [policy.pad_id] * (width - n)
        assert ids[row, width - n] == tok.bos_token_id
        assert tok.decode(ids[row, width - n + 1 :]) == prompt
    assert not policy.uses_chat_template
    assert policy.prompt_text("1+2?") == "1+2?"


def test_decode_round_trips_and_stops_at_the_mask(policy):
    tok = policy.tokenizer
    texts = ["1+2=3;ans=3", "7+5=12;12-3=9;wait;7+5=12;12-3=9;ans=9"]
    rows = [tok(t, add_special_tokens=False).input_ids + [policy.eos_id] for t in texts]
    width = max(map(len, rows)) + 3
    ids = torch.full((len(rows), width), policy.pad_id)
    mask = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    ids[0, len(rows[0])] = tok.convert_tokens_to_ids("7")  # garbage after the mask is not decoded
    assert policy.decode(ids, mask) == texts


def test_pad_and_eos_ids(policy):
    assert policy.eos_id == policy.tokenizer.eos_token_id != policy.pad_id == policy.tokenizer.pad_token_id


def test_positions_from_mask_start_at_zero_on_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


# ----------------------------------------------------------------------------------------------------------------
# greedy = argmax of a full forward, row by row, without padding
# ----------------------------------------------------------------------------------------------------------------


def test_greedy_tokens_are_the_argmax_of_a_full_forward(policy, prompts):
    ids, mask = prompts
    rollouts = _generate(policy, ids, mask, greedy=True, max_new_tokens=12)
    assert torch.equal(rollouts.prompt_ids, ids)
    for row in range(len(PROMPTS)):
        prompt = _unpadded_prompt(ids, mask, row)
        length = int(rollouts.response_mask[row].sum())
        response = rollouts.response_ids[row, :length]
        sequence = torch.cat([prompt, response]).unsqueeze(0)
        with torch.no_grad():
            logits = policy.model(input_ids=sequence).logits[0, len(prompt) - 1 : -1].float()
        for step in range(length):
            token = response[step]
            # equal to the argmax, up to float noise between the cached and the full forward on a near-tie
            assert logits[step, token] >= logits[step].max() - 1e-5, (row, step)
        # greedy logprobs are those of the full forward's distribution
        expected = logits.log_softmax(-1).gather(1, response[:, None]).squeeze(1)
        torch.testing.assert_close(rollouts.logprobs[row, :length], expected, atol=1e-5, rtol=0)


def test_greedy_does_not_depend_on_batch_padding(policy, prompts):
    ids, mask = prompts
    batched = _generate(policy, ids, mask, greedy=True, max_new_tokens=10)
    for row in range(len(PROMPTS)):
        single = _generate(
            policy, _unpadded_prompt(ids, mask, row)[None], torch.ones(1, int(mask[row].sum()), dtype=torch.long),
            greedy=True, max_new_tokens=10,
        )  # fmt: skip
        n = int(single.response_mask[0].sum())
        assert int(batched.response_mask[row].sum()) == n
        assert torch.equal(batched.response_ids[row, :n], single.response_ids[0, :n])


# ----------------------------------------------------------------------------------------------------------------
# sampled rollouts: recorded log-probs/entropies, masks, finished flags, seeds
# ----------------------------------------------------------------------------------------------------------------


def _sampled(policy, prompts, seed=0, temperature=1.0, rows=4, **kwargs) -> Rollouts:
    ids, mask = prompts
    generator = torch.Generator().manual_seed(seed)
    return _generate(
        policy, ids.repeat_interleave(rows, 0), mask.repeat_interleave(rows, 0),
        temperature=temperature, generator=generator, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_logprobs_and_entropies_match_sequence_logprobs(policy, prompts, temperature):
    rollouts = _sampled(policy, prompts, temperature=temperature)
    with torch.no_grad():
        logprobs, entropy = sequence_logprobs(policy.model, rollouts, temperature, with_entropy=True)
    assert logprobs.shape == entropy.shape == rollouts.response_ids.shape
    torch.testing.assert_close(rollouts.logprobs, logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollouts.entropy, entropy, atol=1e-5, rtol=0)
    mask = rollouts.response_mask.bool()
    assert (rollouts.logprobs[~mask] == 0).all() and (rollouts.entropy[~mask] == 0).all()
    assert (rollouts.logprobs[mask] < 0).all()
    assert (rollouts.entropy[mask] > 0).all() and (rollouts.entropy[mask] <= math.log(len(policy.tokenizer)) + 1e-5).all()


def test_temperature_changes_the_recorded_distribution(policy, prompts):
    hot = _sampled(policy, prompts, temperature=1.0)
    with torch.no_grad():
        cold, cold_entropy = sequence_logprobs(policy.model, hot, 0.5, with_entropy=True)
    mask = hot.response_mask.bool()
    # the same tokens scored at a lower temperature: a sharper distribution, lower entropy
    assert cold_entropy[mask].mean() < hot.entropy[mask].mean()


def test_sequence_logprobs_has_gradients_and_no_entropy_by_default(policy, prompts):
    rollouts = _sampled(policy, prompts, rows=1, max_new_tokens=4)
    logprobs, entropy = sequence_logprobs(policy.model, rollouts)
    assert entropy is None and logprobs.requires_grad
    logprobs.sum().backward()
    grads = [p.grad for p in policy.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    policy.model.zero_grad(set_to_none=True)


def test_mask_covers_up_to_and_including_eos_and_finished_flags(policy, prompts):
    rollouts = _sampled(policy, prompts, rows=8, max_new_tokens=16)
    ids, mask, finished = rollouts.response_ids, rollouts.response_mask, rollouts.finished
    eos, pad = policy.eos_id, policy.pad_id
    assert mask.dtype == torch.float32 and finished.dtype == torch.bool
    assert finished.any() and not finished.all(), "the seed should give both finished and unfinished rows"
    for row in range(ids.shape[0]):
        tokens = ids[row].tolist()
        if finished[row]:
            end = tokens.index(eos)
            assert mask[row].tolist() == [1.0] * (end + 1) + [0.0] * (len(tokens) - end - 1)
            assert tokens[end + 1 :] == [pad] * (len(tokens) - end - 1)
            assert eos not in tokens[:end]
        else:
            # ran out of budget: every one of the max_new_tokens tokens counts, none is EOS
            assert ids.shape[1] == 16
            assert mask[row].tolist() == [1.0] * 16
            assert eos not in tokens
    assert torch.equal(rollouts.lengths, mask.sum(dim=1))


def test_response_width_is_trimmed_to_the_longest_response(policy, prompts):
    rollouts = _sampled(policy, prompts, rows=2, max_new_tokens=40)
    assert rollouts.response_ids.shape[1] == int(rollouts.lengths.max())
    if rollouts.finished.all():
        assert rollouts.response_ids.shape[1] < 40


def test_same_seed_same_rollouts_other_seed_other_rollouts(policy, prompts):
    a = _sampled(policy, prompts, seed=7)
    b = _sampled(policy, prompts, seed=7)
    c = _sampled(policy, prompts, seed=8)
    for field in ("response_ids", "response_mask", "logprobs", "entropy", "finished"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.response_ids.shape != c.response_ids.shape or not torch.equal(a.response_ids, c.response_ids)


def test_select_keeps_rows_and_drops_all_padding_columns(policy, prompts):
    rollouts = _sampled(policy, prompts, rows=1, max_new_tokens=12)
    shortest = rollouts.lengths.argmin().reshape(1)
    picked = rollouts.select(shortest)
    width = int(rollouts.lengths[shortest].item())
    assert picked.response_ids.shape == (1, width)
    assert torch.equal(picked.response_ids, rollouts.response_ids[shortest, :width])
    assert torch.equal(picked.logprobs, rollouts.logprobs[shortest, :width])
    # left padding that no selected row uses is gone; the real prompt tokens are all there
    assert bool(picked.prompt_mask[:, 0].all())
    assert int(picked.prompt_mask.sum()) == int(rollouts.prompt_mask[shortest].sum())
    # the forward over the trimmed rows gives the same log-probs as over the full batch
    full, _ = sequence_logprobs(policy.model, rollouts)
    trimmed, _ = sequence_logprobs(policy.model, picked)
    assert torch.allclose(trimmed, full[shortest, :width], atol=1e-5)


def test_lab_task_prompts_encode_and_generate(policy):
    problems = LabTask().problems("train", 3, seed=0)
    ids, mask = policy.encode_prompts([p.prompt for p in problems])
    rollouts = _generate(policy, ids, mask, greedy=True, max_new_tokens=4)
    texts = policy.decode(rollouts.response_ids, rollouts.response_mask)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


# ----------------------------------------------------------------------------------------------------------------
# top-p
# ----------------------------------------------------------------------------------------------------------------


def _kept(logits: torch.Tensor, top_p: float) -> list[list[int]]:
    out = _top_p_filter(logits, top_p)
    return [sorted(torch.isfinite(row).nonzero().flatten().tolist()) for row in out]


def test_top_p_filter_keeps_the_smallest_set_reaching_top_p():
    # row 0: probs [0.15, 0.5, 0.05, 0.3]; row 1: the same probs in another order
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.3, 0.05, 0.5, 0.15]])
    logits = probs.log()
    assert _kept(logits, 0.4) == [[1], [2]]  # the top token alone reaches 0.4
    assert _kept(logits, 0.7) == [[1, 3], [0, 2]]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert _kept(logits, 0.9) == [[0, 1, 3], [0, 2, 3]]  # 0.8 < 0.9 <= 0.95
    assert _kept(logits, 0.99) == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert _kept(logits, 1e-6) == [[1], [2]]  # the most likely token always stays
    # kept logits are untouched
    out = _top_p_filter(logits, 0.7)
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])


def test_top_p_sampling_draws_only_from_the_nucleus(policy, prompts):
    rollouts = _sampled(policy, prompts, rows=4, top_p=0.5, max_new_tokens=6)
    with torch.no_grad():
        # the full-forward distribution at each step; every sampled token must be in its top-p set
        prompt_len = rollouts.prompt_ids.shape[1]
        ids = torch.cat([rollouts.prompt_ids, rollouts.response_ids], 1)
        attention = torch.cat([rollouts.prompt_mask, rollouts.response_mask.long()], 1)
        logits = policy.model(input_ids=ids, attention_mask=attention, position_ids=positions_from_mask(attention)).logits
        logits = logits[:, prompt_len - 1 : -1].float()
    mask = rollouts.response_mask.bool()
    kept = torch.isfinite(_top_p_filter(logits, 0.5))
    chosen = kept.gather(-1, rollouts.response_ids.unsqueeze(-1)).squeeze(-1)
    # near-ties at the nucleus edge could flip between cached and full forward; allow none on this seed
    assert chosen[mask].all()
    # the recorded log-probs are still those of the untruncated distribution (as verl records them)
    full = logits.log_softmax(-1).gather(-1, rollouts.response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(rollouts.logprobs[mask], full[mask], atol=1e-5, rtol=0)


def test_llama_decoder_matches_the_generic_decoder_on_lab_tiny(monkeypatch):
    """The fast Llama path (in-place cache, finished rows dropped) samples what the model's own forward samples."""
    from canonrl.lab import decoding, sampling
    from canonrl.lab.policy import LAB_TINY_DIR, load_policy
    from canonrl.lab.tasks.lab import LabTask

    if not (LAB_TINY_DIR / "config.json").exists():
        pytest.skip("lab-tiny is not built")
    policy = load_policy("lab-tiny")
    problems = LabTask().problems("heldout", 24, seed=5)
    ids, mask = policy.encode_prompts([p.prompt for p in problems for _ in range(2)])
    assert decoding.LlamaDecoder.supports(policy.model)

    def run(greedy):
        return sampling.generate(
            policy.model, ids, mask, max_new_tokens=96, eos_id=policy.eos_id, pad_id=policy.pad_id,
            greedy=greedy, generator=torch.Generator().manual_seed(11),
        )

    # sampled: dropping rows changes which draws the generator makes, so check the records, not the draws
    sampled = run(greedy=False)
    assert sampled.lengths.unique().numel() > 3  # rows finished at different lengths: rows were dropped
    full_logprobs, full_entropy = sequence_logprobs(policy.model, sampled, with_entropy=True)
    assert torch.allclose(sampled.logprobs, full_logprobs.detach(), atol=1e-4)
    assert torch.allclose(sampled.entropy, full_entropy, atol=1e-4)

    fast = run(greedy=True)
    monkeypatch.setattr(decoding.LlamaDecoder, "supports", staticmethod(lambda model: False))
    generic = run(greedy=True)
    assert fast.lengths.unique().numel() > 3
    assert torch.equal(fast.response_ids, generic.response_ids)
    assert torch.equal(fast.response_mask, generic.response_mask)
    assert torch.allclose(fast.logprobs, generic.logprobs, atol=1e-5)
    assert torch.allclose(fast.entropy, generic.entropy, atol=1e-5)


def test_shared_prompts_give_the_full_forwards_logprobs_and_gradients(policy):
    """Prompts run once per group (leaf KV cache, one backward through them) = every row's full forward."""
    from canonrl.lab.forward import SharedPrompts

    ids, mask = policy.encode_prompts(PROMPTS[:4])
    rollouts = generate(
        policy.model, ids, mask, max_new_tokens=10, eos_id=policy.eos_id, pad_id=policy.pad_id,
        generator=torch.Generator().manual_seed(3), repeats=3,
    )  # fmt: skip
    assert rollouts.repeats == 3 and rollouts.response_ids.shape[0] == 12
    weights = torch.randn(rollouts.response_ids.shape, generator=torch.Generator().manual_seed(4))
    rows = torch.tensor([7, 0, 5, 11, 1, 2, 9])  # unsorted, several groups, some groups partly

    def gradients(logprob_fn):
        policy.model.zero_grad(set_to_none=True)
        logprob_fn()
        return {name: p.grad.clone() for name, p in policy.model.named_parameters() if p.grad is not None}

    full_values = {}

    def full():
        logprobs, _ = sequence_logprobs(policy.model, rollouts.select(rows))
        full_values["logprobs"] = logprobs.detach()
        (logprobs * weights[rows, : logprobs.shape[1]]).sum().backward()

    shared_values = {}

    def shared():
        prompts = SharedPrompts(policy.model, rollouts, rows)
        parts = []
        for chunk in (rows[:3], rows[3:]):  # two micro-batches, each trimmed to its own width
            mini = rollouts.select(chunk)
            logprobs = prompts.logprobs(chunk, mini)
            (logprobs * weights[chunk, : logprobs.shape[1]]).sum().backward()
            parts.append(torch.nn.functional.pad(logprobs.detach(), (0, rollouts.response_ids.shape[1] - logprobs.shape[1])))
        prompts.backward()
        shared_values["logprobs"] = torch.cat(parts)

    expected, got = gradients(full), gradients(shared)
    width = full_values["logprobs"].shape[1]
    assert torch.allclose(shared_values["logprobs"][:, :width], full_values["logprobs"], atol=1e-5)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5, rtol=1e-4), name


def test_llama_decoder_handles_grouped_query_attention(monkeypatch):
    """SmolLM2 shares each KV head between 3 query heads; the fast decoder must group queries as transformers does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from canonrl.lab import decoding
    from canonrl.lab.tasks.lab import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    policy = Policy(LlamaForCausalLM(config).eval(), tokenizer, "gqa")
    ids, mask = policy.encode_prompts(PROMPTS)
    assert decoding.LlamaDecoder.supports(policy.model)

    def run():
        return generate(policy.model, ids, mask, max_new_tokens=12, eos_id=policy.eos_id, pad_id=policy.pad_id,
                        greedy=True, repeats=2)

    fast = run()
    monkeypatch.setattr(decoding.LlamaDecoder, "supports", staticmethod(lambda model: False))
    generic = run()
    assert torch.equal(fast.response_ids, generic.response_ids)
    assert torch.allclose(fast.logprobs, generic.logprobs, atol=1e-5)
    assert torch.allclose(fast.entropy, generic.entropy, atol=1e-5)
