"""zygote_torch: Zygote.jl's programming model for PyTorch."""
from setuptools import find_packages, setup

setup(
    name="zygote_torch",
    version="0.1.0",
    description="Zygote-style source-to-source gradients for PyTorch: torch.fx capture, ChainRules-style rrules",
    packages=find_packages(include=["zygote_torch", "zygote_torch.*"]),
    python_requires=">=3.11",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"test": ["pytest", "hypothesis"]},
)
