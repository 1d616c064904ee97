"""Bad input gets a one-line error naming the argument and rows; edge inputs are handled explicitly."""

import numpy as np
import pytest
import torch

import canonrl
from canonrl.batch import PER_TOKEN_FIELDS, make_batch
from canonrl.fields import BY_NAME, PER_RESPONSE_K
from conftest import full_mask

R = torch.tensor([1.0, 0.0, 1.0, 0.0])
G = torch.tensor([0, 0, 1, 1])


def grpo(**kw):
    args = dict(rewards=R, group=G, mask=full_mask(4))
    args.update(kw)
    return canonrl.advantages("grpo", **args)


def test_nan_rewards_name_the_rows():
    rewards = torch.zeros(20)
    rewards[3] = rewards[17] = float("nan")
    with pytest.raises(ValueError, match=r"rewards has NaN at rows \[3, 17\]"):
        canonrl.advantages("grpo", rewards=rewards, group=torch.zeros(20, dtype=torch.long), mask=full_mask(20))


def test_inf_rewards():
    with pytest.raises(ValueError, match=r"rewards has Inf at rows \[2\]"):
        grpo(rewards=torch.tensor([0.0, 1.0, float("inf"), 0.0]))


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(rewards=torch.zeros(3)), ValueError, r"rewards must have shape \[4\]"),
        (dict(rewards=torch.zeros(4, 2, 1)), ValueError, r"rewards must have shape \[4\]"),
        (dict(rewards=torch.zeros(4, 2)), ValueError, r"rewards has shape \[4, 2\].*'grpo' takes one reward"),
        (dict(rewards=torch.zeros(4, 0)), ValueError, r"K >= 1 reward components"),
        (dict(rewards=torch.tensor([[0.0, 1], [0, float("nan")], [0, 0], [1, 1]])), ValueError, r"rewards has NaN at rows \[1\]"),
        (dict(group=torch.zeros(4)), TypeError, "group must hold integer ids"),
        (dict(group=[0, 0, 1]), ValueError, "group must have one id per row"),
        (dict(group="abcd"), TypeError, "group must be"),
        (dict(mask=torch.ones(4)), ValueError, r"mask must have shape \[B, T\]"),
        (dict(mask=torch.full((4, 3), 2.0)), ValueError, r"mask must hold values in \[0, 1\].*rows \[0, 1, 2, 3\]"),
        (dict(mask=torch.tensor([[1, -1.0, 0]] * 4)), ValueError, r"mask must hold values in \[0, 1\]"),
        (dict(mask=None), ValueError, "mask is required"),
        (dict(rewards=None), ValueError, "rewards is required"),
        (dict(group=None), ValueError, "group is required"),
        (dict(rewards=R.to("meta")), ValueError, "rewards is on meta but mask is on cpu"),
    ],
)
def test_bad_batch_fields(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        grpo(**kwargs)


@pytest.mark.parametrize(
    "field, value, pattern",
    [
        ("greedy_rewards", torch.zeros(3), r"greedy_rewards must have shape \[4\]"),
        ("reference_rewards", torch.tensor([0.0, float("inf"), 0, 0]), r"reference_rewards has Inf at rows \[1\]"),
        ("prompt_confidence", torch.tensor([0.5, 1.0, 0.0, 1.5]), r"prompt_confidence must lie in \(0, 1\].*rows \[2, 3\]"),
        ("ref_logprobs", torch.zeros(4, 2), r"ref_logprobs must have the mask's shape"),
        ("ref_logprobs", torch.zeros(4, 3, dtype=torch.long), r"ref_logprobs must be a float tensor"),
    ],
)
def test_bad_extra_inputs_name_the_argument_and_rows(field, value, pattern):
    with pytest.raises(ValueError if "must be a float" not in pattern else TypeError, match=pattern):
        grpo(**{field: value})


def test_fractional_mask_values_weight_their_tokens():
    mask = full_mask(4)
    mask[:, 1] = 0.5
    assert torch.equal(grpo(mask=mask)[:, 1], grpo()[:, 0] * 0.5)


def test_padding_that_is_nan_does_not_change_fractional_mask_weights():
    """The masked sums weight each token by its mask value whether or not the padding holds NaN."""
    mask = full_mask(4)
    mask[:, 0] = 0.5
    mask[1, 2] = 0
    entropy = torch.rand(4, 3)
    clean = make_batch(rewards=R, group=G, mask=mask, entropy=entropy).masked_row_mean("entropy")
    entropy[1, 2] = float("nan")  # padding
    padded = make_batch(rewards=R, group=G, mask=mask, entropy=entropy).masked_row_mean("entropy")
    assert torch.equal(padded, clean)


def test_per_token_inputs_are_checked_inside_the_mask_only():
    mask = full_mask(4)
    mask[1, 2] = 0
    entropy = torch.rand(4, 3)
    entropy[1, 2] = float("nan")  # padding: fine
    canonrl.advantages("canon", rewards=R, group=G, mask=mask, entropy=entropy)
    entropy[3, 0] = float("inf")  # inside the mask: an error naming row 3
    with pytest.raises(ValueError, match=r"entropy is NaN or Inf inside the mask at rows \[3\]"):
        canonrl.advantages("canon", rewards=R, group=G, mask=mask, entropy=entropy)
    with pytest.raises(ValueError, match=r"entropy must have the mask's shape"):
        canonrl.advantages("canon", rewards=R, group=G, mask=mask, entropy=torch.rand(4, 2))
    with pytest.raises(TypeError, match="entropy must be a float tensor"):
        canonrl.advantages("canon", rewards=R, group=G, mask=mask, entropy=torch.ones(4, 3, dtype=torch.long))


def test_metric_tensor_is_checked():
    with pytest.raises(ValueError, match=r"metric has NaN at rows \[1\]"):
        canonrl.advantages("canon", rewards=R, group=G, mask=full_mask(4), metric=torch.tensor([0, float("nan"), 0, 0]))


def test_indicators_are_checked_on_valid_rows_only():
    mask = full_mask(4)
    mask[2] = 0  # a fully masked row: its indicators are not read
    indicators = torch.ones(4, 3)
    indicators[2] = float("nan")
    batch = make_batch(rewards=R, group=G, mask=mask, indicators=indicators)
    assert batch.indicators.dtype == torch.float32 and torch.equal(batch.indicators[2], torch.zeros(3))
    indicators[1, 0] = indicators[3, 2] = float("inf")
    with pytest.raises(ValueError, match=r"indicators has Inf at rows \[1, 3\]"):
        make_batch(rewards=R, group=G, mask=mask, indicators=indicators)
    for bad in (torch.ones(4), torch.ones(3, 3), torch.ones(4, 0)):
        with pytest.raises(ValueError, match=r"indicators must have shape \[4, K\]"):
            make_batch(rewards=R, group=G, mask=mask, indicators=bad)
    with pytest.raises(TypeError, match="indicators must be a torch.Tensor"):
        make_batch(rewards=R, group=G, mask=mask, indicators=[[1.0, 2.0, 3.0]] * 4)


def test_unknown_estimator_and_hyperparameter():
    with pytest.raises(ValueError, match="unknown estimator 'grpoo'; choose from: .*grpo"):
        canonrl.advantages("grpoo", rewards=R, group=G, mask=full_mask(4))
    with pytest.raises(TypeError, match="unknown hyperparameter 'epsilon' for estimator 'grpo'; valid: .*eps"):
        grpo(epsilon=0.1)
    with pytest.raises(ValueError, match="scale must be one of"):
        grpo(scale="prompt")
    with pytest.raises(ValueError, match="singleton must be one of"):
        grpo(singleton="keep")


def test_empty_batch_returns_an_empty_result():
    def empty_shape(name):
        return (0, 5) if name in PER_TOKEN_FIELDS else (0, 3) if BY_NAME[name].shape == PER_RESPONSE_K else (0,)

    for info in canonrl.estimators():
        extra = {
            name: torch.zeros(empty_shape(name), dtype=torch.long if name == "token_ids" else torch.float32)
            for name in canonrl.get_estimator(info.name).required_inputs()  # at its defaults
        }
        out = canonrl.advantages(info.name, rewards=torch.zeros(0), group=[], mask=torch.zeros(0, 5), **extra)
        assert out.shape == (0, 5) and out.dtype == torch.float32


def test_uid_strings_numpy_objects_and_bool_inputs():
    uids = np.array(["b", "b", "a", "a"], dtype=object)
    expected = grpo()
    assert torch.equal(grpo(group=uids), expected)
    assert torch.equal(grpo(group=["x", "x", (1, 2), (1, 2)]), expected)  # any hashable ids
    assert torch.equal(grpo(rewards=R.bool(), mask=full_mask(4).bool()), expected)


def test_bf16_in_float32_out():
    out = canonrl.advantages(
        "canon", rewards=R.bfloat16(), group=G, mask=full_mask(4).bfloat16(), entropy=torch.rand(4, 3).bfloat16()
    )
    assert out.dtype == torch.float32


def test_token_rewards_stand_in_for_rewards():
    token_rewards = torch.zeros(4, 3)
    token_rewards[:, -1] = R
    assert torch.equal(canonrl.advantages("grpo", token_rewards=token_rewards, group=G, mask=full_mask(4)), grpo())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (64,), generator=generator).float()
    group = torch.arange(8).repeat(8)
    mask = full_mask(64, 16)
    entropy = torch.rand(64, 16, generator=generator)
    for info in canonrl.estimators():
        cpu = canonrl.advantages(info.name, rewards=rewards, group=group, mask=mask, entropy=entropy)
        cuda = canonrl.advantages(
            info.name, rewards=rewards.cuda(), group=group.cuda(), mask=mask.cuda(), entropy=entropy.cuda()
        )
        assert cuda.device.type == "cuda"
        assert torch.allclose(cpu, cuda.cpu(), atol=1e-5), info.name


