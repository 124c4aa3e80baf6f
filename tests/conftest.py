import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# The safety net under the recorder (zygote_torch/ad/safety.py) is always on in the tests: a
# kernel reading a tensor being differentiated outside any recorded call fails the test.
os.environ.setdefault("ZYGOTE_TORCH_CHECK_UNSEEN", "1")
