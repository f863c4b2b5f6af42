"""The pipeline stages (`mosaic data | train | eval | modules | serve | run`), one file each, on mosaic_core.

The process environment every stage needs is set here, once: each stage, the CLI and the Serve app import this
package before anything imports Ray.
"""

import os

# Ray's node IP becomes 127.0.0.1 and its core sockets bind loopback (the two servers that ignore this are bound by
# pipelines._loopback); no usage statistics leave the machine.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# tokenizers' thread pool does not survive the fork of a Ray worker (it warns, then turns itself off); MLflow's upload
# bars would interleave with the stages' own progress lines.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
