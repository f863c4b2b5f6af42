import subprocess
import sys

HEAVY = {"ray", "mlflow", "fastapi", "deepspeed"}


def test_core_imports_no_heavy_frameworks():
    code = (
        "import sys, mosaic_core, mosaic_core.backbone, mosaic_core.bank, mosaic_core.compose, mosaic_core.generation, "
        "mosaic_core.losses, mosaic_core.sampling, mosaic_core.judge, mosaic_core.artifact, mosaic_core.scoring, "
        "mosaic_core.bench, mosaic_core.bundle, mosaic_core.teacher, mosaic_core.training, mosaic_core.scheduler; print(sorted({m.split('.')[0] for m in sys.modules} & %r))" % (HEAVY,)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
