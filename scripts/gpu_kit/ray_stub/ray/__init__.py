"""Import-only stand-in for Ray, used by the GPU evidence kit (scripts/gpu_evidence.sh) and nowhere else.

The GPU machine has no Ray and Ray's wheel (~70 MB) cannot travel (64 MiB per command). verl imports Ray at
module level in ``verl/protocol.py`` (reached by every ``import verl``) and
``verl/single_controller/base/worker.py``, but the path the kit measures (``FSDPEngineWithLMHead.forward_step``,
verl's and erc_verl's losses, backward) never calls it. This module lets those ``import ray`` lines succeed and
makes every *use* fail loudly: any attribute other than a module dunder (and the ``ObjectRef`` type, see below)
raises ``RuntimeError`` and is recorded in ``ACCESSED`` and in the file named by ``$ERC_KIT_RAY_STUB_LOG`` (the kit
writes that list to its JSON and fails if it is not empty, so a caller that swallows the exception is still
caught). ``from ray.x import y`` fails with ModuleNotFoundError: there are no submodules.

It is put on PYTHONPATH by the kit only; it is not part of the erc_verl wheel.
"""

import os

IS_KIT_STUB = True
ACCESSED: list[str] = []
LOG_ENV = "ERC_KIT_RAY_STUB_LOG"  # the kit points this at a file: uses in any of its processes are seen


def _record(name: str) -> None:
    ACCESSED.append(name)
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(name + "\n")


class RayStubUsed(RuntimeError):
    pass


class ObjectRef:
    """Type placeholder: verl's ``DataProtoFuture`` dataclass annotates ``futures: list[ray.ObjectRef]``, which Python
    evaluates when the class is defined (an annotation, not a use). Creating one is a use, and fails."""

    def __init__(self, *args, **kwargs):
        _record("ObjectRef()")
        raise RayStubUsed("ray.ObjectRef() was created, but the GPU evidence kit carries no Ray")


def __getattr__(name: str):
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)  # module protocol lookups (__path__, __all__, ...): plain "not there"
    _record(name)
    raise RayStubUsed(
        f"ray.{name} was used, but the GPU evidence kit carries no Ray (scripts/gpu_kit/ray_stub): the measured "
        "path is not supposed to call Ray. Find the caller in the traceback."
    )
