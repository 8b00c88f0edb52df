"""Fine-tuning micro-steps share the engine thread under a serving-first policy.

Jobs never touch the model from their own threads: each micro-step is queued here and runs
on the engine thread between serving steps. While requests wait or run, a micro-step that
took ``d`` seconds is followed by at least ``d * (1 - share) / share`` seconds of serving
before the next, so training gets at most ``share`` of the engine's time and a request waits
for at most one micro-step; with no requests, micro-steps run back to back.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.types import EngineStoppedError


@dataclass(eq=False)
class TrainingTask:
    work: Callable[[], object]
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


class TrainingGate:
    def __init__(self, share: float):
        self.share = share
        self._tasks: deque[TrainingTask] = deque()
        self._due_at = 0.0

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def add(self, task: TrainingTask) -> None:
        self._tasks.append(task)

    def take_due(self, serving: bool) -> TrainingTask | None:
        """The next task if one may run now (the caller holds the engine's lock)."""
        if not self._tasks or (serving and time.monotonic() < self._due_at):
            return None
        return self._tasks.popleft()

    def run(self, task: TrainingTask) -> None:
        started = time.monotonic()
        try:
            task.result = task.work()
        except BaseException as error:
            task.error = error
        finally:
            ended = time.monotonic()
            self._due_at = ended + (ended - started) * (1 - self.share) / self.share
            task.done.set()

    def fail_all(self) -> None:
        tasks, self._tasks = list(self._tasks), deque()
        for task in tasks:
            task.error = EngineStoppedError("the engine stopped before this training step ran")
            task.done.set()
