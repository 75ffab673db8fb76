"""Lightning callbacks of mogao recipes (referenced from YAML as `callbacks.<Name>`); imported lazily."""

from importlib import import_module

_LAZY = {
    "EMA": "ema", "MetricsHistory": "history", "SampleLogger": "samples", "CurriculumSchedule": "schedule",
    "Milestone": "schedule", "Throughput": "throughput", "PreemptionCheckpoint": "preemption",
    "CrashCheckpoint": "preemption",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"callbacks.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'callbacks' has no attribute {name!r}")
