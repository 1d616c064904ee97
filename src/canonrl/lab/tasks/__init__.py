"""The task registry: ``get_task("lab")``, ``get_task("rg:chain_sum")``, ``get_task("boxed[:gsm_symbolic]")``,
``get_task("jsonl:data/problems.jsonl")``.

A task is one module of this package with a class (or any callable returning a `~canonrl.lab.tasks.base.Task`)
registered under the name pattern it answers to::

    @register_task("lab")                   # get_task("lab", **options)         -> LabTask(**options)
    @register_task("rg:<dataset>")          # get_task("rg:chain_sum", **options) -> ReasoningGymTask("chain_sum", ...)
    @register_task("boxed[:<dataset>]")     # get_task("boxed") -> BoxedMathTask(); "boxed:x" -> BoxedMathTask("x")

A pattern is a prefix, optionally followed by ``:<argument>`` (required) or ``[:<argument>]`` (optional): the
text after ``<prefix>:`` is passed as the factory's first positional argument, the options as keyword arguments.

Adding a task is adding one module to this package: every module of it (`lab`, `reasoning_gym`, `boxed`, `jsonl`,
and any new one; not those named ``_*``) is imported on the first lookup, which runs its decorators. A task
defined outside the package is registered when its module is imported. Importing this package imports no task
module, nor reasoning-gym or math-verify: task modules import those only when a task is built or verifies, and
must keep their own module-level imports light.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from canonrl.lab.tasks.base import Task

__all__ = ["register_task", "get_task", "task_names"]

#: the modules whose tasks `task_names` lists first, in this order; the package's other modules follow by name
FIRST_MODULES: tuple[str, ...] = ("lab", "reasoning_gym", "boxed", "jsonl", "grid", "calc")

_PATTERN = re.compile(r"^(?P<prefix>[A-Za-z][\w.-]*)(?::<(?P<required>\w+)>|\[:<(?P<optional>\w+)>\])?$")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class TaskSpec:
    """One registered task family: its name pattern and the callable that builds it."""

    pattern: str
    prefix: str
    #: the name of the argument after ``<prefix>:`` (None: the task takes none)
    argument: str | None
    #: whether the argument may be left out (``prefix[:<argument>]``)
    optional: bool
    factory: Callable[..., Task]
    #: a few words for the unknown-task error and help texts, e.g. "default gsm_symbolic"
    hint: str

    @property
    def module(self) -> str:
        return getattr(self.factory, "__module__", "")

    def describe(self) -> str:
        return f"{self.pattern!r}" + (f" ({self.hint})" if self.hint else "")


_REGISTRY: dict[str, TaskSpec] = {}
_builtins_loaded = False


def register_task(pattern: str, *, hint: str = "") -> Callable[[F], F]:
    """Class (or function) decorator adding a task family to the registry under `pattern`.

    `pattern` is ``"name"``, ``"name:<argument>"`` or ``"name[:<argument>]"`` (see the module docstring). A
    second registration of the same name by another factory raises ``ValueError``; the same class registered
    again (its module reloaded) replaces the first.
    """
    match = _PATTERN.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"pattern: expected 'name', 'name:<argument>' or 'name[:<argument>]', got {pattern!r}")
    prefix = match["prefix"]
    argument = match["required"] or match["optional"]

    def decorate(factory: F) -> F:
        if not callable(factory):
            raise TypeError(f"register_task({pattern!r}) decorates a class or function, got {factory!r}")
        spec = TaskSpec(pattern, prefix, argument, match["optional"] is not None, factory, hint)
        old = _REGISTRY.get(prefix)
        if old is not None and _qualified(old.factory) != _qualified(factory):
            raise ValueError(f"a task named {prefix!r} is already registered ({_qualified(old.factory)})")
        _REGISTRY[prefix] = spec
        return factory

    return decorate


def _qualified(factory: Callable[..., Any]) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


def _package_modules() -> list[str]:
    """This package's modules (not ``_*``), `FIRST_MODULES` first, then by name."""
    first = {name: index for index, name in enumerate(FIRST_MODULES)}
    names = [info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
    names.sort(key=lambda name: (first.get(name, len(first)), name))
    return [f"{__name__}.{name}" for name in names]


def _load_builtins() -> None:
    """Import every module of this package once (their decorators register the built-in tasks)."""
    global _builtins_loaded
    if not _builtins_loaded:
        for module in _package_modules():
            importlib.import_module(module)
        _builtins_loaded = True


def _specs() -> list[TaskSpec]:
    """Registered families: this package's in module order, then the others as registered."""
    _load_builtins()
    order = {module: index for index, module in enumerate(_package_modules())}
    return sorted(_REGISTRY.values(), key=lambda spec: order.get(spec.module, len(order)))  # stable sort


def task_names() -> list[str]:
    """The registered task name patterns, for help text: ``["lab", "rg:<dataset>", "boxed[:<dataset>]", ...]``."""
    return [spec.pattern for spec in _specs()]


def _choices() -> str:
    described = [spec.describe() for spec in _specs()]
    return described[0] if len(described) == 1 else f"{', '.join(described[:-1])} or {described[-1]}"


def _resolve(name: str) -> tuple[TaskSpec, str | None]:
    """The family `name` belongs to and the argument after its ``<prefix>:`` (None when there is none)."""
    _load_builtins()
    prefix, colon, argument = name.partition(":")
    spec = _REGISTRY.get(prefix)
    if spec is None or (colon and spec.argument is None):
        raise ValueError(f"name: unknown task {name!r}; choose {_choices()}")
    if (colon and not argument.strip()) or (not colon and spec.argument is not None and not spec.optional):
        raise ValueError(f"name: task {name!r} needs its <{spec.argument}>: {spec.describe()}")
    return spec, (argument if colon else None)


def get_task(name: str, **options: Any) -> Task:
    """Build the task called `name`; `options` go to its constructor (after the argument in the name, if any).

    - ``lab``: `canonrl.lab.tasks.lab.LabTask` (chained one-digit additions, verified inline);
    - ``rg:<dataset>``: `canonrl.lab.tasks.reasoning_gym.ReasoningGymTask` on that reasoning-gym dataset;
    - ``boxed`` or ``boxed:<dataset>``: `canonrl.lab.tasks.boxed.BoxedMathTask` (default dataset gsm_symbolic);
    - ``jsonl:<path>``: `canonrl.lab.tasks.jsonl.JsonlTask`, a dataset of one JSON object per line;
    - any other family registered with `register_task`.
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a task name string, got {type(name).__name__}")
    spec, argument = _resolve(name)
    return spec.factory(**options) if argument is None else spec.factory(argument, **options)
