"""`mosaic serve ...` == `python -m pipelines.serve ...`: start Ray (local, or $RAY_ADDRESS) and Serve with the app,
block until Ctrl-C / SIGTERM, then drain the ingress and stop Serve and Ray within a bound (docs/serving.md)."""

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ray import serve

from mosaic_core.backbone import EMBEDDED
from pipelines.serve.app import build_app
from pipelines.serve.settings import APP_NAME, ENV_MODULES, ServeArgs
from pipelines.serve.tenants import ENV_TENANTS_FILE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mosaic serve",
        description="Serve composable safety modules behind an "
        "OpenAI-compatible endpoint (Ray Serve). Blocks until Ctrl-C / SIGTERM.",
    )
    p.add_argument("--backbone", default=EMBEDDED, help=f"HF id, local dir, or {EMBEDDED!r} (default)")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--modules", default=None, help=f"comma-separated module URIs or categories (registry; default: ${ENV_MODULES})"
    )
    src.add_argument("--bank", default=None, help="a local bank directory instead of the registry")
    p.add_argument("--alias", default=None, help="registry alias for bare categories (default production)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    p.add_argument("--tenants-file", default=None, help=f"tenants JSON/YAML (default ${ENV_TENANTS_FILE}); none: open")
    p.add_argument("--poll-interval", type=float, default=None, help="re-resolve aliases every N seconds")
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=None, help="torch threads per backbone replica")
    p.add_argument("--num-cpus", type=float, default=None, help="Ray CPUs per backbone replica")
    p.add_argument("--args", default=None, help="a YAML/JSON file of build_app args (flags override it)")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=None,
        help="on SIGTERM/SIGINT: stop accepting, let "
        "requests in flight finish, cancel the rest with an error, and exit within this many seconds "
        "(default 30)",
    )
    p.add_argument(
        "--audit-log",
        default=None,
        help="audit trail, one JSON line per request: 'stdout' (default; "
        "the ingress replica's log), a directory (audit-<pid>.jsonl per replica process, rotated) "
        "or 'off'",
    )
    p.add_argument(
        "--audit-prompts",
        action="store_true",
        default=None,
        help="also write messages and answers into the audit log (off by default)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="port of Ray's Prometheus metrics endpoint on "
        "127.0.0.1 (default: a free one, printed at start; ignored with $RAY_ADDRESS)",
    )
    return p


SHUTDOWN_RESERVE_S = 10.0
"""Of the shutdown bound, what stopping Serve and Ray takes (measured 4-9 s on the 2-core box); the rest is drain."""


def _descendants(pid: int) -> set[int]:
    """Live descendants of `pid` (Ray's gcs/raylet/workers under this driver), from /proc; empty where there is none."""
    children: dict[int, set[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), set()).add(int(stat.parent.name))
    out: set[int] = set()
    todo = list(children.get(pid, ()))
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, ())
    return out


def _force_exit(bound: float) -> None:
    """The shutdown bound passed: kill what this process started (by PID) and exit non-zero."""
    print(f"mosaic serve: shutdown did not finish within {bound:.0f}s; killing its own processes", file=sys.stderr, flush=True)
    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    os._exit(1)


def graceful_shutdown(bound_s: float, *, own_ray: bool) -> dict[str, Any]:
    """Drain the ingress (finish or cancel what is in flight), then stop Serve and, when this process started it,
    Ray -- all within `bound_s` (a watchdog enforces it)."""
    import ray

    t0 = time.monotonic()
    watchdog = threading.Timer(max(1.0, bound_s - 0.5), _force_exit, args=(bound_s,))
    watchdog.daemon = True
    watchdog.start()
    drain_s = max(0.5, bound_s - SHUTDOWN_RESERVE_S)
    report: dict[str, Any] = {}
    try:
        try:
            report = serve.get_app_handle(APP_NAME).drain.remote(drain_s).result(timeout_s=drain_s + 5)
            time.sleep(0.5)  # the proxy still has the last bytes of the answers to send
        except Exception as e:
            report = {"drain_error": f"{type(e).__name__}: {e}"}
        print(f"mosaic serve: drained {report} in {time.monotonic() - t0:.1f}s; stopping Serve", file=sys.stderr, flush=True)
        serve.shutdown()
        if own_ray:
            ray.shutdown()
    finally:
        watchdog.cancel()
    report["seconds"] = round(time.monotonic() - t0, 2)
    return report


def cli(argv: list[str]) -> None:
    """`mosaic serve ...`: start Ray (local, or $RAY_ADDRESS) + Serve on host:port, block until Ctrl-C / SIGTERM,
    then shut Serve down cleanly. MosaicErrors propagate (pipelines/cli.py prints them, exit 2)."""
    a = build_parser().parse_args(argv)
    args: dict[str, Any] = {}
    if a.args:
        import yaml

        args = yaml.safe_load(Path(a.args).read_text()) or {}
    flags = {
        "backbone": a.backbone if a.backbone != EMBEDDED or "backbone" not in args else None,
        "modules": [m.strip() for m in a.modules.split(",") if m.strip()] if a.modules else None,
        "bank_dir": a.bank,
        "alias": a.alias,
        "tracking_uri": a.tracking_uri,
        "tenants_file": a.tenants_file,
        "poll_interval_s": a.poll_interval,
        "threads": a.threads,
        "num_cpus": a.num_cpus,
        "shutdown_timeout_s": a.shutdown_timeout,
        "audit_log": a.audit_log,
        "audit_prompts": a.audit_prompts,
    }
    args.update({k: v for k, v in flags.items() if v is not None})
    app = build_app(args)  # validate before starting anything
    cfg = ServeArgs.from_args(args)

    import ray

    own_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        kw: dict[str, Any] = {"address": address} if address else {"address": "local", "include_dashboard": False}
        if not address and a.metrics_port:
            kw["_metrics_export_port"] = a.metrics_port
        try:
            ray.init(**kw, runtime_env={"worker_process_setup_hook": "pipelines._loopback.install"}, log_to_driver=False)
        except Exception:
            ray.shutdown()  # a node that failed to start may have started some of its processes
            raise
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            print(f"mosaic serve: already shutting down (within {cfg.shutdown_timeout_s:.0f}s)", file=sys.stderr, flush=True)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    started = False
    try:
        serve.start(http_options={"host": a.host, "port": a.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        started = True
        node = getattr(ray._private.worker.global_worker, "node", None)  # None when connected to a cluster
        metrics = f"; Prometheus metrics at http://127.0.0.1:{node.metrics_export_port}/metrics" if node else ""
        print(
            f"mosaic serve: OpenAI-compatible endpoint at http://{a.host}:{a.port}/v1 "
            f"(model {cfg.served_name()!r}){metrics}; Ctrl-C to stop",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print(f"mosaic serve: shutting down (bound {cfg.shutdown_timeout_s:.0f}s)", file=sys.stderr, flush=True)
        graceful_shutdown(cfg.shutdown_timeout_s, own_ray=own_ray)
    finally:
        if not started:  # failed to start: still release what was started
            try:
                serve.shutdown()
            finally:
                if own_ray:
                    ray.shutdown()
        for s, h in previous.items():
            signal.signal(s, h)
