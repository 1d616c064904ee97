"""Bounded verification: score many responses without letting a verifier crash, hang or poison the caller.

    from canonrl.lab.verification import verify_all
    result = verify_all(task, responses, problems, timeout=2.0)
    result.scores, result.components["correct"], result.failures, result.timeouts

Rules, per sample:

- a verifier that raises scores 0 (counted in `failures`); so does a worker process that dies mid-sample
  (a segfault, `os._exit`, the OOM killer);
- a verifier that runs past `timeout` seconds scores 0 (counted in `timeouts`); its worker process is killed and
  replaced, so the caller never waits much longer than `timeout` per sample, whatever the response contains;
- a non-finite score (NaN, ±inf) or a verdict that is not a `Reward` or a number is a failure (0, counted); a
  finite score outside [0, 1] is clamped (counted in `clamped`: a verifier bug worth seeing, but the sign of
  its verdict is still information). Components get the same treatment; a declared component that a verdict
  leaves out is 0, and undeclared ones are dropped.

Two paths:

- **inline** for tasks that declare ``cheap = True`` (an attribute; absent means False): the verifier runs in
  the calling thread, with try/except but *no* timeout. A cheap task promises a verifier that cannot hang (a
  regex and an integer compare); the pool's per-sample round trip would cost more than the verification.
- **worker processes** for every other task: a small persistent pool (`Verifier`), one sample in flight per
  worker, a deadline per sample. Processes rather than threads because a thread cannot be killed, and because
  verifiers such as math-verify implement their own timeouts with `signal.alarm`, which works only in a
  process's main thread — a worker's main thread. Workers are started with ``forkserver`` where available
  (``spawn`` elsewhere): never plain ``fork`` of a process that holds torch's threads. The fork server preloads
  this module and the modules the first task names in ``worker_preload``, so a worker that replaces a killed
  one starts in milliseconds instead of re-importing torch, reasoning-gym and sympy.

As with any spawn/forkserver multiprocessing, a script that verifies a non-cheap task must guard its entry
point with ``if __name__ == "__main__":`` (workers import the main module). The task is pickled once per call
and loaded once per worker (by content hash), so it must be importable by module path and cheap to pickle
(drop caches in ``__getstate__``). A task may define ``warm_up()``: a worker calls it right after loading the
task, under `setup_timeout` rather than the per-sample timeout, so that imports and caches (reasoning-gym,
sympy) are not billed to the first sample.

Responses are not truncated here: what matters is task-specific (the last ``\\boxed{}``, the last ``<answer>``
tag), so tasks bound their own inputs (see `canonrl.lab.tasks.answers`).

Worst case for one call: about ``ceil(n / workers) * timeout`` seconds plus worker start-up; pass
`total_timeout` to cap the whole call (samples not finished by then count as timeouts).
"""

from __future__ import annotations

import atexit
import hashlib
import math
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as _wait_connections
from typing import Any

from canonrl.lab.tasks.base import Problem, Reward

__all__ = ["VerifyResult", "Verifier", "verify_all", "shutdown", "is_cheap"]

#: how long a fresh worker may take to import and unpickle a task before the call gives up on the pool
DEFAULT_SETUP_TIMEOUT = 120.0


@dataclass
class VerifyResult:
    """Verdicts for a batch: one score per response, one list per declared component (same length)."""

    scores: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)
    #: samples whose verifier raised, returned something that is not a finite score, or whose worker died
    failures: int = 0
    #: samples whose verifier ran past the per-sample timeout (or the call's total_timeout)
    timeouts: int = 0
    #: samples with a finite score or component outside [0, 1], clamped into it
    clamped: int = 0

    def __len__(self) -> int:
        return len(self.scores)


def is_cheap(task: Any) -> bool:
    """Whether `task` asks to be verified inline (``cheap = True``); absent means False."""
    return bool(getattr(task, "cheap", False))


# ----------------------------------------------------------------------------------------------------------
# One sample: run the verifier, coerce its verdict to plain floats. Used inline and inside workers, so both
# paths apply exactly the same rules.

_OK, _CLAMPED, _FAILED = "ok", "clamped", "failed"


def _clamp(value: Any) -> tuple[float, bool, bool]:
    """(value in [0, 1], whether it was clamped, whether it was invalid)."""
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0, False, True
    if not math.isfinite(x):
        return 0.0, False, True
    if x < 0.0:
        return 0.0, True, False
    if x > 1.0:
        return 1.0, True, False
    return x, False, False


