"""CondInst network (FCOS head, mask branch, dynamic mask head), backbones; importing registers them."""
from . import backbone  # noqa: F401  (registers the backbones)
from .condinst import CondInst, CondInstNet, ImageFeatures  # noqa: F401  (registers the meta-arch)

__all__ = ["CondInst", "CondInstNet", "ImageFeatures"]
