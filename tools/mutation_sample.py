"""A reproducible random sample of one file's mutants, for files too large to mutate whole.

Usage: ``python tools/mutation_sample.py mutants/vold_pl/rl/cached_sampler.py.meta [--n 80] [--seed 15] [--functions F...]``
prints the names of ``n`` mutants drawn without replacement (``random.Random(seed).sample`` of the sorted names in
mutmut's ``.meta`` file, which ``mutmut run`` writes when it generates the mutants); ``--functions`` draws only
from the mutants of those functions (methods as ``Class.method``). Pass them to
``mutmut run NAME...``; ``tools/mutation_score.py --sampled FILE`` then reports the file's score with a
Wilson 95% interval. The sample is the same for the same source file (same mutants), ``n`` and ``seed``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def _function(name: str) -> str:
    """``pkg.mod.xǁClassǁmethod__mutmut_3`` -> ``Class.method``; ``pkg.mod.x_func__mutmut_3`` -> ``func``."""
    local = name.rsplit(".", 1)[-1].split("__mutmut_")[0]
    return local[2:].replace("ǁ", ".") if local.startswith("xǁ") else local[2:]


def sample_mutants(meta: Path, n: int, seed: int, functions: list[str] | None = None) -> list[str]:
    names = sorted(json.loads(meta.read_text())["exit_code_by_key"])
    if functions:
        names = [m for m in names if _function(m) in functions]
    return sorted(random.Random(seed).sample(names, min(n, len(names))))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("meta", type=Path, help="mutants/<path>.py.meta, written by mutmut run")
    p.add_argument("--n", type=int, default=80, help="sample size")
    p.add_argument("--seed", type=int, default=15, help="random seed")
    p.add_argument("--functions", nargs="*", help="draw only from these functions' mutants (Class.method)")
    a = p.parse_args(argv)
    print("\n".join(sample_mutants(a.meta, a.n, a.seed, a.functions)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
