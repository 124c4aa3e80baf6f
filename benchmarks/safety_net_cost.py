"""Cost of the safety net (zygote_torch/ad/safety.py) on the dynamic path: the step of
benchmarks/bench.py's workloads with ZYGOTE_TORCH_CHECK_UNSEEN off and on, interleaved, medians.

    python benchmarks/safety_net_cost.py --workloads mlp,gpt --repeats 20
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench  # noqa: E402
import models  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="mlp,gpt")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for workload in args.workloads.split(","):
        w = models.make(workload, "cpu")
        ms = bench.methods(w, "cpu", with_torch_compile=False)
        eager, dynamic = ms["eager"](), ms["zt dynamic"]()
        times = {"eager": [], "zt dynamic": [], "zt dynamic, safety net on": []}
        for _ in range(3):
            eager(), dynamic()
        for _ in range(args.repeats):
            for name, flag in (("eager", "0"), ("zt dynamic", "0"), ("zt dynamic, safety net on", "1")):
                os.environ["ZYGOTE_TORCH_CHECK_UNSEEN"] = flag
                step = eager if name == "eager" else dynamic
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        os.environ["ZYGOTE_TORCH_CHECK_UNSEEN"] = "0"
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{workload}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in med.items())
              + f"; net on / off {med['zt dynamic, safety net on'] / med['zt dynamic']:.2f}")


if __name__ == "__main__":
    main()
