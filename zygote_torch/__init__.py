"""zygote_torch: Zygote.jl's programming model for PyTorch."""
__version__ = "0.1.0"  # (the one place; pyproject.toml reads it)

from .ad.registry import non_differentiable, rrule
from .ad.tangents import NoTangent, Thunk, ZeroTangent
from .api import (code, derivative, diaghessian, fallbacks, gradient, hessian, hessian_reverse, isderiving,
                  jacobian, pullback, withgradient, withjacobian)
from .errors import RuleError, TraceError, ZygoteError
from .forward import frule, hvp, jvp, pushforward
from .testing import test_rrule
from .params import Grads, Params, destructure
from .runtime.compile import compile
from .runtime.draw import draw
from . import distributed  # noqa: E402  (zt.distributed.allreduce_gradients, ...)
from .tools import checkpointed, dropgrad, hook, ignore_derivatives
from . import rules as _rules  # noqa: F401  (registers the built-in rule library)
from .capture import vmap as _vmap  # noqa: F401  (torch.func.vmap calls as single calls under capture)
from .capture import transforms as _transforms  # noqa: F401  (torch.func.grad and jvp too; others refused)

__all__ = [
    "gradient", "withgradient", "pullback", "derivative", "fallbacks", "code",
    "jacobian", "withjacobian", "hessian", "hessian_reverse", "diaghessian", "isderiving",
    "jvp", "pushforward", "hvp", "frule", "test_rrule",
    "Params", "Grads", "destructure", "compile", "draw", "distributed", "rrule", "ignore_derivatives", "dropgrad", "hook", "checkpointed", "non_differentiable", "NoTangent", "ZeroTangent", "Thunk",
    "ZygoteError", "RuleError", "TraceError",
]