def _verify_one(task: Any, names: tuple[str, ...], response: str, problem: Problem) -> tuple[str, float, list[float]]:
    zeros = [0.0] * len(names)
    try:
        verdict = task.verify(response, problem)
        if isinstance(verdict, Reward) or hasattr(verdict, "score"):
            raw_score, raw_components = verdict.score, dict(getattr(verdict, "components", {}) or {})
        elif isinstance(verdict, (int, float)):  # bool included
            raw_score, raw_components = verdict, {}
        else:
            return _FAILED, 0.0, zeros
        score, clamped, invalid = _clamp(raw_score)
        if invalid:
            return _FAILED, 0.0, zeros
        components = []
        for name in names:
            value, c, _ = _clamp(raw_components.get(name, 0.0))
            clamped |= c
            components.append(value)  # an invalid component is 0 (the score is still trustworthy)
        return (_CLAMPED if clamped else _OK), score, components
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001 - math-verify's TimeoutException is a BaseException, for one
        return _FAILED, 0.0, zeros


def _verify_inline(
    task: Any, names: tuple[str, ...], responses: Sequence[str], problems: Sequence[Problem]
) -> VerifyResult:
    result = _empty_result(len(responses), names)
    for i, (response, problem) in enumerate(zip(responses, problems)):
        _record(result, names, i, *_verify_one(task, names, response, problem))
    return result


def _empty_result(n: int, names: tuple[str, ...]) -> VerifyResult:
    return VerifyResult(scores=[0.0] * n, components={name: [0.0] * n for name in names})


def _record(
    result: VerifyResult, names: tuple[str, ...], i: int, status: str, score: float, components: list[float]
) -> None:
    if status == _FAILED:
        result.failures += 1
    elif status == _CLAMPED:
        result.clamped += 1
    result.scores[i] = score
    for name, value in zip(names, components):
        result.components[name][i] = value


# ----------------------------------------------------------------------------------------------------------
# Worker processes


def _worker_main(conn) -> None:
    """A worker's loop: ("task", key, blob) loads a task, ("job", i, response, problem) scores one sample."""
    # Ctrl-C goes to the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    task: Any = None
    names: tuple[str, ...] = ()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent went away
            return
        kind = message[0]
        if kind == "job":
            _, index, response, problem = message
            reply = ("done", index, *_verify_one(task, names, response, problem))
        elif kind == "task":
            _, key, blob = message
            try:
                task = pickle.loads(blob)
                names = tuple(task.components)
                warm_up = getattr(task, "warm_up", None)
                if callable(warm_up):
                    warm_up()
                reply = ("ready", key)
            except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises
                reply = ("setup_failed", key, f"{type(error).__name__}: {error}")
        else:  # "stop"
            return
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


_forkserver_lock = threading.Lock()
_forkserver_preload_set = False


def _context(start_method: str | None, preload: Sequence[str]):
    method = start_method or ("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    ctx = mp.get_context(method)
    if method == "forkserver":
        global _forkserver_preload_set
        with _forkserver_lock:
            # The fork server is one per process and reads its preload list once, when it starts.
            if not _forkserver_preload_set:
                ctx.set_forkserver_preload(list(dict.fromkeys([__name__, *preload])))
                _forkserver_preload_set = True
    return ctx


class _Worker:
    __slots__ = ("process", "conn", "task_key", "job", "deadline", "loading")

    def __init__(self, ctx) -> None:
        parent_end, child_end = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_end,), daemon=True, name="canonrl-verifier")
        self.process.start()
        child_end.close()  # so that the parent sees EOF when the worker dies
        self.conn = parent_end
        self.task_key: str | None = None
        self.job: int | None = None
        self.deadline = math.inf
        self.loading = False

    @property
    def idle(self) -> bool:
        return self.job is None and not self.loading

    def stop(self, kill: bool = False) -> None:
        if not kill:
            try:
                self.conn.send(("stop",))
            except (EOFError, OSError, ValueError):
                kill = True
        if not kill:
            self.process.join(timeout=1.0)
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5.0)  # reaps it: no zombie left behind
        try:
            self.conn.close()
        except OSError:
            pass
        try:
            self.process.close()
        except ValueError:  # still running after SIGKILL + 5 s: leave it to the OS
            pass


