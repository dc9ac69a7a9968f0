"""dvc.yaml's deps follow the code: each stage lists exactly the package modules its script
imports, directly or through other modules (imports inside functions count: they run too)."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from kneexray import baselines`
    return names


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in ("kneexray", "stages"):
        return None
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def import_closure(script: Path) -> set[str]:
    """Repository-relative paths of every project module that `script` imports, itself included."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            found = _module_file(name)
            if found is not None:
                todo.append(found)
                # importing kneexray.data.x runs kneexray/__init__.py and kneexray/data/__init__.py first
                for folder in found.parents:
                    if folder == ROOT:
                        break
                    if (folder / "__init__.py").is_file():
                        todo.append(folder / "__init__.py")
    return {p.relative_to(ROOT).as_posix() for p in seen}


def test_every_stage_lists_exactly_the_modules_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        module = stage["cmd"].split("python -m ")[1].split()[0]
        script = ROOT / (module.replace(".", "/") + ".py")
        wanted = import_closure(script) - {"stages/__init__.py"}
        listed = {d for d in stage["deps"] if d.endswith(".py")}
        if wanted - listed:
            problems.append(f"{name} misses {sorted(wanted - listed)}")
        if listed - wanted:
            problems.append(f"{name} lists modules it does not import: {sorted(listed - wanted)}")
    assert not problems, "; ".join(problems)


def test_the_closure_follows_imports_inside_functions(tmp_path):
    # stages/train.py imports kneexray.model.training inside main(): the closure must still hold it
    assert "kneexray/model/training.py" in import_closure(ROOT / "stages/train.py")
