"""Training: the stage LightningModules (`module`), the data module (`datamodule`), objectives, optimizers and
the named model parts. Names are imported lazily, so the model code can use `objectives` without Lightning."""

from importlib import import_module

_LAZY = {
    "MogaoModule": "module", "UnderstandingModule": "module", "T2IModule": "module", "InterleavedModule": "module",
    "MogaoDataModule": "datamodule", "MixtureStream": "datamodule", "Source": "datamodule",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"mogao.training.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mogao.training' has no attribute {name!r}")