class Verifier:
    """A small persistent pool of verification worker processes (see the module docstring).

    Use as a context manager or call `close()`; `verify_all` on a cheap task never starts a worker. Calls are
    serialised (one batch at a time per Verifier).
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        start_method: str | None = None,
        setup_timeout: float = DEFAULT_SETUP_TIMEOUT,
    ) -> None:
        if workers is None:
            workers = max(1, min(8, os.cpu_count() or 1))
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if start_method is not None and start_method not in mp.get_all_start_methods():
            raise ValueError(f"start_method must be one of {mp.get_all_start_methods()}, got {start_method!r}")
        if not setup_timeout > 0:
            raise ValueError(f"setup_timeout must be > 0, got {setup_timeout}")
        self.workers = workers
        self.start_method = start_method
        self.setup_timeout = setup_timeout
        self._slots: list[_Worker | None] = [None] * workers
        self._lock = threading.Lock()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop and reap every worker. Idempotent; the Verifier can be used again afterwards (workers restart)."""
        with self._lock:
            for i, worker in enumerate(self._slots):
                if worker is not None:
                    worker.stop()
                    self._slots[i] = None

    def processes(self) -> list[Any]:
        """The live worker processes (for monitoring and tests)."""
        return [w.process for w in self._slots if w is not None]

    def verify_all(
        self,
        task: Any,
        responses: Sequence[str],
        problems: Sequence[Problem],
        timeout: float = 2.0,
        total_timeout: float | None = None,
    ) -> VerifyResult:
        """Score `responses[i]` against `problems[i]` with `task.verify`, bounded (see the module docstring)."""
        names = _check_call(task, responses, problems, timeout, total_timeout)
        if is_cheap(task):
            return _verify_inline(task, names, responses, problems)
        with self._lock:
            return self._verify_pool(task, names, responses, problems, timeout, total_timeout)

    # The event loop: hand one sample to each idle worker, wait for replies or the nearest deadline, kill
    # workers past their deadline, repeat.
    def _verify_pool(self, task, names, responses, problems, timeout, total_timeout) -> VerifyResult:
        n = len(responses)
        result = _empty_result(n, names)
        if n == 0:
            return result
        try:
            blob = pickle.dumps(task)
        except Exception as error:
            raise ValueError(
                f"task: {getattr(task, 'name', task)!r} cannot be pickled for verification workers ({error}); "
                "make it picklable or mark it cheap = True"
            ) from None
        key = hashlib.sha1(blob).hexdigest()
        ctx = _context(self.start_method, tuple(getattr(task, "worker_preload", ())))
        pending = deque(range(n))
        end = time.monotonic() + total_timeout if total_timeout is not None else math.inf
        active = min(self.workers, n)
        setup_deaths = 0

        try:
            while True:
                now = time.monotonic()
                if now >= end:
                    self._expire_all(result, pending)
                    break
                for slot in range(active):
                    worker = self._slots[slot]
                    if worker is not None and worker.idle and pending:
                        self._dispatch(worker, key, blob, pending, responses, problems, timeout, result)
                    elif worker is None and pending:
                        worker = self._slots[slot] = _Worker(ctx)
                        self._dispatch(worker, key, blob, pending, responses, problems, timeout, result)
                busy = [w for w in self._slots if w is not None and not w.idle]
                if not busy:
                    break
                nearest = min(min(w.deadline for w in busy), end)
                ready = _wait_connections([w.conn for w in busy], timeout=max(0.0, nearest - time.monotonic()))
                for worker in busy:
                    if worker.conn in ready and self._receive(worker, result, names) == "died loading":
                        setup_deaths += 1
                        if setup_deaths > 2 * self.workers:  # it will not load: do not respawn forever
                            raise RuntimeError(
                                f"verification workers keep dying while loading task {getattr(task, 'name', task)!r} "
                                "(is the calling script's entry point guarded by if __name__ == '__main__'?)"
                            )
                now = time.monotonic()
                for slot, worker in enumerate(self._slots):
                    if worker is not None and not worker.idle and now >= worker.deadline:
                        if worker.loading:
                            self._drop(slot, kill=True)
                            raise RuntimeError(
                                f"verification worker did not load task {getattr(task, 'name', task)!r} "
                                f"within setup_timeout={self.setup_timeout}s"
                            )
                        result.timeouts += 1
                        self._drop(slot, kill=True)
        except BaseException:
            # An interrupted or failed call leaves workers in an unknown state: start afresh next time.
            self._kill_all()
            raise
        return result

    def _dispatch(self, worker, key, blob, pending, responses, problems, timeout, result) -> None:
        if worker.task_key != key:
            # A worker that dies before reading the task shows up as EOF in the event loop ("died loading").
            try:
                worker.conn.send(("task", key, blob))
            except OSError:
                pass
            worker.task_key = key
            worker.loading = True
            worker.deadline = time.monotonic() + self.setup_timeout
            return
        while pending:
            index = pending.popleft()
            try:
                worker.conn.send(("job", index, responses[index], problems[index]))
            except (pickle.PicklingError, TypeError, AttributeError):
                # This sample cannot reach a worker (an unpicklable problem): a failure; the worker is untouched
                # (the message is pickled before anything is written).
                result.failures += 1
                continue
            worker.job = index
            worker.deadline = time.monotonic() + timeout
            return

    def _receive(self, worker, result, names) -> str:
        slot = self._slots.index(worker)
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):  # the worker died
            self._drop(slot, kill=True)
            if worker.job is not None:
                result.failures += 1
                return "died"
            return "died loading"
        kind = message[0]
        if kind == "done" and message[1] == worker.job:
            _, index, status, score, components = message
            _record(result, names, index, status, score, components)
            worker.job = None
            worker.deadline = math.inf
        elif kind == "ready":
            worker.loading = False
            worker.deadline = math.inf
        elif kind == "setup_failed":
            self._drop(slot, kill=True)
            raise RuntimeError(
                f"verification worker could not load the task ({message[2]}); define it in an importable module "
                "or mark it cheap = True"
            )
        return kind

    def _expire_all(self, result, pending) -> None:
        for slot, worker in enumerate(self._slots):
            if worker is not None and worker.job is not None:
                result.timeouts += 1
                self._drop(slot, kill=True)
        result.timeouts += len(pending)
        pending.clear()

    def _drop(self, slot: int, kill: bool) -> None:
        worker = self._slots[slot]
        if worker is not None:
            worker.stop(kill=kill)
            self._slots[slot] = None

    def _kill_all(self) -> None:
        for slot in range(len(self._slots)):
            self._drop(slot, kill=True)


