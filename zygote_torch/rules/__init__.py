"""The built-in rule library, by domain. Importing this package registers every rule."""
from ..ad.registry import REGISTRY

REGISTRY._loading_builtins = True
try:
    from . import arithmetic, elementwise, reductions, linalg, shape, indexing, mutation, nondiff  # noqa: F401
    from . import fused, nn, losses, norms, conv, pooling, resample, attention  # noqa: F401
    from . import scans, factorizations, fft, special, opinfo_extra, recurrent, functorch  # noqa: F401
    from . import custom_autograd  # noqa: F401
finally:
    REGISTRY._loading_builtins = False
