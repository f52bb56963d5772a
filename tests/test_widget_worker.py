"""The widgets' worker machinery without Qt: guarded generators, plain functions, messages, lifeline."""

from __future__ import annotations

from napari_langmamba.errors import ConfigError
from napari_langmamba.events import Progress
from napari_langmamba.widgets._worker import (
    WorkerState,
    _call,
    _Failure,
    _Lifeline,
    _run_guarded,
    error_message,
)


def _drain(generator):
    """Every event the generator yields, and what it returns."""
    events = []
    while True:
        try:
            events.append(next(generator))
        except StopIteration as stop:
            return events, stop.value


def test_a_guarded_generator_passes_its_events_and_result_and_catches_its_error():
    def work(fail: bool):
        yield Progress(1, 2, "half")
        if fail:
            raise RuntimeError("the disk went away")
        yield Progress(2, 2, "done")
        return "result"

    events, value = _drain(_run_guarded(work(False)))
    assert [e.done for e in events] == [1, 2] and value == "result"
    events, value = _drain(_run_guarded(work(True)))
    assert [e.done for e in events] == [1]
    assert isinstance(value, _Failure) and str(value.error) == "the disk went away"


def test_a_plain_function_runs_as_a_generator_without_events():
    calls = []
    generator = _call(lambda: calls.append(1) or 42)
    assert calls == []  # nothing runs until the worker iterates it
    assert _drain(generator) == ([], 42) and calls == [1]


def test_error_messages_keep_ours_and_flag_the_rest_as_bugs():
    assert error_message(ConfigError("Choose a layer first.")) == "Choose a layer first."
    message = error_message(KeyError("x"))
    assert message.startswith("Unexpected error (KeyError: 'x').") and "bug in napari-langmamba" in message


def test_the_lifeline_quits_the_worker_when_the_widget_goes():
    quits = []
    lifeline = _Lifeline()
    assert lifeline.alive
    lifeline.on_widget_destroyed()  # no worker: nothing to stop
    lifeline = _Lifeline()
    lifeline.worker = type("Worker", (), {"quit": lambda self: quits.append(1)})()
    lifeline.on_widget_destroyed("destroyed signal argument")
    assert not lifeline.alive and quits == [1]
    assert WorkerState("cancelled") is WorkerState.CANCELLED
