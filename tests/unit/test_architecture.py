"""The shape of the package, checked from its source (ast; nothing is imported).

Rules, over every ``import`` in ``ftcluster/`` (module level and inside functions alike):

(a) no import cycle between ftcluster modules;
(b) no module imports another module's private (``_name``) names, or a private module of
    another package, or reaches one through a module it imported (``api._backend_for``);
(c) the core (everything outside ``ftcluster/train/``) imports neither the training stack
    (torch, transformers, peft, deepspeed, ...) nor ``ftcluster.train``: the launch files run
    ``python -m ftcluster.train.launch`` as a command, they do not import it;
(d) layers: a module imports only modules of its own layer or a lower one (see LAYERS).

The package root (``ftcluster/__init__.py``) defines ``__version__``, which any module may
import, and re-exports the public API lazily in ``__getattr__``: those re-exports run only when
a user touches ``ftcluster.load_spec`` and the like, after the package is loaded, so they are
the top of the house (like the CLI) and are not edges of the graph.

Each test prints every violation it finds, not only the first.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "ftcluster"

# The layers, lowest first. A module may import its own layer and the ones below it. Each layer is
# a folder of ftcluster/ (the few base modules sit at the top, beside api.py and cli.py).
#   base      errors, exit statuses, process liveness: what every layer reports through
#   spec      the job spec: schema, loading, problems, variants, pipelines' loading, secrets, YAML
#   storage   object storage (torch-free), beside the spec: doctor, pipelines and the trainer use it
#   corpus    prepared corpora's format (token shards, manifest), torch-free: the planner counts their
#             tokens, the trainer streams them, prepare-data writes them; uses storage
#   plan      the launch plan compiled from a spec, the payload, the Slurm request, the planner;
#             preflight's rows and path checks
#   train     the training runtime (beside the core: reads payloads, uses storage; nothing in the
#             core imports it, see rule (c))
#   render    sbatch scripts and Kubernetes manifests from a plan; pipelines rendered
#   backends  submitting, watching and cancelling runs (local, slurm with ssh and submitit, kubernetes)
#   api       the Python API, and the doctor (checks across backends)
#   cli       the command line and what it shows
LAYERS: dict[str, int] = {"base": 0, "spec": 1, "storage": 1, "corpus": 1, "plan": 2, "train": 2, "render": 3,
                          "backends": 4, "api": 5, "cli": 6}
LAYER_OF: dict[str, str] = {
    "ftcluster": "base",  # for __version__ only; see the module docstring
    "ftcluster.errors": "base",
    "ftcluster.exitcodes": "base",
    "ftcluster.procs": "base",  # process liveness: the local backend and the training workers share it
    "ftcluster.spec": "spec",
    "ftcluster.storage": "storage",
    "ftcluster.corpus": "corpus",
    "ftcluster.plan": "plan",
    "ftcluster.preflight": "plan",  # the doctor's rows and path checks: backends fill them...
    "ftcluster.preflight.doctor": "api",  # ...and the doctor collects them over the backends
    "ftcluster.artifacts": "plan",  # published adapters/artifacts read back (serving checks), torch-free
    "ftcluster.train": "train",
    "ftcluster.render": "render",
    "ftcluster.backends": "backends",
    "ftcluster.podexec": "backends",  # the pods' entry point under its rendered name (a shim)
    "ftcluster.api": "api",
    "ftcluster.cli": "cli",
    "ftcluster.ui": "cli",
}
HEAVY = {"torch", "transformers", "peft", "deepspeed", "accelerate", "safetensors", "tokenizers", "datasets"}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # an ftcluster module, or a top-level third-party package
    name: str | None  # the name taken from it (``from target import name``), or None
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _lazy_reexports(tree: ast.Module) -> set[int]:
    """Line numbers of the imports inside the package root's ``__getattr__`` (its lazy public API)."""
    lines = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            lines |= {n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip = _lazy_reexports(tree) if module == "ftcluster" else set()
    out: list[Import] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [Import(module, a.name if a.name.startswith("ftcluster") else a.name.split(".")[0], None, node.lineno)
                    for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("ftcluster"):
                out.append(Import(module, target.split(".")[0], None, node.lineno))
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                # `from . import api` imports the module ftcluster.api, not a name of ftcluster
                out.append(Import(module, sub, None, node.lineno) if sub in modules
                           else Import(module, target, alias.name, node.lineno))
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_aliases(tree: ast.Module, module: str, imps: list[Import]) -> dict[str, str]:
    """Local names bound to ftcluster modules (``from . import api`` -> {"api": "ftcluster.api"})."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                hit = [i for i in imps if i.line == node.lineno and i.name is None and i.target.endswith("." + alias.name)]
                if hit:
                    names[alias.asname or alias.name] = hit[0].target
    return names


def layer_of(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYER_OF and (n > 1 or module == "ftcluster"):
            return LAYER_OF[key]
    raise AssertionError(f"{module}: no layer; add it to LAYER_OF in tests/unit/test_architecture.py")


class Graph:
    def __init__(self) -> None:
        self.modules = all_modules()
        self.imports = {m: imports_of(m, p, self.modules) for m, p in self.modules.items()}

    def internal(self, module: str) -> list[Import]:
        return [i for i in self.imports[module] if i.target.startswith("ftcluster") and i.target != module]

    def cycles(self) -> list[list[str]]:
        """Strongly connected components with more than one module (Tarjan), each sorted."""
        edges = {m: sorted({i.target for i in self.internal(m) if i.target in self.modules and
                            not (i.target == "ftcluster" and i.name == "__version__")}) for m in self.modules}
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on: set[str] = set()
        out: list[list[str]] = []

        def visit(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            on.add(v)
            for w in edges[v]:
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

        sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
        for m in self.modules:
            if m not in index:
                visit(m)
        return out

    def violations(self) -> dict[str, list[str]]:
        """Every violation of rules (a)-(d), by the module that holds it."""
        found: dict[str, list[str]] = {m: [] for m in self.modules}
        for comp in self.cycles():
            for m in comp:
                found[m].append(f"(a) import cycle: {' <-> '.join(comp)}")
        for m, path in self.modules.items():
            found[m] += self._private(m, path) + self._heavy(m) + self._layers(m)
        return {m: v for m, v in found.items() if v}

    def _private(self, m: str, path: Path) -> list[str]:
        out = []
        imps = self.internal(m)
        for i in imps:
            if i.name is not None and _private(i.name):
                out.append(f"(b) line {i.line}: imports the private name {i.name} of {i.target}")
            hidden = [p for p in i.target.split(".") if _private(p)]
            owner = i.target.rpartition(".")[0]
            if hidden and not m.startswith(owner + ".") and m != owner:
                out.append(f"(b) line {i.line}: imports the private module {i.target}")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = _module_aliases(tree, m, imps)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and _private(node.attr)):
                out.append(f"(b) line {node.lineno}: uses the private name {node.attr} of {aliases[node.value.id]}")
        return out

    def _heavy(self, m: str) -> list[str]:
        if m == "ftcluster.train" or m.startswith("ftcluster.train."):
            return []
        return [f"(c) line {i.line}: the core imports {i.target}" for i in self.imports[m]
                if i.target in HEAVY or i.target == "ftcluster.train" or i.target.startswith("ftcluster.train.")]

    def _layers(self, m: str) -> list[str]:
        mine = layer_of(m)
        out = []
        for i in self.internal(m):
            if i.target == "ftcluster" and i.name != "__version__":
                out.append(f"(d) line {i.line}: imports {i.name} through the package root's lazy API; import it from "
                           "its own module")
                continue
            theirs = layer_of(i.target)
            if LAYERS[theirs] > LAYERS[mine] or (theirs == "train" and mine != "train"):
                out.append(f"(d) line {i.line}: {mine} module imports {i.target} of the higher layer {theirs}")
        return out


@pytest.fixture(scope="module")
def graph() -> Graph:
    return Graph()


def _report(violations: dict[str, list[str]]) -> str:
    return "\n".join(f"{m}: {v}" for m, vs in sorted(violations.items()) for v in vs)


def test_every_module_has_a_layer(graph):
    missing = []
    for m in graph.modules:
        try:
            layer_of(m)
        except AssertionError as exc:
            missing.append(str(exc))
    assert not missing, "\n".join(missing)


def test_architecture(graph):
    """Rules (a)-(d) hold in every module."""
    bad = graph.violations()
    assert not bad, "architecture violations:\n" + _report(bad)


# The rules themselves, on small made-up packages: a checker that finds nothing proves nothing.


def _fake(tmp_path: Path, files: dict[str, str], monkeypatch) -> Graph:
    for rel, text in files.items():
        p = tmp_path / "ftcluster" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "ftcluster")
    return Graph()


def test_checker_finds_each_kind_of_violation(tmp_path, monkeypatch):
    g = _fake(tmp_path, {
        "__init__.py": "__version__ = '0'\ndef __getattr__(n):\n    from .cli import main\n    return main\n",
        "errors.py": "",
        "spec/__init__.py": "",
        "spec/loader.py": "from .. import __version__\ndef f():\n    from .variants import g\n",
        "spec/variants.py": "from .loader import _helper\n",
        "spec/schema.py": "from ..plan.launch import x\n",
        "plan/__init__.py": "",
        "plan/launch.py": "import torch\n",
        "cli.py": "from . import api\napi._backend_for()\n",
        "api.py": "",
        "train/__init__.py": "",
        "train/runtime.py": "import torch\nfrom ..errors import X\n",
    }, monkeypatch)
    text = _report(g.violations())
    assert "(a) import cycle: ftcluster.spec.loader <-> ftcluster.spec.variants" in text
    assert "ftcluster.spec.variants: (b) line 1: imports the private name _helper of ftcluster.spec.loader" in text
    assert "ftcluster.cli: (b) line 2: uses the private name _backend_for of ftcluster.api" in text
    assert "ftcluster.plan.launch: (c) line 1: the core imports torch" in text
    assert "ftcluster.spec.schema: (d) line 1: spec module imports ftcluster.plan.launch of the higher layer plan" in text
    assert "ftcluster.train" not in text and "ftcluster:" not in text  # train may import torch; lazy re-exports
    assert "ftcluster.spec.loader: (d)" not in text  # __version__ from the package root is allowed
