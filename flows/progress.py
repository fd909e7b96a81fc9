"""A progress hook the CLI sets and the flow calls; a no-op when nobody listens."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

#: ``hook(stage, done, total)``; stage is "index" or "process".
ProgressHook = Callable[[str, int, int], None]

progress_hook: ContextVar[ProgressHook | None] = ContextVar("cohort_progress_hook", default=None)


def report(stage: str, done: int, total: int) -> None:
    hook = progress_hook.get()
    if hook is not None:
        hook(stage, done, total)
