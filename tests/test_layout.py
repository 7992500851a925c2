"""The package layout (docs/design.md): every module says what it owns, no import cycles, package
`__init__` files re-export nothing, and every entry point the README and docs name still runs.
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p for p in (ROOT / "moe").rglob("*.py"))


def _name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The moe modules `path` imports (anywhere in the file, lazy imports included)."""
    names = {_name(p) for p in MODULES}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            cands = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {c for c in cands if c in names and c.startswith("moe.")}
    return out


def test_every_module_has_a_docstring_saying_what_it_owns():
    missing = [str(p.relative_to(ROOT)) for p in MODULES
               if p.name != "__main__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing


def test_package_inits_hold_only_a_docstring():
    for p in MODULES:
        if p.name == "__init__.py":
            body = ast.parse(p.read_text()).body
            assert len(body) == 1 and isinstance(body[0], ast.Expr), f"{p}: re-exports or code in __init__"


def test_no_import_cycles():
    graph = {_name(p): _imports(p) - {_name(p)} for p in MODULES}
    graph = {k: {d for d in v if not k.startswith(d + ".")} for k, v in graph.items()}  # a package's own __init__
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])


def _documented_entry_points() -> list[str]:
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    return sorted(set(re.findall(r"python -m (moe[\w.]*)", text)))


def test_readme_names_the_entry_points():
    assert {"moe.bench", "moe.launch", "moe.scaling"} <= set(_documented_entry_points())


def test_readme_config_reference_is_the_schema():
    """README's config reference block is `moe.config.help_text()` verbatim (what `train.py --help` prints)."""
    from moe.config import help_text

    text = (ROOT / "README.md").read_text()
    block = text.split("### Config reference", 1)[1].split("```\n", 2)[1]
    assert block == help_text().rstrip("\n") + "\n"


@pytest.mark.parametrize("command", [["-m", m] for m in _documented_entry_points()] + [["train.py"], ["eval.py"]],
                         ids=lambda c: " ".join(c))
def test_documented_command_runs_help(command):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


def test_importing_the_adapter_registers_moe_with_lm_eval():
    out = subprocess.run([sys.executable, "-c", "import moe.lm_eval_adapter\n"
                          "from lm_eval.api.registry import get_model\nprint(get_model('moe').__name__)"],
                         cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "MoeLM", out.stderr[-2000:]


def test_no_single_letter_module_aliases():
    """`D.capacity` reads as "model width" (the shape key): modules are imported under their own names."""
    pattern = re.compile(r"^\s*(from moe\S* import \S+|import moe\S*) as [A-Z][A-Z]?\s*$", re.M)
    files = [*MODULES, *(ROOT / "tests").rglob("*.py"), ROOT / "train.py", ROOT / "eval.py"]
    hits = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in files for m in pattern.finditer(p.read_text())]
    assert not hits, hits
