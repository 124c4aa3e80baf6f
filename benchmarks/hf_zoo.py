"""Hugging Face architectures from tiny configs, for the model-zoo test and its command.

    python benchmarks/hf_zoo.py                 # every model, every way of running, a table
    python benchmarks/hf_zoo.py gpt2 llama      # some of them

Each entry builds a randomly initialised model (no download: configs only) and a batch of the
model's own keyword arguments with labels, so that ``model(**batch).loss`` is the training loss.
``check(name)`` runs the four ways a user differentiates it, in train mode (dropout on, the same
seed for both sides, as torch compares random programs) and in eval mode, and compares each value
and gradient with eager ``loss.backward()``:

- ``zt.gradient(lambda m: m(**batch).loss, model)`` (explicit module argument),
- ``zt.gradient(lambda: model(**batch).loss, zt.Params(model.parameters()))`` (implicit),
- ``zt.compile`` of the whole explicit step,
- ``zt.compile(model)(**batch)`` in an unchanged ``loss.backward(); opt.step()`` loop (SGD, three
  steps, the last step's loss and gradients compared with the same loop run eagerly),

and asserts that no call went through the ``torch.func`` fallback (``zt.fallbacks``) and that the
compiled module ran its own programs (no eager reason).
"""
from __future__ import annotations

import copy
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import zygote_torch as zt

VOCAB = 99
SEQ = 12
BATCH = 2

_TINY_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
_TINY_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)


@dataclass
class Entry:
    """How to build one architecture and a batch for it."""
    build: Callable[[], torch.nn.Module]
    batch: Callable[[torch.Generator], dict]
    float64: bool = True  # run in float64 (False: float32, for kernels without a float64 form)
    staged_refusal: str = ""  # where the staged ways must refuse it, naming the model's line


def _tokens(g, n=SEQ, vocab=VOCAB):
    return torch.randint(3, vocab, (BATCH, n), generator=g)


def _causal_lm(g):
    ids = _tokens(g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _masked_lm(g):
    ids = _tokens(g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _seq2seq(g):
    ids = _tokens(g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _tokens(g, 7)}


def _image(g, size=16, labels=3):
    return {"pixel_values": torch.randn(BATCH, 3, size, size, generator=g),
            "labels": torch.randint(0, labels, (BATCH,), generator=g)}


def _whisper_batch(g):
    return {"input_features": torch.randn(BATCH, 8, 32, generator=g), "labels": _tokens(g, 7)}


def _wav2vec2_batch(g):
    return {"input_values": torch.randn(BATCH, 400, generator=g),
            "labels": torch.randint(1, 20, (BATCH, 5), generator=g)}


def _clip_batch(g):
    ids = _tokens(g, 8)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g), "return_loss": True}


def _decoder(config_name, model_name, **extra):
    def build():
        import transformers
        config = getattr(transformers, config_name)(**{**_TINY_DECODER, **extra})
        return getattr(transformers, model_name)(config)
    return build


def _model(config_name, model_name, **kwargs):
    def build():
        import transformers
        return getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs))
    return build


_BART = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
_WHISPER = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                max_source_positions=16, max_target_positions=32, decoder_start_token_id=1,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, suppress_tokens=None, begin_suppress_tokens=None)
_VISION = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64)
_CLIP = dict(text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=16),
             vision_config=dict(_VISION), projection_dim=16)