def test_finite_values_whose_sum_overflows_are_accepted():
    # The finiteness check sums first; an overflowing sum of finite values must fall back to the exact check.
    huge = torch.full((4,), 3e38)
    batch = make_batch(rewards=huge, group=torch.tensor([0, 0, 1, 1]), mask=full_mask(4, 3))
    assert torch.equal(batch.rewards, huge)
    token_rewards = torch.zeros(4, 3)
    token_rewards[:, 0] = 3e38
    make_batch(token_rewards=token_rewards, rewards=torch.zeros(4), group=[0, 0, 1, 1], mask=full_mask(4, 3))
    token_rewards[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"token_rewards has Inf at rows \[2\]"):
        make_batch(token_rewards=token_rewards, rewards=torch.zeros(4), group=[0, 0, 1, 1], mask=full_mask(4, 3))


def test_gae_accepts_finite_values_whose_sum_overflows():
    values = torch.full((2, 3), 3e38)
    adv, returns = canonrl.get_estimator("gae").compute_with_returns(
        rewards=torch.zeros(2), group=[0, 0], mask=full_mask(2, 3), values=values
    )
    assert torch.isfinite(returns).all()
    values[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"values is NaN or Inf inside the mask at rows \[1\]"):
        canonrl.advantages("gae", rewards=torch.zeros(2), group=[0, 0], mask=full_mask(2, 3), values=values)
