"""What the ingress records of every request: Ray Serve custom metrics (`ServeMetrics`: requests, refusals, tokens,
latency by module set, versions and tenant; exported through Ray's Prometheus endpoint) and the audit trail (one
JSON line per request, `audit_logger` / `audit_record`). The ingress deployment itself is
pipelines/serve/ingress.py (docs/serving.md)."""

import logging
import os
import sys
from pathlib import Path
from typing import Any

AUDIT_LOGGER = "mosaic.audit"
LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
METRIC_TAGS = ("modules", "module_versions", "tenant")


class ServeMetrics:
    """Ray Serve custom metrics (`ray.serve.metrics`), exported through Ray's own Prometheus endpoint (prefixed
    `ray_`; Serve adds application/deployment/replica tags). Labels: the active module set (`alcohol+betting`,
    `none`), its versions (`alcohol=3,betting=2`) and the tenant (`open` without tenants)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter(
            "mosaic_requests", description="Chat completion requests, by HTTP status.", tag_keys=(*METRIC_TAGS, "status")
        )
        self.refusals = Counter(
            "mosaic_refusals", description="Answers that start with the refusal template.", tag_keys=METRIC_TAGS
        )
        self.tokens = Counter(
            "mosaic_tokens", description="Tokens: prompt, control (module) and completion.", tag_keys=(*METRIC_TAGS, "kind")
        )
        self.latency = Histogram(
            "mosaic_request_latency_s",
            description="Seconds from request to last byte of the answer.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=METRIC_TAGS,
        )

    def observe(self, rec: dict[str, Any]) -> None:
        tags = metric_tags(rec)
        self.requests.inc(tags={**tags, "status": str(rec["status"])})
        self.latency.observe(rec["latency_s"], tags=tags)
        if rec.get("refused"):
            self.refusals.inc(tags=tags)
        for kind in ("prompt", "control", "completion"):
            if rec.get(f"{kind}_tokens"):
                self.tokens.inc(rec[f"{kind}_tokens"], tags={**tags, "kind": kind})


def metric_tags(rec: dict[str, Any]) -> dict[str, str]:
    active = rec.get("active_modules") or []
    versions = rec.get("module_versions") or {}
    return {
        "modules": "+".join(active) or "none",
        "module_versions": ",".join(f"{c}={versions[c]}" for c in active if c in versions) or "none",
        "tenant": rec.get("tenant") or "open",
    }


def audit_logger(destination: str | None, max_bytes: int = 64 << 20, backups: int = 10) -> logging.Logger | None:
    """The audit trail's logger: JSON lines to stdout, or to `<dir>/audit-<pid>.jsonl` (one file per ingress replica
    process, rotated by RotatingFileHandler); None when off."""
    if destination in (None, "", "off"):
        return None
    from logging.handlers import RotatingFileHandler

    log = logging.getLogger(f"{AUDIT_LOGGER}.{os.getpid()}")
    log.setLevel(logging.INFO)
    log.propagate = False  # not into Serve's replica log format: the line must stay pure JSON
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    if destination == "stdout":
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
    else:
        folder = Path(destination)
        folder.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(
            folder / f"audit-{os.getpid()}.jsonl", maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    return log


def audit_record(rec: dict[str, Any], with_prompts: bool) -> dict[str, Any]:
    """The audit line of a finished request: who, which modules (requested, forced, active, versions), refused or
    not, token counts, latency, status; messages and answer only `with_prompts`."""
    keys = (
        "time",
        "request_id",
        "tenant",
        "model",
        "profile",
        "requested_modules",
        "forced_modules",
        "active_modules",
        "inserted_modules",
        "module_versions",
        "refused",
        "prompt_tokens",
        "control_tokens",
        "completion_tokens",
        "finish_reason",
        "latency_s",
        "status",
        "error_code",
        "stream",
    )
    out = {k: rec.get(k) for k in keys}
    if with_prompts:
        out["messages"], out["answer"] = rec.get("messages"), rec.get("answer")
    return out
