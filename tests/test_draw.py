"""zt.draw (zygote_torch/runtime/draw.py): the forward and backward graphs of a staged program as
text, graphviz source and SVG; fallback nodes marked."""
import os
import re
import shutil
import stat
import sys

import pytest
import torch
import torch.nn as nn
from torch.overrides import handle_torch_function, has_torch_function

import zygote_torch as zt
from zygote_torch.runtime.draw import draw, render_dot


def no_rule_op(x):
    """An op the recorder sees as one call and that has no rule: its pullback is the fallback."""
    if has_torch_function((x,)):
        return handle_torch_function(no_rule_op, (x,), x)
    return x.sin() * 2


def with_fallback(x):
    return (no_rule_op(x.exp()) * x).sum()


def only_rules(x):
    return (x.tanh() * x).sum()


X = torch.randn(3, 4)


def test_text_shows_forward_backward_and_residuals():
    text = draw(only_rules, X)
    assert text.startswith("forward(x)")
    assert "\nbackward(" in text
    # the residual is marked: x (tanh is cheap, so the backward recomputes it from x: see passes/mincut.py)
    assert re.search(r"~ x +=\s+input\s+f32\[3, 4\]", text)
    assert "f32[3, 4]" in text
    assert "~ residuals (forward -> backward):" in text
    assert "every op had a rule" in text
    assert "!" not in text.replace("every op had a rule", "")


def test_text_has_every_node_of_the_generated_program():
    text = draw(with_fallback, X)
    code = zt.code(with_fallback, X)
    assigned = set(re.findall(r"^\s+(\w+) = ", code, flags=re.M))
    drawn = set(re.findall(r"^\s+[!~ ] (\w+)\s+= ", text, flags=re.M))
    assert assigned and assigned <= drawn


def test_fallback_nodes_are_marked():
    assert zt.fallbacks(with_fallback, X)  # the premise: this op has no rule
    text = draw(with_fallback, X)
    marked = [line for line in text.splitlines() if line.startswith("  ! ")]
    assert len(marked) == 1 and "vjp_no_rule_op" in marked[0] and "fallback" in marked[0]
    assert "1 node(s) used the torch.func.vjp fallback (no rule): no_rule_op" in text


def test_dot_source(tmp_path):
    path = draw(with_fallback, X, path=tmp_path / "g.dot")
    source = open(path).read()
    assert source.startswith("digraph program {") and source.rstrip().endswith("}")
    assert 'label="forward"' in source and 'label="backward"' in source
    fallback_lines = [l for l in source.splitlines() if "vjp_no_rule_op" in l and "[label=" in l]
    assert len(fallback_lines) == 1 and "#fb6a4a" in fallback_lines[0]
    assert "style=dashed" in source  # residual edges from the forward to the backward
    assert source.count("{") == source.count("}")


def _fake_dot(directory) -> str:
    """A stand-in for graphviz's dot: reads the source, writes an SVG holding it."""
    script = os.path.join(directory, "dot")
    with open(script, "w") as f:
        f.write(f"#!{sys.executable}\n"
                "import sys, html\n"
                "out = sys.argv[sys.argv.index('-o') + 1]\n"
                "assert sys.argv[1] == '-Tsvg', sys.argv\n"
                "src = sys.stdin.read()\n"
                "svg = '<svg xmlns=\"http://www.w3.org/2000/svg\"><desc>' + html.escape(src) + '</desc></svg>'\n"
                "open(out, 'w').write(svg)\n")
    os.chmod(script, os.stat(script).st_mode | stat.S_IEXEC)
    return script


def test_svg_through_dot(tmp_path, monkeypatch):
    if shutil.which("dot") is None:  # exercise the call with a stand-in
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        _fake_dot(str(bin_dir))
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    path = draw(with_fallback, X, path=tmp_path / "g.svg")
    assert path == str(tmp_path / "g.svg")
    svg = open(path).read()
    assert "<svg" in svg and "vjp_no_rule_op" in svg


def test_svg_without_graphviz_falls_back_to_text(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="dot"):
        path = draw(with_fallback, X, path=tmp_path / "g.svg")
    assert path == str(tmp_path / "g.txt")
    assert open(path).read() == draw(with_fallback, X)


def test_implicit_parameters_and_compiled_functions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    ps = zt.Params(model)
    text = draw(lambda: model(X).pow(2).mean(), ps)
    assert text.startswith("forward(param_0, param_1, param_2, param_3")
    assert "F.linear(" in text and "backward(" in text

    step = zt.compile(lambda x: zt.gradient(lambda: no_rule_op(model(x)).pow(2).mean(), ps))
    text = draw(step, X)
    assert text.startswith("staged program(x")
    assert "vjp_no_rule_op" in text and "1 node(s) used the torch.func.vjp fallback" in text


def test_render_dot_of_a_single_graph():
    step = zt.compile(lambda x: only_rules(x))
    source = render_dot([("staged program", step.program((X,)).module)])
    assert "cluster_0" in source and "cluster_1" not in source
