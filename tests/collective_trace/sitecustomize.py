"""Record every torch.distributed collective a process issues, one line each, when MOGAO_COLLECTIVE_TRACE names
a directory: `<dir>/rank<RANK>.log` gets the collective's name and the innermost project frames that called it.

The multi-process tests put this directory on PYTHONPATH (Python imports `sitecustomize` at start-up) and then
compare the ranks' sequences: ranks that issue different collectives deadlock, or on gloo may silently pair a
broadcast with an all-reduce of the same size; the sequences show where they part.
"""

import os

_DIR = os.environ.get("MOGAO_COLLECTIVE_TRACE")
_NAMES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "barrier",
          "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list", "reduce", "gather",
          "scatter", "all_to_all_single", "monitored_barrier")


def _install(directory: str) -> None:
    import traceback

    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    out = open(os.path.join(directory, f"rank{os.environ.get('RANK', '0')}.log"), "a", buffering=1)  # noqa: SIM115
    keep = (f"{os.sep}mogao{os.sep}", f"{os.sep}callbacks{os.sep}", f"{os.sep}lightning{os.sep}")

    def wrap(name: str):
        orig = getattr(c10d, name)

        def traced(*args, **kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if any(k in f.filename for k in keep)][-3:]
            where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in reversed(frames))
            out.write(f"{name}\t{where}\n")
            return orig(*args, **kwargs)

        return traced

    for name in _NAMES:
        if hasattr(c10d, name):
            fn = wrap(name)
            setattr(c10d, name, fn)
            setattr(dist, name, fn)


if _DIR:
    _install(_DIR)