def _check_call(task, responses, problems, timeout, total_timeout) -> tuple[str, ...]:
    if len(responses) != len(problems):
        raise ValueError(f"responses and problems must have the same length, got {len(responses)} and {len(problems)}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if total_timeout is not None and not total_timeout > 0:
        raise ValueError(f"total_timeout must be > 0 seconds or None, got {total_timeout}")
    return tuple(getattr(task, "components", ()))


# ----------------------------------------------------------------------------------------------------------
# Module-level convenience: one shared Verifier, closed at interpreter exit.

_default: Verifier | None = None
_default_lock = threading.Lock()


def _default_verifier() -> Verifier:
    global _default
    with _default_lock:
        if _default is None:
            _default = Verifier()
        return _default


def verify_all(
    task: Any,
    responses: Sequence[str],
    problems: Sequence[Problem],
    timeout: float = 2.0,
    total_timeout: float | None = None,
) -> VerifyResult:
    """Score each response against its problem, bounded: see the module docstring for the rules.

    Cheap tasks run inline; others on a shared worker pool, started on first use and stopped by `shutdown()`
    (registered at interpreter exit).
    """
    if is_cheap(task):  # no pool, no lock: the hot path for the lab task
        return _verify_inline(task, _check_call(task, responses, problems, timeout, total_timeout), responses, problems)
    return _default_verifier().verify_all(task, responses, problems, timeout=timeout, total_timeout=total_timeout)


def shutdown() -> None:
    """Stop the shared pool's workers (safe to call repeatedly; a later `verify_all` starts new ones)."""
    global _default
    with _default_lock:
        verifier, _default = _default, None
    if verifier is not None:
        verifier.close()


def _at_exit() -> None:
    shutdown()
    if _forkserver_preload_set:
        # Stop the fork server we configured, and the resource tracker it started, and wait for both, so they
        # are reaped here rather than left as orphans to whatever reaps them (in a container PID 1 may not, and
        # they linger as zombies). `_stop` is private in both modules but present since Python 3.8.
        from multiprocessing import forkserver, resource_tracker

        for server in (forkserver._forkserver, resource_tracker._resource_tracker):
            try:
                stop = getattr(server, "_stop", None)
                if stop is not None:
                    stop()
            except Exception:  # noqa: BLE001 - best effort at interpreter exit
                pass


atexit.register(_at_exit)
