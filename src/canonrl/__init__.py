"""canonrl: vectorized, tested advantage estimators for RL from verifiable rewards.

    import canonrl
    adv = canonrl.advantages("canon", rewards=r, group=uids, mask=response_mask,
                             entropy=token_entropy, mu=1.0, split_by="entropy")   # -> [B, T]
"""

import canonrl.methods  # noqa: F401  (registers the built-in estimators: the registry itself never imports them)
from canonrl.batch import RolloutBatch, make_batch
from canonrl.branches import tree_from_branches
from canonrl.methods.ktae import KeyTokens, key_token_scores
from canonrl.registry import (
    Estimator,
    EstimatorInfo,
    Paper,
    SequenceEstimator,
    advantages,
    estimators,
    get_estimator,
    register,
)
from canonrl.training.selection import dynamic_sampling_keep
from canonrl.training.shaping import overlong_penalty

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it (tool.setuptools.dynamic)

__all__ = [
    "Estimator",
    "EstimatorInfo",
    "KeyTokens",
    "Paper",
    "RolloutBatch",
    "SequenceEstimator",
    "advantages",
    "dynamic_sampling_keep",
    "estimators",
    "get_estimator",
    "key_token_scores",
    "make_batch",
    "overlong_penalty",
    "register",
    "tree_from_branches",
]
