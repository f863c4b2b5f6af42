import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

HEAVY = {"ray", "mlflow", "fastapi", "deepspeed"}
CORE = Path(__file__).resolve().parents[2] / "mosaic_core"

LAYERS = (
    ("config",),
    ("bank",),
    ("template",),
    ("kv",),
    ("cache",),
    ("batch",),
    ("init", "losses"),
    ("training", "scoring"),
)
"""The core's layers, lowest first (docs/architecture.md, "Core layers"): a module may import from its own layer's
modules and from lower layers only."""


def test_core_imports_no_heavy_frameworks():
    modules = ", ".join(f"mosaic_core.{p.stem}" for p in sorted(CORE.glob("*.py")) if p.stem != "__init__")
    code = f"import sys, mosaic_core, {modules}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {HEAVY!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def _import_graph() -> dict[str, set[str]]:
    """mosaic_core module -> the mosaic_core modules it imports anywhere: at the top, lazily inside functions, and
    under `if TYPE_CHECKING:` alike (an annotation that needs a higher layer is a dependency all the same)."""
    graph: dict[str, set[str]] = {}
    for path in CORE.glob("*.py"):
        deps = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mosaic_core."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "mosaic_core":
                deps |= {a.name for a in node.names if (CORE / f"{a.name}.py").exists()} or {"__init__"}
            elif isinstance(node, ast.ImportFrom) and node.level:
                deps.add((node.module or "__init__").split(".")[0])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mosaic_core.")}
    return graph


def test_the_core_imports_one_way():
    """mosaic_core's modules form no import cycle, and no layer reaches a higher one, even through a module outside
    the layers: config -> bank -> template -> kv -> cache -> batch -> init/losses -> training/scoring."""
    graph = _import_graph()
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        raise AssertionError(f"import cycle in mosaic_core: {e.args[1]}") from None

    def reach(module: str) -> set[str]:
        seen, todo = set(), [module]
        while todo:
            for dep in graph[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        return seen

    layer = {m: i for i, names in enumerate(LAYERS) for m in names}
    assert set(layer) <= set(graph), f"layers name modules that do not exist: {sorted(set(layer) - set(graph))}"
    upward = {m: sorted(d for d in reach(m) if layer.get(d, -1) > layer[m]) for m in layer}
    assert not any(upward.values()), f"lower layers import higher ones: { {m: d for m, d in upward.items() if d} }"
    # and the layers are a stack, not a list of names: the top reaches every layer below it but init (no training needs
    # a fresh bank's initialisation)
    for top in LAYERS[-1]:
        assert {m for names in LAYERS[:-1] for m in names} - reach(top) == {"init"}, top
