"""Graph-to-graph passes, each with one job."""
from .attention import fuse_attention_forward
from .constant_fold import fold_constants
from .cse import eliminate_common_subexpressions
from .dce import eliminate_dead_code
from .partition import partition
from .recompute import recompute_cheap_values
from .simplify import simplify

__all__ = ["eliminate_common_subexpressions", "eliminate_dead_code", "fold_constants", "fuse_attention_forward",
           "optimize", "partition", "recompute_cheap_values", "simplify"]


def optimize(gm, literal_outputs=frozenset(), recompute: bool = False) -> None:
    """The standard pipeline on a generated module: fused attention forwards, dead code, constants,
    identities, duplicates; with ``recompute``, cheap values needed late are recomputed rather than
    kept (a program that runs forward and backward in one go; not before a partition into two
    programs)."""
    fuse_attention_forward(gm.graph)
    eliminate_dead_code(gm.graph)
    fold_constants(gm, literal_outputs=literal_outputs)
    simplify(gm.graph)
    eliminate_common_subexpressions(gm.graph)
    if recompute:
        recompute_cheap_values(gm.graph)
    eliminate_dead_code(gm.graph)
    gm.recompile()
