"""A reproducible random sample of one file's mutants, for files too large to mutate whole.

Usage: ``python tools/mutation_sample.py mutants/vold_pl/rl/rollout.py.meta [--n 80] [--seed 15]`` prints the
names of ``n`` mutants drawn without replacement (``random.Random(seed).sample`` of the sorted names in
mutmut's ``.meta`` file, which ``mutmut run`` writes when it generates the mutants). Pass them to
``mutmut run NAME...``; ``tools/mutation_score.py --sampled FILE`` then reports the file's score with a
Wilson 95% interval. The sample is the same for the same source file (same mutants), ``n`` and ``seed``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def sample_mutants(meta: Path, n: int, seed: int) -> list[str]:
    names = sorted(json.loads(meta.read_text())["exit_code_by_key"])
    return sorted(random.Random(seed).sample(names, min(n, len(names))))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("meta", type=Path, help="mutants/<path>.py.meta, written by mutmut run")
    p.add_argument("--n", type=int, default=80, help="sample size")
    p.add_argument("--seed", type=int, default=15, help="random seed")
    a = p.parse_args(argv)
    print("\n".join(sample_mutants(a.meta, a.n, a.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
