"""Per-command metrics for the replies the pipeline answered, counted by the driver once they
were written to the client (so that counting stays off the reply's path)."""

from __future__ import annotations

from collections.abc import Callable

from .entries import Run, Slot
from .metrics import VERB_LABELS, verb_label

CommandDone = Callable[[str, str, float, float], None]  # (verb, result, seconds, seconds added)


def count(done: list[Slot | Run], now: float, command_done: CommandDone) -> None:
    """Count each command that `done` answered; `now` is when they were moved to the client."""
    for entry in done:
        if type(entry) is Run:
            if entry.owed == 1:  # the common run: one command
                elapsed = now - entry.received
                verb = VERB_LABELS.get(entry.verbs[0], "other")
                result = "ok" if entry.errors is None else "error"
                command_done(verb, result, elapsed, elapsed - entry.upstream_time)
            else:
                _count_run(entry, now, command_done)
        else:
            elapsed = now - entry.received
            command_done(entry.verb or "other", entry.result, elapsed, elapsed - entry.upstream_time)


def _count_run(run: Run, now: float, command_done: CommandDone) -> None:
    elapsed = now - run.received
    added = elapsed - run.upstream_time
    errors = run.errors
    verbs = run.verbs if run.owed == len(run.verbs) else run.verbs[: run.owed]
    for index, verb in enumerate(verbs):
        result = "error" if errors is not None and index in errors else "ok"
        command_done(verb_label(verb), result, elapsed, added)
