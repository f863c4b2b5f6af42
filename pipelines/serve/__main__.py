"""`python -m pipelines.serve ...`: the same as `mosaic serve ...` (pipelines/cli.py calls this package's `cli`)."""

import sys

from mosaic_core.errors import MosaicError
from pipelines.serve.cli import cli

if __name__ == "__main__":  # `python -m pipelines.serve ...`
    try:
        cli(sys.argv[1:])
    except MosaicError as err:
        print(f"mosaic serve: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
