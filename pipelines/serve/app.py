"""The Ray Serve application: `build_app` validates its args at the driver and binds the two deployments
(`import_path: pipelines.serve:build_app`; the package re-exports it)."""

import logging
from pathlib import Path
from typing import Any

from ray.serve import Application

from pipelines.serve.backbone import MosaicBackbone
from pipelines.serve.ingress import MosaicIngress
from pipelines.serve.settings import BackboneSettings, IngressSettings, ServeArgs
from pipelines.serve.tenants import load_tenants

logger = logging.getLogger("ray.serve")  # Serve routes this logger into each replica's log file


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application (`import_path: pipelines.serve:build_app`). Validates everything at the driver."""
    cfg = ServeArgs.from_args(args)
    tenants = load_tenants(cfg.tenants_file, cfg.profiles)
    if not tenants:
        logger.warning("serve: no tenants configured, the endpoint will be open (no API key required)")
    source = cfg.module_source()
    bsettings = BackboneSettings(
        backbone=cfg.backbone,
        threads=cfg.threads,
        max_batch_size=cfg.max_batch_size,
        max_queued_requests=cfg.max_queued_requests,
        retry_after_s=cfg.retry_after_s,
        default_max_tokens=cfg.default_max_tokens,
        max_context_tokens=cfg.max_context_tokens,
    )
    audit_log = cfg.audit_log
    if audit_log not in (None, "off", "stdout"):
        audit_log = str(Path(audit_log).expanduser().resolve())  # absolute here: replicas run elsewhere
    isettings = IngressSettings(
        model_name=cfg.served_name(),
        profiles=cfg.profiles,
        tenants=tenants,
        max_tokens_limit=cfg.max_tokens_limit,
        default_temperature=cfg.default_temperature,
        retry_after_s=cfg.retry_after_s,
        audit_log=audit_log,
        audit_prompts=cfg.audit_prompts,
        audit_max_bytes=cfg.audit_max_bytes,
        audit_backup_count=cfg.audit_backup_count,
        refusal_template=cfg.refusal_template,
    )
    # The replica's own queue (max_queued_requests) is the one that pushes back, with a 429 at once: Serve may hand it
    # twice what it can hold, so Serve's router never has to refuse and retry a request (the extra ones get that 429).
    capacity = cfg.max_batch_size + cfg.max_queued_requests
    backbone = MosaicBackbone.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=2 * capacity,
        max_queued_requests=capacity,
        user_config=source.model_dump(),
        backpressure_config={"status_code": 429, "retry_after_s": cfg.retry_after_s},
        ray_actor_options={"num_cpus": cfg.num_cpus},
        health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=max(30.0, 2 * cfg.health_check_period_s),
        graceful_shutdown_timeout_s=cfg.shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
    ).bind(bsettings.model_dump())
    # The ingress is cheap and async: let it hold every request the backbone could hold or queue, so the backbone's
    # bounded queue (-> 429 with our error body) is the one that pushes back.
    headroom = 4 * capacity * cfg.num_replicas
    return MosaicIngress.options(
        max_ongoing_requests=headroom,
        max_queued_requests=headroom,
        ray_actor_options={"num_cpus": 0},
        backpressure_config={"status_code": 429, "retry_after_s": cfg.retry_after_s},
        graceful_shutdown_timeout_s=cfg.shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
    ).bind(backbone, isettings.model_dump())
