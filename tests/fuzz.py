"""Differential fuzzer: random programs differentiated by zygote_torch and torch.autograd (float64).

    .venv/bin/python tests/fuzz.py --programs 2000 --seed 0 [--path dynamic|staged|replayed|both|all]
    .venv/bin/python tests/fuzz.py --only 1234 --show        # one program: its source and outcome
    .venv/bin/python tests/fuzz.py --programs 300 --shrink 40   # minimal repros of failures, as pytest

Program ``k`` of a run is ``generate(seed + k)``, so a failure is reproduced from its number alone.
Prints counts per path and category (see tests/fuzzing/oracle.py) and one line per failure; exits 1
if any program got a wrong value or gradient, a crash other than zt.ZygoteError, or timed out.
"""
from __future__ import annotations

import argparse
import faulthandler
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fuzzing.generator import Generator, generate  # noqa: E402
from fuzzing.oracle import BUG_CATEGORIES, run_program  # noqa: E402
from fuzzing.shrink import evaluate, failure_key, pytest_repro, shrink  # noqa: E402

ORDER = ["ok", "ok_none_for_zero", "wrong_value", "wrong_grad", "missing_grad", "crash", "refused", "refused_ok",
         "unverified", "timeout"]


def main(argv=None) -> int:
    faulthandler.enable()  # a segfault names the program: its frames are in "<fuzz-N>"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--programs", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--path", choices=["dynamic", "staged", "replayed", "both", "all"], default="both",
                    help="both: dynamic and staged; all: those and replayed (the dynamic path called five "
                    "times, as a training loop calls it)")
    ap.add_argument("--only", type=int, nargs="*", help="run just these program numbers")
    ap.add_argument("--show", action="store_true", help="print each failing program's source")
    ap.add_argument("--shrink", type=int, default=0, metavar="N",
                    help="shrink the first N failing programs; print one pytest repro per distinct minimal form")
    ap.add_argument("--json", help="write every outcome to this file")
    ap.add_argument("--exclude", default="", help="comma-separated statement families not to generate "
                    f"(of: {', '.join(Generator.FAMILIES)})")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per path and program")
    args = ap.parse_args(argv)
    paths = {"both": ("dynamic", "staged"), "all": ("dynamic", "staged", "replayed")}.get(args.path, (args.path,))
    seeds = args.only if args.only else range(args.seed, args.seed + args.programs)
    exclude = [name for name in args.exclude.split(",") if name]
    unknown = set(exclude) - set(Generator.FAMILIES)
    if unknown:
        ap.error(f"unknown families: {sorted(unknown)}")

    counts = {p: collections.Counter() for p in paths}
    torch_status = collections.Counter()
    failures, records = [], []
    start = time.time()
    for n, seed in enumerate(seeds):
        program = generate(seed, exclude)
        ref, outcomes = run_program(program, paths, args.timeout)
        torch_status[ref.status] += 1
        for o in outcomes:
            counts[o.path][o.category] += 1
            records.append(dict(seed=seed, path=o.path, category=o.category, detail=o.detail,
                                torch=o.torch_status, tags=sorted(program.tags)))
            if o.category not in ("ok", "ok_none_for_zero", "refused_ok"):
                failures.append((seed, program, o))
                print(f"seed {seed} {o.path}: {o.category} (torch: {o.torch_status}) {o.detail}", flush=True)
                if args.show:
                    print(program.source())
        if (n + 1) % 100 == 0:
            print(f"... {n + 1} programs, {time.time() - start:.0f} s", file=sys.stderr, flush=True)

    print(f"\n{len(seeds)} programs in {time.time() - start:.1f} s; torch reference: {dict(torch_status)}")
    for p in paths:
        row = ", ".join(f"{c} {counts[p][c]}" for c in ORDER if counts[p][c])
        print(f"{p:8s} {row}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)
    if args.shrink:
        _shrink_failures(failures, args.shrink)
    bugs = sum(counts[p][c] for p in paths for c in BUG_CATEGORIES)
    return 1 if bugs else 0


# The feature a minimal failing program is filed under: the first of these it still uses.
SUSPECTS = ["RoundSTE", "SignSTE", "ScaleGrad", "MulPair", "SinCos", "Cube", "hook", "no_grad", "detach",
            "self_alias", "view_chain", "read_view_after_mutation", "mutate_base_of_view", "inplace_view",
            "index_assign", "buffer_fill", "control_flow", "float32", "int_from_data", "adv_index", "bool_mask",
            "expand", "inplace", "view"]


def _shrink_failures(failures, limit: int):
    """Shrink up to ``limit`` failing programs (one path each: dynamic where it failed there), group the
    results by path(s), category and the features left in the minimal program, print one pytest
    function per group."""
    by_seed = {}
    for seed, program, outcome in failures:
        if outcome.category in ("wrong_value", "wrong_grad", "missing_grad", "crash", "refused", "timeout"):
            by_seed.setdefault(seed, (program, []))[1].append(outcome)
    rank = {"wrong_value": 0, "wrong_grad": 0, "missing_grad": 0, "crash": 1, "timeout": 1, "refused": 2}
    order = sorted(by_seed, key=lambda seed: min(rank[o.category] for o in by_seed[seed][1]))
    groups = {}
    for seed in order[:limit]:
        program, outcomes = by_seed[seed]
        outcome = min(outcomes, key=lambda o: (rank[o.category], o.path != "dynamic"))
        small = shrink(program, outcome)
        also = [p for p in ("dynamic", "staged") if p != outcome.path
                and (o := evaluate(small, p)) is not None and failure_key(o) == failure_key(outcome)]
        suspect = next((t for t in SUSPECTS if t in small.tags), "other")
        key = (tuple(sorted([outcome.path, *also])), failure_key(outcome)[0], failure_key(outcome)[2], suspect)
        groups.setdefault(key, []).append((seed, small, outcome))
        print(f"shrunk seed {seed}: {len(program.body)} -> {len(small.body)} statements; {key}",
              file=sys.stderr, flush=True)
    for key, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        seeds = [m[0] for m in members]
        seed, small, outcome = min(members, key=lambda m: len(m[1].source()))
        paths, category, head, suspect = key
        print(f"\n# ---- {category} on {' and '.join(paths)}; filed under {suspect}; "
              f"{len(seeds)} program(s): {seeds}\n# {outcome.detail}")
        print(pytest_repro(small, outcome, name=f"test_fuzz_program_{seed}_{outcome.path}_{outcome.category}"))


if __name__ == "__main__":
    sys.exit(main())
