"""zygote_torch: Zygote.jl's programming model for PyTorch."""
from .ad.registry import REGISTRY, non_differentiable, rrule
from .ad.tangents import NoTangent, Thunk, ZeroTangent
from .api import code, derivative, fallbacks, gradient, pullback, withgradient
from .errors import RuleError, TraceError, ZygoteError
from . import rules as _rules  # noqa: F401  (registers the built-in rule library)

__all__ = [
    "gradient", "withgradient", "pullback", "derivative", "fallbacks", "code",
    "rrule", "non_differentiable", "NoTangent", "ZeroTangent", "Thunk",
    "ZygoteError", "RuleError", "TraceError",
]
