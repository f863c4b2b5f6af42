import subprocess
import sys

HEAVY = {"ray", "mlflow", "fastapi", "deepspeed"}


def test_core_imports_no_heavy_frameworks():
    modules = (
        "mosaic_core, mosaic_core.backbone, mosaic_core.bank, mosaic_core.compose, mosaic_core.generation, "
        "mosaic_core.losses, mosaic_core.sampling, mosaic_core.judge, mosaic_core.artifact, mosaic_core.scoring, "
        "mosaic_core.dataset, mosaic_core.bundle, mosaic_core.teacher, mosaic_core.training, mosaic_core.scheduler, mosaic_core.cache, mosaic_core.init"
    )
    code = f"import sys, {modules}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {HEAVY!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_the_core_imports_one_way():
    """mosaic_core's modules, lazy imports inside functions included, form no cycle (config -> bank -> compose -> cache
    -> init -> training)."""
    import ast
    from graphlib import CycleError, TopologicalSorter
    from pathlib import Path

    core = Path(__file__).resolve().parents[2] / "mosaic_core"
    graph: dict[str, set[str]] = {}

    def runtime_nodes(node):  # imports under `if TYPE_CHECKING:` never run: annotations only
        yield node
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        for child in ast.iter_child_nodes(node):
            yield from runtime_nodes(child)

    for path in core.glob("*.py"):
        deps = graph.setdefault(path.stem, set())
        for node in runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mosaic_core."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "mosaic_core":
                deps |= {a.name for a in node.names if (core / f"{a.name}.py").exists()} or {"__init__"}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        raise AssertionError(f"import cycle in mosaic_core: {e.args[1]}") from None
    at = order.index
    assert at("config") < at("bank") < at("compose") < at("cache") < at("training") and at("compose") < at("init")
