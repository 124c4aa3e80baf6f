"""The built-in rule library, by domain. Importing this package registers every rule."""
from ..ad.registry import REGISTRY

REGISTRY._loading_builtins = True
try:
    from . import fused, arithmetic, elementwise, reductions, linalg, shape, indexing, nn, losses, normalization, nondiff, mutation  # noqa: F401
finally:
    REGISTRY._loading_builtins = False
