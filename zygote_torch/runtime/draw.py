"""Drawing a staged program: its forward and backward graphs, fallback nodes marked.

    zt.draw(f, *args)                    # str: a text rendering of both graphs
    zt.draw(f, *args, path="g.svg")      # an SVG through graphviz's ``dot`` (text file when absent)
    zt.draw(f, *args, path="g.dot")      # the graphviz source itself (no graphviz needed)
    zt.draw(step, *args)                 # a zt.compile'd function: its one generated program

The program is the one ``zt.code(f, *args)`` prints: a forward computing the output and the
residuals, and a backward taking the residuals and returning the gradients. Residuals are drawn
as dashed edges from the forward node that computes them to the backward's input of that name.
Nodes whose pullback had no rule and went through ``torch.func.vjp`` (the backward's ``vjp_*``
calls, see ``zt.fallbacks``) are marked: ``!`` in the text, filled red in the drawing.
"""
from __future__ import annotations

import html
import operator
import os
import shutil
import subprocess
import warnings

import torch
import torch.fx as fx

_FALLBACK = "vjp_"
_OPERATORS = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
              operator.matmul: "@", operator.pow: "**", operator.neg: "-", operator.getitem: "[]"}
_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
           torch.int64: "i64", torch.int32: "i32", torch.bool: "bool", torch.uint8: "u8",
           torch.complex64: "c64", torch.complex128: "c128"}


def is_fallback(node: fx.Node) -> bool:
    """True for a call of the ``torch.func.vjp`` fallback (an op with no rule)."""
    return node.op == "call_function" and getattr(node.target, "__name__", "").startswith(_FALLBACK)


def _fallback_op(node: fx.Node) -> str:
    """The op a fallback node differentiates: the call its ``vjp`` closure holds, else its name."""
    from ..errors import op_name
    for cell in getattr(node.target, "__closure__", None) or ():
        try:
            func = getattr(cell.cell_contents, "func", None)
        except ValueError:  # an empty cell
            continue
        if func is not None:
            return op_name(func)
    return getattr(node.target, "__name__", "")[len(_FALLBACK):]


def _meta(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{_DTYPES.get(value.dtype, str(value.dtype).replace('torch.', ''))}{list(value.shape)}"
    if isinstance(value, (tuple, list)):
        parts = [_meta(v) for v in value]
        return "(" + ", ".join(p for p in parts if p) + ")" if any(parts) else ""
    return ""


def _target(node: fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "get_attr":
        return f"self.{node.target}"
    t = node.target
    if t in _OPERATORS:
        return _OPERATORS[t]
    name = getattr(t, "__name__", None) or str(t)
    module = getattr(t, "__module__", None) or ""
    if module.startswith("torch") and hasattr(torch, name) and getattr(torch, name) is t:
        return f"torch.{name}"
    if module.startswith("torch.nn.functional") or module == "torch._C._nn":
        return f"F.{name}"
    return name


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (tuple, list)):
        inner = ", ".join(_arg(x) for x in a)
        return f"({inner}{',' if len(a) == 1 and isinstance(a, tuple) else ''})" if isinstance(a, tuple) \
            else f"[{inner}]"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_arg(v)}" for k, v in a.items()) + "}"
    text = repr(a)
    return text if len(text) <= 24 else text[:21] + "..."


def _call(node: fx.Node) -> str:
    args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return f"constant self.{node.target}"
    if node.op == "output":
        return "return " + _arg(node.args[0])
    if node.op == "call_method":
        return f"{args[0]}.{node.target}({', '.join(args[1:])})"
    if node.target is operator.getitem:
        return f"{args[0]}[{args[1]}]"
    if node.target in _OPERATORS and len(args) == 2:
        return f"{args[0]} {_OPERATORS[node.target]} {args[1]}"
    return f"{_target(node)}({', '.join(args)})"


# -- text --------------------------------------------------------------------------------------------
def _text_graph(title: str, gm: fx.GraphModule, residuals: set[str], into: set[str]) -> list[str]:
    nodes = list(gm.graph.nodes)
    inputs = [n.name for n in nodes if n.op == "placeholder"]
    lines = [f"{title}({', '.join(inputs)})"]
    width = max([len(n.name) for n in nodes] + [8])
    for n in nodes:
        if n.op == "output":
            lines.append(f"  {'':{width}}     {_call(n)}")
            continue
        mark = "!" if is_fallback(n) else ("~" if n.name in residuals or n.name in into else " ")
        note = f"   <- torch.func.vjp fallback: {_fallback_op(n)} has no rule" if is_fallback(n) else ""
        lines.append(f"  {mark} {n.name:{width}} = {_call(n):60s} {_meta(n.meta.get('val'))}{note}".rstrip())
    return lines


def _legend(fallbacks: list[fx.Node], residuals: list[str]) -> list[str]:
    lines = []
    if residuals:
        lines.append(f"~ residuals (forward -> backward): {', '.join(residuals)}")
    if fallbacks:
        ops = sorted({_fallback_op(n) for n in fallbacks})
        lines.append(f"! {len(fallbacks)} node(s) used the torch.func.vjp fallback (no rule): {', '.join(ops)}")
    else:
        lines.append("no node used the torch.func.vjp fallback: every op had a rule")
    return lines


