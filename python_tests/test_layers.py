"""The package imports downward only: data → ops → models → meta → eval → config → app → cli."""
import ast
from pathlib import Path

import s2meta_fast

ROOT = Path(s2meta_fast.__file__).parent
# Rank of each top-level part; a module may import its own rank or lower ones.
LAYERS = {"errors": 0, "fileio": 0, "_extension": 0, "_build_info": 0, "data": 1, "ops": 2, "models": 3, "meta": 4,
          "eval": 5, "plot": 5, "config": 6, "app": 7, "cli": 8, "__main__": 9, "__init__": 9}


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_parts(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]   # e.g. ("s2meta_fast", "meta")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            target = base + (node.module.split(".") if node.module else [])
            # `from .. import data`: the imported names may be the parts themselves
            names = [target] if len(target) > 1 else [target + [alias.name] for alias in node.names]
            for name in names:
                if name[0] == "s2meta_fast" and len(name) > 1:
                    yield node.lineno, name[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name.split(".")
                if name[0] == "s2meta_fast" and len(name) > 1:
                    yield node.lineno, name[1]


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        part = _part(path)
        assert part in LAYERS, f"{path.relative_to(ROOT)}: add its part to LAYERS"
        for line, target in _imported_parts(path):
            if target in LAYERS and LAYERS[target] > LAYERS[part]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports s2meta_fast.{target}")
    assert not upward, "upward imports:\n" + "\n".join(upward)
