"""Mutation score per file from ``mutmut results --all true``, with the equivalent mutants of docs/testing.md set aside.

Usage: ``python tools/mutation_score.py [--sampled FILE]... RESULTS... docs/testing.md`` (``make mutate`` runs it
with ``mutants/results.txt``; several results files merge: a mutant killed in any of them counts as killed, since each
run used tests of the same selection, otherwise a later file's checked result wins). Prints a
Markdown table and writes it into the docs between the ``mutation-scores`` markers. A mutant listed in the docs'
equivalent-mutants table (its name in backticks in the first column) is one no test can kill because it does not
change behaviour; it is left out of the denominator. The score is killed / (tested - equivalent), where killed
includes timeouts and tested is every mutant mutmut ran ("no tests" counts as not killed).

``--sampled vold_pl/rl/cached_sampler.py``: that file's run mutants are a random sample (``tools/mutation_sample.py``);
its row adds the Wilson 95% interval of the whole file's score.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

NAME_RE = re.compile(r"^\s*(?P<name>(?P<module>[\w.]+?)\.x(?:_|ǁ)\S+__mutmut_\d+):\s*(?P<status>.+?)\s*$")
KILLED = {"killed", "timeout", "caught by type check"}
NOT_RUN = {"skipped", "not checked"}
START, END = "<!-- mutation-scores:start -->", "<!-- mutation-scores:end -->"


def read_results(paths: list[Path]) -> dict[str, tuple[str, str]]:
    """mutant name -> (module, status); a kill in any file stands, a mutant not run in a later file keeps an
    earlier file's result."""
    out: dict[str, tuple[str, str]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            m = NAME_RE.match(line)
            if not m or (m["name"] in out and out[m["name"]][1] in KILLED):
                continue
            if m["status"] not in NOT_RUN or m["name"] not in out:
                out[m["name"]] = (m["module"], m["status"])
    return out


def equivalent_mutants(doc: Path) -> set[str]:
    """Mutant names in the first column of the docs' tables (only the equivalent-mutants table has them)."""
    names = set()
    for line in doc.read_text().splitlines() if doc.is_file() else []:
        m = re.match(r"^\|\s*`([^`]+__mutmut_\d+)`", line)
        if m:
            names.add(m.group(1))
    return names


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k / n (95% for z = 1.96)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def score_table(results: dict[str, tuple[str, str]], equivalent: set[str], sampled: frozenset = frozenset()) -> str:
    counts: dict[str, Counter] = defaultdict(Counter)
    for name, (module, status) in results.items():
        c = counts[module.replace(".", "/") + ".py"]
        if status in NOT_RUN:
            c["not run"] += 1
        elif name in equivalent:
            c["equivalent"] += 1
        elif status in KILLED:
            c["killed"] += 1
        else:
            c["alive"] += 1
    rows = ["| file | mutants run | killed | equivalent | not killed | not run | score (killed / non-equivalent) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    total = Counter()
    for f in sorted(counts):
        c = counts[f]
        total.update(c)
        rows.append(_row(f, c, sampled=f in sampled))
    rows.append(_row("**all**", total))
    return "\n".join(rows)


def _row(name: str, c: Counter, sampled: bool = False) -> str:
    n = c["killed"] + c["equivalent"] + c["alive"]
    denom = c["killed"] + c["alive"]
    score = f"{100 * c['killed'] / denom:.1f}%" if denom else "-"
    if sampled and denom:
        lo, hi = wilson_interval(c["killed"], denom)
        score += f" (random sample; 95% interval {100 * lo:.1f}-{100 * hi:.1f}%)"
    return f"| {name} | {n} | {c['killed']} | {c['equivalent']} | {c['alive']} | {c['not run']} | {score} |"


def main(argv: list[str]) -> int:
    sampled = set()
    while len(argv) >= 2 and argv[0] == "--sampled":
        sampled.add(argv[1])
        argv = argv[2:]
    *results, doc = [Path(a) for a in argv]
    table = score_table(read_results(results), equivalent_mutants(doc), frozenset(sampled))
    print(table)
    if doc.is_file():
        text = doc.read_text()
        if START in text and END in text:
            head, rest = text.split(START, 1)
            _, tail = rest.split(END, 1)
            doc.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
