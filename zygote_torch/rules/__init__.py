"""The built-in rule library, by domain. Importing this package registers every rule."""
from ..ad.registry import REGISTRY

REGISTRY._loading_builtins = True
try:
    from . import arithmetic, elementwise, reductions, linalg, shape, indexing, mutation, nondiff  # noqa: F401
    from . import fused, nn, activations, losses, norms, conv, pooling, resample, attention  # noqa: F401
    from . import scans, factorizations, fft, special, statistics, distances, sampling, recurrent  # noqa: F401
    from . import functorch, custom_autograd  # noqa: F401
finally:
    REGISTRY._loading_builtins = False
