"""The built-in estimators; importing this package registers them (one module per estimator)."""

from canonrl.methods.canon import CANON
from canonrl.methods.dapo import DAPO
from canonrl.methods.dr_grpo import DrGRPO
from canonrl.methods.grpo import GRPO
from canonrl.methods.ktae import KTAE
from canonrl.methods.reinforce_pp import ReinforcePlusPlus
from canonrl.methods.reinforce_pp_baseline import ReinforcePlusPlusBaseline
from canonrl.methods.rloo import RLOO

__all__ = ["CANON", "DAPO", "DrGRPO", "GRPO", "KTAE", "RLOO", "ReinforcePlusPlus", "ReinforcePlusPlusBaseline"]
