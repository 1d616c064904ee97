"""The one table of batch inputs (canonrl.fields): make_batch, the estimators and the consumers all read it."""

from __future__ import annotations

import inspect

import pytest
import torch

import canonrl
from canonrl.batch import RolloutBatch, make_batch
from canonrl.fields import BASE, BY_NAME, FIELDS, Consumer


def test_make_batch_and_the_batch_take_exactly_the_declared_fields():
    named = [p for p in inspect.signature(make_batch).parameters.values() if p.kind is p.KEYWORD_ONLY]
    step = [f.name for f in FIELDS if f.family == "step"]
    assert sorted([p.name for p in named] + step) == sorted(BY_NAME)
    attributes = set(RolloutBatch.__dataclass_fields__)
    assert set(BY_NAME) - {"group"} <= attributes  # the group is held as its codes, group_index
    with pytest.raises(TypeError, match="unknown input 'bogus'"):
        make_batch(rewards=torch.ones(2), group=[0, 0], mask=torch.ones(2, 1), bogus=1)


def test_every_estimator_reads_only_declared_fields():
    for info in canonrl.estimators():
        undeclared = [name for name in info.requires if name not in BY_NAME]
        assert not undeclared, f"{info.name} requires {undeclared}: declare them in canonrl.fields.FIELDS"


def test_a_consumer_builds_what_it_can_feed_and_names_what_it_cannot():
    consumer = Consumer("my trainer", {"entropy": "from the sampler"}, missing="compute it yourself")
    assert consumer.estimator("canon", split_by="entropy").name == "canon"
    with pytest.raises(ValueError) as info:
        consumer.estimator("ktae")
    message = str(info.value)
    assert message == (
        "my trainer: estimator 'ktae' needs token_ids ([B, T], the response's token ids), which my trainer does not "
        "provide (it provides rewards, group, mask, entropy); compute it yourself"
    )
    with pytest.raises(ValueError, match="declares an unknown batch input 'entropies'"):
        Consumer("typo", {"entropies": "..."})


def test_every_consumer_declares_what_it_provides_and_how():
    from canonrl.integrations.verl import BATCH_KEYS, NON_TENSOR_KEYS, VERL
    from canonrl.lab.inputs import LAB, LAB_INPUTS
    from canonrl.simulate.measures import SIMULATOR

    assert set(LAB.provides) == set(LAB_INPUTS)
    assert set(VERL.provides) == {*BATCH_KEYS, *NON_TENSOR_KEYS, "token_rewards"}
    for consumer in (LAB, VERL, SIMULATOR):
        assert not set(consumer.provides) & set(BASE) and all(consumer.provides.values()), consumer.name
    with pytest.raises(ValueError, match="the simulator: estimator 'gae' needs values"):
        SIMULATOR.estimator("gae")
    with pytest.raises(ValueError, match="verl: estimator 'aapo' needs reference_rewards .*not in verl"):
        VERL.estimator("aapo")
