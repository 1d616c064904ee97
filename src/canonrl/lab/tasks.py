"""The task registry: ``get_task("lab")``, ``get_task("rg:chain_sum")``, ``get_task("boxed[:gsm_symbolic]")``.

Importing this module imports neither reasoning-gym nor math-verify (nor the lab task): each family is imported
when a task of it is built.
"""

from __future__ import annotations

from typing import Any

from canonrl.lab.task import Task

__all__ = ["get_task", "task_names"]

_RG_EXAMPLES = ("rg:chain_sum", "rg:basic_arithmetic", "rg:gsm_symbolic", "rg:prime_factorization")


def task_names() -> list[str]:
    """The task name patterns, for help text."""
    return ["lab", "rg:<dataset>", "boxed[:<dataset>]"]


def get_task(name: str, **options: Any) -> Task:
    """Build the task called `name`; `options` go to its constructor.

    - ``lab``: `canonrl.lab.lab_task.LabTask` (chained one-digit additions, verified inline);
    - ``rg:<dataset>``: `canonrl.lab.gym_tasks.ReasoningGymTask` on that reasoning-gym dataset;
    - ``boxed`` or ``boxed:<dataset>``: `canonrl.lab.gym_tasks.BoxedMathTask` (default dataset gsm_symbolic).
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a task name string, got {type(name).__name__}")
    if name == "lab":
        from canonrl.lab.lab_task import LabTask

        return LabTask(**options)
    if name.startswith("rg:"):
        from canonrl.lab.gym_tasks import ReasoningGymTask

        return ReasoningGymTask(name[len("rg:") :], **options)
    if name == "boxed" or name.startswith("boxed:"):
        from canonrl.lab.gym_tasks import BoxedMathTask

        source = name[len("boxed:") :] if name.startswith("boxed:") else "gsm_symbolic"
        return BoxedMathTask(source, **options)
    raise ValueError(
        f"name: unknown task {name!r}; choose 'lab', 'rg:<dataset>' (e.g. {', '.join(_RG_EXAMPLES)}) "
        "or 'boxed[:<dataset>]' (default gsm_symbolic)"
    )
