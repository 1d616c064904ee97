"""Every batch input, declared once: its name, its shape, its dtype rule and its meaning.

`make_batch` accepts exactly these fields (`canonrl.batch` derives its field lists from the table); an estimator
names the ones it reads beyond ``rewards``/``group``/``mask`` in ``requires``; and every consumer that builds
batches — the lab, the TRL and verl integrations, the simulator — declares which it provides and how
(`Consumer`). `Consumer.estimator` then builds an estimator for that consumer, or raises one line naming the
missing input, what it is, and how that consumer could get it.

Examples:
    >>> consumer = Consumer("my trainer", {"entropy": "from the sampler"}, missing="compute it and pass it")
    >>> consumer.estimator("grpo").name
    'grpo'
    >>> consumer.estimator("ktae")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ValueError: my trainer: estimator 'ktae' needs token_ids ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: shapes: one value per token [B, T]; per response (row) [B]; per step (several forms, see canonrl.steps); K values
#: per response [B, K]
PER_TOKEN, PER_RESPONSE, PER_STEP, PER_RESPONSE_K = "[B, T]", "[B]", "per step", "[B, K]"


@dataclass(frozen=True)
class InputField:
    name: str
    shape: str
    dtype: str
    meaning: str
    family: str = "outcome"  # "base" (every batch), "outcome" (outcome- and token-level), "step" (steps.md §2)


FIELDS: tuple[InputField, ...] = (
    # every batch
    InputField("rewards", PER_RESPONSE, "float or bool ([B, K]: K reward components)", "outcome reward per response", "base"),
    InputField("group", PER_RESPONSE, "int or hashable ids", "the prompt (group) of each response", "base"),
    InputField("mask", PER_TOKEN, "bool, int or float in [0, 1]", "response mask: 1 on response tokens", "base"),
    # outcome- and token-level inputs
    InputField("token_rewards", PER_TOKEN, "float", "per-token rewards (verl's token_level_rewards)"),
    InputField("entropy", PER_TOKEN, "float", "per-token entropy of the sampling distribution"),
    InputField("logprobs", PER_TOKEN, "float", "per-token log-prob of the sampled token"),
    InputField("token_ids", PER_TOKEN, "int", "the response's token ids"),
    InputField("ref_logprobs", PER_TOKEN, "float", "per-token log-probs under the frozen reference policy"),
    InputField("token_scores", PER_TOKEN, "float", "a per-token statistic from a producer (importance, answer entropy)"),
    InputField("metric", PER_RESPONSE, "float", "a per-response number the estimator groups or weights by"),
    InputField("greedy_rewards", PER_RESPONSE, "float", "reward of a greedy response to the row's prompt (ReMax)"),
    InputField("reference_rewards", PER_RESPONSE, "float", "reward of the reference policy's response (AAPO)"),
    InputField("prompt_confidence", PER_RESPONSE, "float in (0, 1]", "exp(mean prompt-token log-prob) (ProGRPO)"),
    InputField("human_values", PER_RESPONSE, "float >= 0", "the human value v of the row's prompt (RLEV)"),
    InputField(
        "indicators", PER_RESPONSE_K, "float", "K per-response indicators from a producer (e.g. effective rank ERA, ERV, ER)"
    ),
    # step-, turn- and critic-level inputs (../shared/specs/steps.md §2)
    InputField("turn_ids", PER_TOKEN, "int (-1: no step), or 'mask_runs' / 'row'", "the step of each token", "step"),
    InputField("traj", PER_RESPONSE, "int or hashable ids", "the trajectory of each row (row-per-step layouts)", "step"),
    InputField("step_index", PER_RESPONSE, "int (-1: padding row)", "time position of the row in its trajectory", "step"),
    InputField("step_rewards", PER_STEP, "float", "environment or turn reward of each step", "step"),
    InputField("anchor", PER_STEP, "int or hashable ids", "the environment state each step starts from", "step"),
    InputField("agent", PER_STEP, "int or hashable ids", "the player or role of each step", "step"),
    InputField("step_values", PER_STEP, "float", "a value at the end of each step (process reward, V*)", "step"),
    InputField("step_labels", PER_STEP, "float", "a verifier's label of each step", "step"),
    InputField("node", PER_STEP, "int or hashable ids", "the tree node of each step", "step"),
    InputField("parent", PER_STEP, "int or hashable ids", "the parent node of each step's node", "step"),
    InputField("prompt_values", PER_RESPONSE, "float (NaN: absent)", "value of the initial state", "step"),
    InputField("values", PER_TOKEN, "float", "the critic's per-token values", "step"),
    InputField("bootstrap_values", PER_RESPONSE, "float", "value after the last token of a truncated row", "step"),
)
BY_NAME: dict[str, InputField] = {f.name: f for f in FIELDS}
#: always given: every consumer provides them
BASE = ("rewards", "group", "mask")


@dataclass
class Consumer:
    """A builder of batches: the inputs it `provides` beyond `BASE` (field -> how it gets it) and, for the others,
    what a user of it can do (`missing`)."""

    name: str
    provides: Mapping[str, str] = field(default_factory=dict)
    missing: str = "it cannot provide it"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.provides) - set(BY_NAME))
        if unknown:
            raise ValueError(f"{self.name} declares an unknown batch input {unknown[0]!r}")

    def missing_inputs(self, required: tuple[str, ...]) -> list[str]:
        return [name for name in required if name not in BASE and name not in self.provides]

    def check(self, estimator: Any) -> Any:
        """`estimator`, if this consumer provides every input it reads; else one line naming the first missing one."""
        missing = self.missing_inputs(tuple(estimator.required_inputs()))
        if missing:
            first = BY_NAME[missing[0]]
            provided = ", ".join((*BASE, *self.provides))
            raise ValueError(
                f"{self.name}: estimator {estimator.name!r} needs {first.name} ({first.shape}, {first.meaning}), "
                f"which {self.name} does not provide (it provides {provided}); {self.missing}"
            )
        return estimator

    def estimator(self, name: str, **params: Any) -> Any:
        """The registered estimator `name` with `params`, checked against what this consumer provides."""
        from canonrl.registry import get_estimator

        return self.check(get_estimator(name, **params))