MODELS: dict[str, Entry] = {
    "gpt2": Entry(_model("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                         n_positions=64), _causal_lm),
    "llama": Entry(_decoder("LlamaConfig", "LlamaForCausalLM"), _causal_lm),
    "mistral": Entry(_decoder("MistralConfig", "MistralForCausalLM", sliding_window=8), _causal_lm),
    "qwen2": Entry(_decoder("Qwen2Config", "Qwen2ForCausalLM"), _causal_lm),
    "qwen3": Entry(_decoder("Qwen3Config", "Qwen3ForCausalLM", head_dim=8), _causal_lm),
    "mixtral": Entry(_decoder("MixtralConfig", "MixtralForCausalLM", num_local_experts=4,
                              num_experts_per_tok=2), _causal_lm, float64=False),
    "qwen3_moe": Entry(_decoder("Qwen3MoeConfig", "Qwen3MoeForCausalLM", head_dim=8, num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
                       _causal_lm, float64=False),
    "bert": Entry(_model("BertConfig", "BertForMaskedLM", **_TINY_ENCODER), _masked_lm),
    "roberta": Entry(_model("RobertaConfig", "RobertaForMaskedLM", **_TINY_ENCODER, pad_token_id=1), _masked_lm),
    "distilbert": Entry(_model("DistilBertConfig", "DistilBertForMaskedLM", vocab_size=VOCAB, dim=32,
                               hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64), _masked_lm),
    "deberta_v2": Entry(_model("DebertaV2Config", "DebertaV2ForMaskedLM", **_TINY_ENCODER), _masked_lm),
    "modernbert": Entry(_model("ModernBertConfig", "ModernBertForMaskedLM", **_TINY_ENCODER,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                               global_attn_every_n_layers=2, local_attention=8), _masked_lm),
    "t5": Entry(_model("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=32, d_ff=64,
                       d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0), _seq2seq),
    "bart": Entry(_model("BartConfig", "BartForConditionalGeneration", **_BART), _seq2seq),
    "vit": Entry(_model("ViTConfig", "ViTForImageClassification", **_VISION, num_labels=3), _image),
    "gpt_neox": Entry(_model("GPTNeoXConfig", "GPTNeoXForCausalLM", **_TINY_ENCODER), _causal_lm),
    "phi": Entry(_decoder("PhiConfig", "PhiForCausalLM"), _causal_lm),
    "phi3": Entry(_decoder("Phi3Config", "Phi3ForCausalLM", pad_token_id=0), _causal_lm),
    "gemma": Entry(_decoder("GemmaConfig", "GemmaForCausalLM", head_dim=8), _causal_lm),
    "gemma2": Entry(_decoder("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, sliding_window=8), _causal_lm),
    "gemma3": Entry(_decoder("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, sliding_window=8),
                    _causal_lm),
    "whisper": Entry(_model("WhisperConfig", "WhisperForConditionalGeneration", **_WHISPER), _whisper_batch),
    "wav2vec2": Entry(_model("Wav2Vec2Config", "Wav2Vec2ForCTC", vocab_size=20, hidden_size=32,
                             num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
                             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                             ctc_loss_reduction="mean", pad_token_id=0), _wav2vec2_batch,
                      # `if labels.max() >= self.config.vocab_size: raise` reads tensor data
                      staged_refusal="labels.max() >= self.config.vocab_size"),
    "clip": Entry(_model("CLIPConfig", "CLIPModel", **_CLIP), _clip_batch),
}


def make(name: str, dtype=torch.float64):
    """(model, batch) for one entry, deterministic: the same weights and batch at every call."""
    entry = MODELS[name]
    torch.manual_seed(0)
    model = entry.build().to(dtype)
    batch = entry.batch(torch.Generator().manual_seed(1))
    batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    return model, batch


LOOP_STEPS = 3  # zt.compile(model)'s loop: the program of step 1 reruns on the updated weights


def _seed(seed):
    """The random state both sides start from: torch's, and NumPy's (wav2vec2 draws its time masks
    with NumPy)."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def _loss(model, batch):
    return model(**batch).loss


def _way_explicit(model, batch, seed):
    _seed(seed)
    loss, (g,) = zt.withgradient(lambda m: _loss(m, batch), model)
    return loss, {n: g[n] for n, _ in model.named_parameters()}


def _way_params(model, batch, seed):
    ps = zt.Params(model.parameters())
    _seed(seed)
    loss, gs = zt.withgradient(lambda: _loss(model, batch), ps)
    return loss, {n: gs[p] for n, p in model.named_parameters()}


def _way_staged_step(model, batch, seed):
    step = zt.compile(lambda m, b: zt.withgradient(lambda m: _loss(m, b), m))
    _seed(seed)
    loss, (g,) = step(model, batch)
    return loss, {n: g[n] for n, _ in model.named_parameters()}


def _training_loop(model, batch, seed, steps, compiled: bool):
    """An unchanged ``loss.backward(); opt.step()`` loop (SGD), through ``zt.compile(model)`` or
    eagerly; the last step's loss and gradients."""
    run = zt.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        _seed(seed + step)
        loss = run(**batch).loss
        if compiled and "_Bridge" not in type(loss.grad_fn).__name__:  # our backward program, not autograd's
            raise AssertionError(f"zt.compile(model) ran eagerly ({run._zt_eager_reason or 'hooks'})")
        loss.backward()
        if step < steps - 1:
            opt.step()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _way_compiled_module(model, batch, seed):
    return _training_loop(model, batch, seed, LOOP_STEPS, compiled=True)


WAYS = {"gradient": _way_explicit, "params": _way_params, "staged": _way_staged_step,
        "module": _way_compiled_module}


STAGED = ("staged", "module")


def _expect_refusal(name, way, mode, line, model, batch, seed):
    """A model whose Python reads tensor data is refused by the staged ways, with its line named."""
    try:
        WAYS[way](model, batch, seed)
    except zt.ZygoteError as e:
        assert line in str(e), f"{name} {way} {mode}: refused without naming {line!r}: {e}"
        return
    raise AssertionError(f"{name} {way} {mode}: staged although its Python reads tensor data at {line}")


def _compare(name, way, mode, got, ref):
    """float64 tolerance where the loss is float64; float32's where the model computes its loss in
    float32 (Hugging Face's causal-LM loss upcasts the logits to float32, whatever the weights)."""
    tol = dict(atol=1e-7, rtol=1e-6) if ref[0].dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
    loss, grads = got
    torch.testing.assert_close(torch.as_tensor(loss), ref[0], **tol,
                               msg=lambda m: f"{name} {way} {mode}: loss: {m}")
    for n, r in ref[1].items():
        g = grads[n]
        if r is None:
            assert g is None or not g.any(), f"{name} {way} {mode}: {n}: eager has no gradient, ours {g}"
            continue
        assert g is not None, f"{name} {way} {mode}: {n}: no gradient, eager has one"
        torch.testing.assert_close(g, r, **tol, msg=lambda m: f"{name} {way} {mode}: {n}: {m}")


def check(name: str, ways=WAYS, modes=("train", "eval"), seed=0) -> dict:
    """Run ``name`` through each way in each mode against eager; raise on the first difference.
    Returns seconds per (way, mode)."""
    dtype = torch.float64 if MODELS[name].float64 else torch.float32
    model, batch = make(name, dtype)
    times = {}
    for mode in modes:
        model.train(mode == "train")
        used = sorted({line.split(" at ")[0] for line in zt.fallbacks(lambda m: _loss(m, batch), model)})
        assert not used, f"{name} {mode}: calls through the torch.func fallback: {used}"
        ref = _training_loop(copy.deepcopy(model), batch, seed, 1, compiled=False)  # eager loss.backward()
        loop_ref = _training_loop(copy.deepcopy(model), batch, seed, LOOP_STEPS, compiled=False)
        for way in ways:
            start = time.perf_counter()
            if way in STAGED and MODELS[name].staged_refusal:
                _expect_refusal(name, way, mode, MODELS[name].staged_refusal, copy.deepcopy(model), batch, seed)
                continue
            got = WAYS[way](copy.deepcopy(model), batch, seed)
            times[way, mode] = time.perf_counter() - start
            _compare(name, way, mode, got, loop_ref if way == "module" else ref)
    return times


def main(names):
    failed = 0
    for name in names or MODELS:
        try:
            times = check(name)
            print(f"{name:12s} ok   " + " ".join(f"{w}/{m}={t:.1f}s" for (w, m), t in times.items()), flush=True)
        except Exception as e:  # a report of every model, not only the first failure
            failed += 1
            first = str(e).strip().splitlines()
            print(f"{name:12s} FAIL {type(e).__name__}: {first[0] if first else ''}"[:400], flush=True)
    print(f"{len(names or MODELS) - failed} of {len(names or MODELS)} models equal eager in every way")
    return failed


if __name__ == "__main__":
    import transformers
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")
    sys.exit(1 if main(sys.argv[1:]) else 0)
