"""The tree shows the architecture: imports flow one way (contract <- stages <- build) and the README's
layout table names only paths that exist."""
from __future__ import annotations

import ast
import glob
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the pipeline packages its modules may import. synth is a data source: it may use the
# contract, and no stage may depend on it. Tools (preview, stats, checks) come after the stages.
ALLOWED = {
    "contract": {"contract"},
    "synth": {"contract", "synth"},
    "scenes": {"contract", "scenes"},
    "shards": {"contract", "scenes", "shards"},
    "tools": {"contract", "scenes", "shards", "tools"},
    "build": {"contract", "scenes", "shards", "tools", "build"},
}
OUTSIDE = ("captions", "model", "train")  # may use the contract and stages, never the build driver


def _package_of(module: str) -> str | None:
    """'pipeline.scenes.nuscenes' -> 'scenes'; 'pipeline.build' -> 'build'; not pipeline -> None."""
    parts = module.split(".")
    if parts[0] != "pipeline" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute module a file imports (function-level imports included), with its line."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "pipeline":  # from pipeline import scenes -> pipeline.scenes
                out += [(node.lineno, f"pipeline.{a.name}") for a in node.names]
    return out


def _py_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_pipeline_module_lives_in_a_stage_package():
    loose = [p.name for p in (ROOT / "pipeline").glob("*.py") if p.name not in ("__init__.py", "build.py")]
    assert loose == [], f"modules outside the stage packages: {loose}"
    for pkg in set(ALLOWED) - {"build"}:
        init = ROOT / "pipeline" / pkg / "__init__.py"
        assert init.exists() and ast.get_docstring(ast.parse(init.read_text())), f"{init} needs a docstring"


def test_imports_flow_from_the_contract_to_the_build():
    bad = []
    for path in _py_files("pipeline"):
        rel = path.relative_to(ROOT / "pipeline")
        own = "build" if rel.parts == ("build.py",) else (rel.parts[0] if len(rel.parts) > 1 else None)
        if own is None:
            continue
        for line, mod in _imports(path):
            dep = _package_of(mod)
            if dep is not None and dep not in ALLOWED[own]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {mod} ({dep})")
    for folder in OUTSIDE:
        for path in _py_files(folder):
            bad += [f"{path.relative_to(ROOT)}:{line} imports {mod}" for line, mod in _imports(path)
                    if _package_of(mod) == "build"]
    assert bad == [], "imports against the stage order:\n" + "\n".join(bad)


def test_the_direction_check_catches_a_backward_import(tmp_path):
    """The walker sees function-level and `from pipeline import x` imports (so the test above can fail)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from pipeline import build\n    import pipeline.shards.write\n")
    assert {_package_of(m) for _, m in _imports(f)} == {None, "build", "shards"}


def _readme_layout_paths() -> list[str]:
    text = (ROOT / "README.md").read_text()
    table = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths = []
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        first = row.split("|")[1]
        paths += re.findall(r"`([^`]+)`", first)
    return paths


def test_readme_layout_table_matches_the_tree():
    paths = _readme_layout_paths()
    assert len(paths) >= 10, paths
    missing = [p for p in paths if not glob.glob(str(ROOT / p.rstrip("/")))]
    assert missing == [], f"README layout names paths that do not exist: {missing}"
    for pkg in ("contract", "scenes", "shards", "tools", "synth"):
        assert any(p.startswith(f"pipeline/{pkg}/") for p in paths), f"README layout lacks pipeline/{pkg}/"


@pytest.mark.parametrize("pkg", ["contract", "scenes", "shards", "tools", "synth"])
def test_stage_packages_have_their_own_idea(pkg):
    """Small modules: none of a stage package's files grows past 450 lines."""
    big = [(p.name, n) for p in _py_files(f"pipeline/{pkg}") if (n := len(p.read_text().splitlines())) > 450]
    assert big == [], big
