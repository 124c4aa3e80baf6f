"""Graph-to-graph passes, each with one job."""
from .constant_fold import fold_constants
from .cse import eliminate_common_subexpressions
from .dce import eliminate_dead_code
from .partition import partition
from .simplify import simplify

__all__ = ["eliminate_common_subexpressions", "eliminate_dead_code", "fold_constants", "optimize", "partition",
           "simplify"]


def optimize(gm, literal_outputs=frozenset()) -> None:
    """The standard pipeline on a generated module: dead code, constants, identities, duplicates."""
    eliminate_dead_code(gm.graph)
    fold_constants(gm, literal_outputs=literal_outputs)
    simplify(gm.graph)
    eliminate_common_subexpressions(gm.graph)
    eliminate_dead_code(gm.graph)
    gm.recompile()
