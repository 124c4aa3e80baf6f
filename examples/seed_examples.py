"""The Zygote.jl README's examples, in zygote_torch. Run: `make demo` (or python examples/seed_examples.py).

Each example prints what it computed. Pass a function name (sin, cos or tan) as the first argument
to choose the function of the dictionary example at run time, as Zygote's `readline()` does.
"""
import sys

import torch

import zygote_torch as zt


def section(title):
    print(f"\n== {title}")


# f(x) = 5x + 3;  f(10), f'(10) == (53, 5.0)
def f(x):
    return 5 * x + 3


section("f(x) = 5x + 3")
print("f(10), f'(10) =", (f(10), zt.derivative(f)(10)))

section("zt.code(f, 10.0): the generated program; its backward is the constant 5")
print(zt.code(f, 10.0))

# A dictionary of functions, the key chosen at run time
fs = {"sin": torch.sin, "cos": torch.cos, "tan": torch.tan}
name = sys.argv[1] if len(sys.argv) > 1 else "sin"
section(f"gradient(x -> fs[{name!r}](x), 1.0)")
print(zt.gradient(lambda x: fs[name](x), 1.0)[0])


# A custom rule, ChainRules style
def add(a, b):
    return a + b


@zt.rrule(add)
def _(a, b):
    def add_pb(dy):
        return zt.NoTangent(), dy, dy
    return add(a, b), add_pb


section("custom rrule for add(a, b): gradient of sum(add(a, b)) w.r.t. a and b")
a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
print(zt.gradient(lambda a, b: add(a, b).sum(), a, b))
print("generated:\n" + zt.code(lambda a, b: add(a, b).sum(), a, b))

# Control flow on values: the branch taken at run time is the one differentiated
section("data-dependent control flow: gradient of a loop that runs until the value exceeds 100")


def grow(x):
    while x < 100:
        x = x * x + 1
    return x


print("grow(2.0) =", grow(2.0), " d/dx =", zt.derivative(grow)(2.0))

# Structures and modules
section("structural gradient of a dict and of an nn.Module")
torch.manual_seed(0)
params = {"w": torch.randn(3), "b": torch.zeros(())}
x = torch.randn(5, 3)
print(zt.gradient(lambda p: ((x @ p["w"] + p["b"]) ** 2).mean(), params)[0])
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
grads = zt.gradient(lambda m: (m(x) ** 2).mean(), model)[0]
model.zero_grad()
(model(x) ** 2).mean().backward()
for pname, p in model.named_parameters():
    err = (grads[pname] - p.grad).abs().max().item()
    print(f"  {pname:10s} shape {tuple(p.shape)}  max |zt - autograd| = {err:.2e}")
