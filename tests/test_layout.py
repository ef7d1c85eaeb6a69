"""Project rules that no single module test can see: the layers point one way
(scratch_sd <- parity <- benchmarks <- sdparity), no import cycles, strict loads."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scratch_sd", "parity", "benchmarks", "sdparity")  # each may import only those before it
SCRATCH_THIRD_PARTY = ("torch", "numpy", "safetensors")  # scratch_sd's only dependencies besides the stdlib
EDGES = {"images.py": ("PIL",)}  # the one scratch_sd module that reads and writes images


def _imports(path: Path):
    """(line, module) of every import in the file, module level or inside a function body; relative
    imports resolved against the file's package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1]) if path.is_relative_to(ROOT) else ""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.module is not None or isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            yield node.lineno, module
            for a in node.names:  # `from parity import gate` imports the module parity.gate
                yield node.lineno, f"{module}.{a.name}"
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            yield node.lineno, str(node.args[0].value)


def _files(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def layer_offenders(package: str, files=None) -> list[str]:
    """Imports in `package` of a package after it in PACKAGES (and, for scratch_sd, of anything but
    the stdlib, torch, numpy and safetensors)."""
    later = PACKAGES[PACKAGES.index(package) + 1:]
    out = []
    for p in files if files is not None else _files(package):
        for line, name in _imports(p):
            top = name.split(".")[0]
            if top in later:
                out.append(f"{p.name}:{line} imports {name}")
            elif package == "scratch_sd" and top not in PACKAGES[:1] + SCRATCH_THIRD_PARTY + EDGES.get(p.name, ()) \
                    and top not in sys.stdlib_module_names and top != "__future__":
                out.append(f"{p.name}:{line} imports {name} (scratch_sd: stdlib, torch, numpy, safetensors only)")
    return out


def test_layers_point_one_way():
    offenders = {pkg: layer_offenders(pkg) for pkg in PACKAGES}
    assert not any(offenders.values()), offenders


def test_the_rule_checker_sees_imports_in_function_bodies(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom diffusers.models import x\nimportlib.import_module('transformers')\n"
                   "def f():\n    import parity.zoo\n    from benchmarks import runner\n")
    names = [n for _, n in _imports(bad)]
    assert "diffusers.models" in names and "transformers" in names and "parity.zoo" in names
    found = layer_offenders("scratch_sd", [bad])
    assert any("parity.zoo" in o for o in found) and any("diffusers" in o for o in found)
    assert any("benchmarks" in o for o in found) and not any("imports os" in o for o in found)
    assert any("benchmarks" in o for o in layer_offenders("parity", [bad]))


def _module_name(p: Path) -> str:
    parts = p.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles_between_project_modules():
    """Counting imports inside functions too: a cycle hidden in a function body is still a cycle."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in _files(pkg)}
    graph = {m: sorted({n for _, n in _imports(p) if n in modules and n != m and not m.startswith(n + ".")})
             for m, p in modules.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_torch_load_only_with_weights_only():
    offenders = []
    for p in sorted(ROOT.glob("*/**/*.py")):
        if ".venv" in p.parts:
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" and \
                    getattr(node.func, "value", None) is not None and getattr(node.func.value, "id", "") == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"
