"""Hugging Face architectures from tiny configs (issue 15) through every way of differentiating
them: zt.gradient, implicit Params, zt.compile of the step, and zt.compile(model) in an unchanged
training loop; values and gradients equal eager, train and eval mode, no fallback node. Runs where
``transformers`` is installed (the ``test`` extra installs it).

CI runs a handful that between them reach every mechanism the zoo needs (a causal LM, grouped-query
attention, mixture-of-experts routing through ``torch._grouped_mm``, an encoder-decoder with its
in-place label shift, frozen position embeddings, weight norm and a staged refusal); every model:
``ZT_HF_ZOO=all pytest tests/test_hf_zoo.py``, or ``python benchmarks/hf_zoo.py`` for a table.
"""
import os
import sys
import warnings

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import hf_zoo  # noqa: E402

IN_CI = ["gpt2", "llama", "mixtral", "t5", "whisper", "wav2vec2"]
MODELS = list(hf_zoo.MODELS) if os.environ.get("ZT_HF_ZOO") == "all" else IN_CI


@pytest.mark.parametrize("name", MODELS)
def test_hugging_face_model_equals_eager_in_every_way(name):
    import transformers
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="transformers")
        hf_zoo.check(name)


def test_the_zoo_names_the_24_architectures_of_the_issue():
    assert len(hf_zoo.MODELS) == 24
    assert set(IN_CI) <= set(hf_zoo.MODELS)
