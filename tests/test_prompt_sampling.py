"""VADE's Beta-posterior Thompson prompt sampler and the uniform sampler."""

from __future__ import annotations

import copy

import pytest
import torch

from canonrl.training.prompt_sampling import UniformPromptSampler, VADEPromptSampler, make_prompt_sampler


def test_posterior_update_by_hand():
    s = VADEPromptSampler(4, seed=0, prior_alpha=1.0, prior_beta=2.0)
    # prompt 1: 3 responses, 2 correct; prompt 3: 2 responses, 0.5 + 0 correct; prompts 0 and 2 unseen
    s.update(torch.tensor([1, 1, 3, 1, 3]), torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0]))
    assert s.alpha.tolist() == [1.0, 3.0, 1.0, 1.5]
    assert s.beta.tolist() == [2.0, 3.0, 2.0, 3.5]
    assert s.mean[1].item() == pytest.approx(0.5)


def test_decays_by_hand():
    s = VADEPromptSampler(3, seed=0, prior_alpha=1.0, prior_beta=1.0, global_decay=0.5, sample_decay=0.5)
    s.update(torch.tensor([0, 0, 0, 0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    # step 1: decays act on the prior (no-op), then evidence: alpha0 = 1 + 3, beta0 = 1 + 1
    assert s.alpha.tolist() == [4.0, 1.0, 1.0] and s.beta.tolist() == [2.0, 1.0, 1.0]
    s.update(torch.tensor([1, 1]), torch.tensor([1.0, 1.0]))
    # prompt 0 (unseen): only the global decay: 1 + 0.5*3 = 2.5, 1 + 0.5*1 = 1.5
    # prompt 1: global then per-sample decay of no evidence, then +2 successes
    assert s.alpha.tolist() == [2.5, 3.0, 1.0] and s.beta.tolist() == [1.5, 1.0, 1.0]
    s.update(torch.tensor([0]), torch.tensor([0.0]))
    # prompt 0: global 1 + 0.5*1.5 = 1.75, sample 1 + 0.5*0.75 = 1.375; beta: 1.25 -> 1.125 -> +1
    assert s.alpha[0].item() == pytest.approx(1.375) and s.beta[0].item() == pytest.approx(2.125)
    # prompt 1 only globally decayed: 1 + 0.5*2 = 2
    assert s.alpha[1].item() == pytest.approx(2.0)


def test_determinism_with_seed():
    a, b = VADEPromptSampler(50, seed=7), VADEPromptSampler(50, seed=7)
    for _ in range(5):
        ids_a, ids_b = a.sample(8), b.sample(8)
        assert torch.equal(ids_a, ids_b)
        correct = (ids_a % 3 == 0).double()
        a.update(ids_a, correct)
        b.update(ids_b, correct)
    assert not torch.equal(VADEPromptSampler(50, seed=8).sample(8), VADEPromptSampler(50, seed=7).sample(8))


@pytest.mark.parametrize("name", ["vade", "uniform"])
def test_state_dict_round_trip(name):
    s = make_prompt_sampler(name, 30, seed=3)
    for _ in range(4):
        ids = s.sample(7)
        s.update(ids.repeat_interleave(2), (ids.repeat_interleave(2) % 2).double())
    state = copy.deepcopy(s.state_dict())
    expected = [s.sample(7) for _ in range(6)]
    fresh = make_prompt_sampler(name, 30, seed=99)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.sample(7), e) for e in expected)
    # state_dict survives torch.save / torch.load
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = make_prompt_sampler(name, 30, seed=0)
    loaded.load_state_dict(torch.load(buffer, weights_only=False))
    assert torch.equal(loaded.sample(7), expected[0])


def test_prefers_informative_prompts():
    """Over many draws, prompts with posteriors near 0.5 are chosen far more often than easy or hard ones."""
    s = VADEPromptSampler(30, seed=0)
    # 10 easy (p ≈ 0.95), 10 hard (p ≈ 0.05), 10 informative (p ≈ 0.5), 40 observations each
    ids = torch.arange(30).repeat_interleave(40)
    rate = torch.cat([torch.full((10,), 0.95), torch.full((10,), 0.05), torch.full((10,), 0.5)])
    correct = (torch.arange(40)[None, :] < (rate[:, None] * 40).round()).double().flatten()
    s.update(ids, correct)
    counts = torch.zeros(30)
    for _ in range(500):
        counts.index_add_(0, s.sample(10), torch.ones(10))
    easy, hard, informative = counts[:10].sum(), counts[10:20].sum(), counts[20:].sum()
    assert informative > 0.9 * counts.sum()
    assert counts[20:].min() > 5 * max(easy, hard) / 10  # every informative prompt beats the easy/hard average
    # an unseen prompt (flat prior) is explored: it beats ten confidently easy ones in ~83% of the draws
    s2 = VADEPromptSampler(11, seed=1)
    s2.update(torch.arange(10).repeat_interleave(40), torch.ones(400, dtype=torch.float64))
    picks = torch.zeros(11)
    for _ in range(300):
        picks.index_add_(0, s2.sample(1), torch.ones(1))
    assert picks[10] > 200


def test_sample_returns_distinct_ids():
    s = VADEPromptSampler(20, seed=0, epsilon=0.3)
    for _ in range(20):
        ids = s.sample(20)
        assert sorted(ids.tolist()) == list(range(20))
        assert ids.dtype == torch.long


def test_uniform_sampler_epochs():
    s = UniformPromptSampler(10, seed=0)
    first = torch.cat([s.sample(5), s.sample(5)])
    assert sorted(first.tolist()) == list(range(10))  # one epoch = every prompt once
    assert s.epoch == 0
    # a batch that crosses the epoch boundary holds distinct prompts
    for _ in range(30):
        ids = s.sample(3)
        assert len(set(ids.tolist())) == 3
    assert s.epoch > 0
    # frequencies are uniform over many epochs
    counts = torch.zeros(10)
    for _ in range(200):
        counts.index_add_(0, s.sample(5), torch.ones(5))
    assert counts.min() >= 95 and counts.max() <= 105
    s.update(torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))  # a no-op that validates


