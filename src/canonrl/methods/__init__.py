"""The built-in estimators, one module per estimator; importing this package registers every one of them.

Modules are discovered rather than listed, so adding an estimator means adding its module (``_``-prefixed modules
are shared helpers, not estimators).
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

from canonrl.methods.attnrl import AttnRL  # noqa: E402
from canonrl.methods.canon import CANON  # noqa: E402
from canonrl.methods.dapo import DAPO  # noqa: E402
from canonrl.methods.dr_grpo import DrGRPO  # noqa: E402
from canonrl.methods.grpo import GRPO  # noqa: E402
from canonrl.methods.ktae import KTAE  # noqa: E402
from canonrl.methods.qrm import QRM  # noqa: E402
from canonrl.methods.reinforce_pp import ReinforcePlusPlus  # noqa: E402
from canonrl.methods.reinforce_pp_baseline import ReinforcePlusPlusBaseline  # noqa: E402
from canonrl.methods.rloo import RLOO  # noqa: E402

__all__ = [
    "AttnRL", "CANON", "DAPO", "DrGRPO", "GRPO", "KTAE", "QRM", "RLOO", "ReinforcePlusPlus",
    "ReinforcePlusPlusBaseline",
]
