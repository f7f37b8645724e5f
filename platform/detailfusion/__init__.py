"""DetailFusion: composed image retrieval (reference image + modification text -> target image) on Ray.

Two layers, two packages: ``detailfusion.library`` (the model, losses, index, data formats, metrics: no Ray) and
``detailfusion.platform`` (the library run on Ray Data / Train / Tune / Serve). The 0.1 module paths (say
``detailfusion.model``) still import, with a DeprecationWarning naming the new path, until 0.3.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

__version__ = "0.2.0"

_PLATFORM_DATA = ("prepare", "training_input", "feature_cache", "benchmark")
_PLATFORM_EVAL = ("encode", "evaluate", "validate", "index_build")
_PLATFORM = ("cli", "ray_setup", "local_cluster", "tracking", "tune_tracking", "tune", "pipeline", "ablate",
             "data_efficiency", "report", "train", "serving", "configs")
_INDEX = {"index": "exact", "compressed_index": "compressed", "index_store": "store", "sharded_index": "sharded"}
_SPLIT = ("data", "eval")  # 0.1 packages whose modules went to both layers


def _moved(old: str) -> str | None:
    """The 0.2 name of a 0.1 module name below ``detailfusion.`` ("model.backbone" -> "library.model.backbone")."""
    head, _, rest = old.partition(".")
    if head in _INDEX:
        return ".".join(filter(None, (f"library.index.{_INDEX[head]}", rest)))
    if head in _PLATFORM:
        return f"platform.{old}"
    if head in _SPLIT and rest:
        layer = "platform" if rest.split(".")[0] in (_PLATFORM_DATA if head == "data" else _PLATFORM_EVAL) else "library"
        return f"{layer}.{old}"
    if head in ("library", "platform", "__main__") or head in _SPLIT:
        return None
    return f"library.{old}"


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves a 0.1 module path to its 0.2 module (the same module object, so patches and isinstance agree)."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(__name__ + "."):
            return None
        old = fullname[len(__name__) + 1:]
        new = _moved(old)
        if old in _SPLIT or (new and importlib.util.find_spec(f"{__name__}.{new}") is not None):
            return importlib.util.spec_from_loader(fullname, self, is_package=old in _SPLIT)
        return None

    def create_module(self, spec):
        old = spec.name[len(__name__) + 1:]
        if old in _SPLIT:  # an empty package: its modules live in the two layers now
            return types.ModuleType(spec.name)
        new = f"{__name__}.{_moved(old)}"
        warnings.warn(f"{spec.name} moved to {new} in detailfusion 0.2; the old path goes in 0.3",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


sys.meta_path.append(_MovedModules())