def test_factory_and_errors():
    assert isinstance(make_prompt_sampler("uniform", 5, 0), UniformPromptSampler)
    v = make_prompt_sampler("vade", 5, 0, prior_alpha=2.0, global_decay=0.9)
    assert isinstance(v, VADEPromptSampler) and v.alpha[0] == 2.0
    with pytest.raises(ValueError, match="prompt_sampler"):
        make_prompt_sampler("mopps", 5, 0)
    with pytest.raises(ValueError, match="unknown vade parameters"):
        make_prompt_sampler("vade", 5, 0, decay=0.9)
    with pytest.raises(ValueError, match="no parameters"):
        make_prompt_sampler("uniform", 5, 0, epsilon=0.1)
    with pytest.raises(ValueError, match="num_prompts"):
        make_prompt_sampler("vade", 0, 0)
    with pytest.raises(ValueError, match="batch_size"):
        v.sample(6)
    with pytest.raises(ValueError, match="batch_size"):
        v.sample(0)
    with pytest.raises(ValueError, match="global_decay"):
        VADEPromptSampler(5, global_decay=1.5)
    with pytest.raises(ValueError, match="prior_beta"):
        VADEPromptSampler(5, prior_beta=0.0)
    with pytest.raises(ValueError, match=r"out of range at rows \[1\]"):
        v.update(torch.tensor([0, 5]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"invalid at rows \[0\]"):
        v.update(torch.tensor([0, 1]), torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        v.update(torch.tensor([0, 1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="integer"):
        v.update(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="sampler 'uniform'"):
        v.load_state_dict(make_prompt_sampler("uniform", 5, 0).state_dict())
    with pytest.raises(ValueError, match="num_prompts"):
        v.load_state_dict(make_prompt_sampler("vade", 6, 0).state_dict())
    before = v.alpha.clone()
    v.update(torch.zeros(0, dtype=torch.long), torch.zeros(0))  # empty step: fine
    assert torch.equal(v.alpha, before)
