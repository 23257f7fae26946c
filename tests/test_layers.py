"""The package's layering, read from the source: a newcomer finds each concern in one place, and the
lower layers never reach up into the stages built on them.

    foundations  errors, vocab, prompts, records, imaging, jobs, llm,  (import only each other)
                 samples, volume_facts
    core         model, data                                           (data may use model)
    stages       synth, curate, generate, quality, train, eval, serve  (no stage imports another)
    entry points cli, quickstart                                       (may use anything)

Every import counts, including those inside functions (they run all the same)."""

from __future__ import annotations

import ast
from pathlib import Path

import medvl

ROOT = Path(medvl.__file__).resolve().parent
FOUNDATIONS = {"errors", "vocab", "prompts", "records", "imaging", "jobs", "llm", "samples", "volume_facts"}
CORE = {"model", "data"}
STAGES = {"synth", "curate", "generate", "quality", "train", "eval", "serve"}
ENTRY = {"cli", "quickstart", "__init__"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The medvl modules a file imports (absolute or relative), by module name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "medvl"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "medvl":
                continue
            found.add(mod)
            # `from medvl.x import y` may name a submodule y
            found |= {f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")}
    return {m for m in found if _is_module(m)}


def _is_module(name: str) -> bool:
    p = ROOT.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    files = sorted(ROOT.rglob("*.py"))
    return {module_name(f): imports_of(f) - {module_name(f)} for f in files}


def allowed(src: str, dst: str) -> bool:
    a, b = part_of(src), part_of(dst)
    if a == b or b == "__init__" and dst == "medvl":
        return True
    if a in FOUNDATIONS:
        return b in FOUNDATIONS
    if a in CORE:
        return b in FOUNDATIONS or (a, b) == ("data", "model")
    if a in STAGES:
        return b in FOUNDATIONS or b in CORE
    return True  # entry points


def test_every_package_folder_has_a_layer():
    folders = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert folders | modules <= FOUNDATIONS | CORE | STAGES | ENTRY, (
        (folders | modules) - (FOUNDATIONS | CORE | STAGES | ENTRY)
    )


def test_no_import_reaches_up_or_across_stages():
    bad = [
        f"{src} imports {dst}"
        for src, dsts in graph().items()
        for dst in sorted(dsts)
        if not allowed(src, dst)
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    # A package's __init__ re-exporting its own modules is not a cycle of concerns.
    g = {s: {d for d in ds if not (_is_package(s) and d.rpartition(".")[0] == s)} for s, ds in g.items()}
    cycles: list[str] = []
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:  # depth-first; an edge back to an open node closes a cycle
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*path[path.index(nxt) :], node, nxt]))
            elif nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for n in sorted(g):
        if n not in state:
            visit(n, [])
    assert not cycles, "\n".join(cycles)


def _is_package(name: str) -> bool:
    return (ROOT.parent.joinpath(*name.split(".")) / "__init__.py").is_file()


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    # A control: the checks above would pass vacuously if imports were missed.
    g = graph()
    assert "medvl.model.build" in g["medvl.data.conversations"]
    assert any(d.startswith("medvl.curate") for d in g["medvl.cli"])
    assert not allowed("medvl.model.build", "medvl.train.loop")
    assert not allowed("medvl.imaging", "medvl.data.packing")