def render_text(graphs: list[tuple[str, fx.GraphModule]], residuals: list[str] = ()) -> str:
    """The text rendering of ``graphs`` ((title, module) pairs)."""
    residual_set = set(residuals)
    out, fallbacks = [], []
    for i, (title, gm) in enumerate(graphs):
        produced = residual_set if i == 0 and len(graphs) > 1 else set()
        received = residual_set if i == 1 else set()
        out += _text_graph(title, gm, produced, received) + [""]
        fallbacks += [n for n in gm.graph.nodes if is_fallback(n)]
    return "\n".join(out + _legend(fallbacks, list(residuals))) + "\n"


# -- graphviz ----------------------------------------------------------------------------------------
def _dot_label(node: fx.Node) -> str:
    rows = [f"<b>{html.escape(node.name)}</b>"]
    if node.op not in ("placeholder", "output"):
        rows.append(html.escape(_target(node)))
    meta = _meta(node.meta.get("val"))
    if meta:
        rows.append(f'<font point-size="9">{html.escape(meta)}</font>')
    if is_fallback(node):
        rows.append('<font point-size="9">torch.func.vjp fallback</font>')
    return "<" + "<br/>".join(rows) + ">"


def render_dot(graphs: list[tuple[str, fx.GraphModule]], residuals: list[str] = ()) -> str:
    """The graphviz source of ``graphs``: one cluster per graph, residual edges dashed."""
    lines = ["digraph program {", '  rankdir=TB; node [shape=box, style="rounded,filled", fillcolor=white, '
             'fontname="Helvetica", fontsize=11]; edge [color="#555555"];']
    ids: dict[tuple[int, fx.Node], str] = {}
    for g, (title, gm) in enumerate(graphs):
        lines.append(f'  subgraph cluster_{g} {{ label="{title}"; fontname="Helvetica"; color="#888888";')
        for k, n in enumerate(gm.graph.nodes):
            ids[(g, n)] = f"g{g}n{k}"
            style = {"placeholder": 'shape=ellipse, fillcolor="#deebf7"',
                     "get_attr": 'shape=ellipse, fillcolor="#eeeeee"',
                     "output": 'shape=doubleoctagon, fillcolor="#e5f5e0"'}.get(n.op, "")
            if is_fallback(n):
                style = 'fillcolor="#fb6a4a", penwidth=2'
            lines.append(f"    {ids[(g, n)]} [label={_dot_label(n)}{', ' + style if style else ''}];")
        for n in gm.graph.nodes:
            for a in n.all_input_nodes:
                lines.append(f"    {ids[(g, a)]} -> {ids[(g, n)]};")
        lines.append("  }")
    if len(graphs) == 2 and residuals:
        forward_nodes = {n.name: n for n in graphs[0][1].graph.nodes}
        backward_inputs = {n.name: n for n in graphs[1][1].graph.nodes if n.op == "placeholder"}
        for r in residuals:
            if r in forward_nodes and r in backward_inputs:
                lines.append(f'  {ids[(0, forward_nodes[r])]} -> {ids[(1, backward_inputs[r])]} '
                             '[style=dashed, color="#2171b5", constraint=false];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _graphs_of(f, args):
    """([(title, module)], residual names) of the program zygote_torch generates for ``f``."""
    from .compile import CompiledFunction
    if isinstance(f, CompiledFunction):
        return [("staged program", f.program(args).module)], []
    from .staged import gradient_program
    program = gradient_program(f, args)
    return [("forward", program.forward), ("backward", program.backward)], list(program.residuals)


def draw(f, *args, path: str | os.PathLike | None = None):
    """Draw the forward and backward graphs of ``gradient(f, *args)`` (for a ``zt.compile``'d
    ``f``: its generated program). Without ``path``: return the text rendering. With ``path``:
    write it, in the format its suffix names: ``.svg``, ``.png`` or ``.pdf`` through graphviz's
    ``dot`` (if ``dot`` is not installed: the text rendering, next to it as ``.txt``, with a
    warning), ``.dot`` the graphviz source, anything else the text rendering. Returns the path
    written."""
    graphs, residuals = _graphs_of(f, args)
    if path is None:
        return render_text(graphs, residuals)
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".svg", ".png", ".pdf"):
        dot = shutil.which("dot")
        if dot is None:
            path = os.path.splitext(path)[0] + ".txt"
            warnings.warn(f"zt.draw: graphviz's `dot` is not installed; wrote the text rendering to {path} "
                          "(install graphviz for a drawing)", stacklevel=2)
            suffix = ".txt"
        else:
            result = subprocess.run([dot, f"-T{suffix[1:]}", "-o", path], input=render_dot(graphs, residuals),
                                    text=True, capture_output=True, timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"zt.draw: dot failed: {result.stderr.strip()}")
            return path
    content = render_dot(graphs, residuals) if suffix == ".dot" else render_text(graphs, residuals)
    with open(path, "w") as f_out:
        f_out.write(content)
    return path
