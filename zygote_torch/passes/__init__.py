"""Graph-to-graph passes, each with one job."""
from .constant_fold import fold_constants
from .cse import eliminate_common_subexpressions
from .dce import eliminate_dead_code
from .partition import partition

__all__ = ["eliminate_common_subexpressions", "eliminate_dead_code", "fold_constants", "partition"]
