"""The ingress deployment (FastAPI): OpenAI chat completions (plain and SSE streaming), `/v1/models`, `/v1/modules`,
`/v1/profiles`, `/healthz`; tenants, module policy and the one error shape; Ray Serve metrics and one audit JSON line
per request (recorded by pipelines/serve/observability.py); the drain of a graceful shutdown (docs/serving.md)."""

# No `from __future__ import annotations` here: Serve ships the ingress class to its replica by value, and FastAPI
# must resolve the route annotations there; string annotations would point at names cloudpickle did not carry.

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.serve.errors import (
    ApiError,
    ErrorBody,
    InternalError,
    InvalidRequest,
    NotFound,
    Overloaded,
    Unavailable,
    _error_payload,
    _error_response,
    _validation_error,
)
from pipelines.serve.observability import ServeMetrics, audit_logger, audit_record
from pipelines.serve.schema import ChatCompletionRequest, RowRequest, RowResult, StreamEvent
from pipelines.serve.settings import INGRESS_DEPLOYMENT, IngressSettings
from pipelines.serve.tenants import TenantPolicy, authenticate, effective_modules

logger = logging.getLogger("ray.serve")  # Serve routes this logger into each replica's log file


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


# --------------------------------------------------------------------------------------------- ingress deployment


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class MosaicIngress:
    """OpenAI-compatible HTTP front: auth, module policy, validation, and the one error shape."""

    def __init__(self, backbone: DeploymentHandle, settings: dict[str, Any]) -> None:
        from pipelines import _loopback

        _loopback.install()  # this replica's internal gRPC server too
        self.backbone = backbone
        self.settings = IngressSettings.model_validate(settings)
        self.tenants = {d: t for t in self.settings.tenants for d in t.key_sha256}
        from mosaic_core.judge import TemplateJudge

        self.refusal = TemplateJudge(self.settings.refusal_template)
        self.metrics = ServeMetrics()
        self.audit = audit_logger(self.settings.audit_log, self.settings.audit_max_bytes, self.settings.audit_backup_count)
        # Graceful shutdown (drain): requests in flight, refuse new ones, cancel the rest at the deadline.
        self.in_flight, self.draining, self.abort = 0, False, asyncio.Event()
        if not self.tenants:
            logger.warning(
                "no tenants configured (MOSAIC_TENANTS_FILE / MOSAIC_TENANTS): the endpoint is OPEN, "
                "no API key is required and no module is mandatory"
            )

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Built on the replica after __init__ (late-bound ingress): nothing is constructed at import time."""
        app = FastAPI(title="MOSAIC", description="OpenAI-compatible chat with composable safety modules")

        async def api_error(_: Request, exc: ApiError) -> JSONResponse:
            return _error_response(exc)

        async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            err = _validation_error(exc)
            if request.url.path.endswith("/chat/completions"):  # audited like every other request
                self.finish(self.begin(None), error=err)
            return _error_response(err)

        async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
            cls = NotFound if exc.status_code == 404 else InvalidRequest
            err = cls(str(exc.detail), code="not_found" if exc.status_code == 404 else None)
            err.status = exc.status_code
            return _error_response(err)

        async def crashed(_: Request, exc: Exception) -> JSONResponse:  # still one shape; Starlette logs the traceback
            return _error_response(InternalError(f"internal error: {type(exc).__name__}", code="internal_error"))

        app.add_exception_handler(ApiError, api_error)
        app.add_exception_handler(RequestValidationError, invalid)
        app.add_exception_handler(StarletteHTTPException, http_error)
        app.add_exception_handler(Exception, crashed)

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatCompletionRequest, authorization: str | None = Header(None)) -> Any:
            rec = self.begin(body)
            streaming = False
            self.in_flight += 1
            try:
                if self.draining:
                    raise Unavailable(
                        "the server is shutting down; retry on another replica",
                        code="shutting_down",
                        retry_after_s=self.settings.retry_after_s,
                    )
                tenant = self.authenticate(authorization)
                rec["tenant"] = tenant.name if tenant else None
                response = await self.chat(body, tenant, rec)
                streaming = isinstance(response, StreamingResponse)  # its generator finishes the record
                if not streaming:
                    self.finish(rec)
                return response
            except ApiError as e:
                self.finish(rec, error=e)
                raise
            except Exception as e:
                self.finish(rec, error=InternalError(f"internal error: {type(e).__name__}", code="internal_error"))
                raise
            finally:
                if not streaming:
                    self.in_flight -= 1

        @app.get("/v1/models")
        async def models(authorization: str | None = Header(None)) -> dict[str, Any]:
            self.authenticate(authorization)
            return {
                "object": "list",
                "data": [{"id": self.settings.model_name, "object": "model", "created": 0, "owned_by": "mosaic"}],
            }

        @app.get("/v1/modules")
        async def modules(authorization: str | None = Header(None)) -> dict[str, Any]:
            tenant = self.authenticate(authorization)
            info = await self.call(self.backbone.modules.remote())
            data = [{"id": m["category"], "object": "safety_module", **m} for m in info.pop("modules")]
            return {"object": "list", "data": data, **info, "mandatory_modules": list(tenant.mandatory_modules) if tenant else []}

        @app.get("/v1/profiles")
        async def profiles(authorization: str | None = Header(None)) -> dict[str, Any]:
            tenant = self.authenticate(authorization)
            allowed = tenant.allowed_profiles if tenant and tenant.allowed_profiles is not None else None
            return {
                "object": "list",
                "data": [
                    {"id": k, "object": "safety_profile", "modules": v, "allowed": allowed is None or k in allowed}
                    for k, v in self.settings.profiles.items()
                ],
            }

        @app.get("/healthz")
        async def healthz() -> dict[str, Any]:
            if self.draining:
                raise Unavailable("shutting down", code="shutting_down", retry_after_s=self.settings.retry_after_s)
            try:
                health = await asyncio.wait_for(self.call(self.backbone.health.remote()), timeout=10)
            except (TimeoutError, ApiError) as e:
                raise Unavailable(
                    f"backbone not ready: {getattr(e, 'message', 'timed out')}", code="not_ready", retry_after_s=1.0
                ) from None
            if health.get("status") != "ok":
                raise Unavailable("backbone is loading its modules", code="not_ready", retry_after_s=1.0)
            return health

        return app

    # ----------------------------------------------------------------------------------------- policy

    def authenticate(self, authorization: str | None) -> TenantPolicy | None:
        return authenticate(self.tenants, authorization)

    def effective_modules(self, body: ChatCompletionRequest, tenant: TenantPolicy | None) -> tuple[list[str], list[str]]:
        return effective_modules(self.settings.profiles, body, tenant)

    def row(self, body: ChatCompletionRequest, active: list[str]) -> RowRequest:
        """Validate what pydantic cannot (needs config or cross-field rules) and build the backbone's row."""
        if body.model != self.settings.model_name:
            raise NotFound(
                f"model {body.model!r} does not exist; this server serves {self.settings.model_name!r}",
                param="model",
                code="model_not_found",
            )
        limit = self.settings.max_tokens_limit
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is not None and max_tokens > limit:
            raise InvalidRequest(f"max_tokens {max_tokens} is out of range: 1..{limit}", param="max_tokens", code="invalid_value")
        unsupported = {
            "n": body.n != 1,
            "logprobs": bool(body.logprobs),
            "presence_penalty": bool(body.presence_penalty),
            "frequency_penalty": bool(body.frequency_penalty),
        }
        for name, bad in unsupported.items():
            if bad:
                raise InvalidRequest(f"{name} is not supported by this server", param=name, code="unsupported_parameter")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if messages[-1]["role"] != "user":
            raise InvalidRequest("the last message must come from the user", param="messages", code="invalid_value")
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            raise InvalidRequest("messages contain no user text", param="messages", code="invalid_value")
        temperature = body.temperature if body.temperature is not None else self.settings.default_temperature
        return RowRequest(
            messages=messages,
            active=active,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=body.top_p if body.top_p is not None else 1.0,
            seed=body.seed,
            stop=list(body.stop or []),
            ignore_eos=body.ignore_eos,
        )

    # ----------------------------------------------------------------------------------------- audit, drain

    def begin(self, body: ChatCompletionRequest | None) -> dict[str, Any]:
        """A request's audit record, filled in as it goes and written once by `finish`."""
        return {
            "request_id": f"chatcmpl-{uuid.uuid4().hex}",
            "t0": time.monotonic(),
            "tenant": None,
            "model": body.model if body else None,
            "profile": body.safety_profile if body else None,
            "requested_modules": list(body.safety_modules or []) if body else [],
            "forced_modules": [],
            "active_modules": [],
            "inserted_modules": [],
            "module_versions": {},
            "refused": None,
            "prompt_tokens": 0,
            "control_tokens": 0,
            "completion_tokens": 0,
            "finish_reason": None,
            "status": None,
            "error_code": None,
            "stream": bool(body and body.stream),
            "answer": None,
            "messages": [m.model_dump(exclude_none=True) for m in body.messages] if body else None,
        }

    def record_result(self, rec: dict[str, Any], result: RowResult) -> None:
        rec.update(
            active_modules=list(result.active_modules),
            inserted_modules=list(result.inserted_modules),
            module_versions=dict(result.module_versions),
            prompt_tokens=result.prompt_tokens,
            control_tokens=result.control_tokens,
        )
        if result.error is None:
            rec.update(
                completion_tokens=result.completion_tokens,
                finish_reason=result.finish_reason,
                answer=result.text,
                refused=self.refusal.is_refusal("", result.text),
            )

    def finish(self, rec: dict[str, Any], error: ApiError | ErrorBody | None = None) -> None:
        """Close a request's record: one audit line, the metrics. Never raises (observability must not fail a request)."""
        if rec.get("status") is not None:
            return  # already written
        try:
            rec["latency_s"] = round(time.monotonic() - rec["t0"], 4)
            rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
            rec["status"] = error.status if error is not None else 200
            if error is not None:
                rec["error_code"] = error.code or error.type
            self.metrics.observe(rec)
            if self.audit is not None:
                self.audit.info(
                    json.dumps(audit_record(rec, self.settings.audit_prompts), ensure_ascii=False, separators=(",", ":"))
                )
        except Exception:
            logger.exception("writing the audit record / metrics failed")

    async def drain(self, timeout_s: float, grace_s: float = 3.0) -> dict[str, int]:
        """Stop taking requests (503 `shutting_down`, /healthz 503), let those in flight finish for up to
        `timeout_s`, then cancel what is left: each of those gets an error (in-band for streams), never silence."""
        loop = asyncio.get_running_loop()
        self.draining, start, at_start = True, loop.time(), self.in_flight
        logger.info("draining: %d request(s) in flight, up to %.1fs", at_start, timeout_s)
        while self.in_flight > 0 and loop.time() - start < timeout_s:
            await asyncio.sleep(0.05)
        cancelled = self.in_flight
        if cancelled:
            self.abort.set()
            t = loop.time()
            while self.in_flight > 0 and loop.time() - t < grace_s:
                await asyncio.sleep(0.05)
        return {"in_flight": at_start, "cancelled": cancelled, "left": self.in_flight}

    async def _abortable(self, response: Any) -> Any:
        """Await a backbone call unless a drain gives up on it first (then cancel it and raise 503)."""

        async def wait() -> Any:
            return await response

        if not self.abort.is_set():
            task, stopper = asyncio.ensure_future(wait()), asyncio.ensure_future(self.abort.wait())
            try:
                done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:  # the HTTP client went away: cancel the backbone call, freeing its row
                task.cancel()
                _cancel_quietly(response)
                raise
            finally:
                stopper.cancel()
            if task in done:
                return task.result()
            task.cancel()
        if asyncio.iscoroutine(response):
            response.close()  # never started (e.g. a stream's __anext__): nothing to cancel, no "never awaited"
        _cancel_quietly(response)
        raise Unavailable(
            "the server is shutting down: the request was cancelled before it finished",
            code="shutting_down",
            retry_after_s=self.settings.retry_after_s,
        )

    async def call(self, response: Any, cancel_with: Any = None) -> Any:
        """Await a backbone call; Serve's overload and availability failures become 429 / 503."""
        try:
            return await self._abortable(response)
        except Unavailable:
            if cancel_with is not None:  # a stream's __anext__ was abandoned: cancel the stream itself
                try:
                    cancel_with.cancel()
                except Exception:
                    pass
            raise
        except BackPressureError as e:
            raise Overloaded(
                f"the server is busy ({e}); retry shortly", code="queue_full", retry_after_s=self.settings.retry_after_s
            ) from None
        except (DeploymentUnavailableError, ReplicaUnavailableError) as e:
            raise Unavailable(f"backbone unavailable: {e}", code="unavailable", retry_after_s=1.0) from None
        except Exception as e:  # a replica that died mid-request (RayActorError...), restarting
            if type(e).__module__.startswith("ray"):
                raise Unavailable(
                    f"backbone unavailable ({type(e).__name__}); retry shortly", code="unavailable", retry_after_s=1.0
                ) from None
            raise

    # ----------------------------------------------------------------------------------------- chat

    async def chat(self, body: ChatCompletionRequest, tenant: TenantPolicy | None, rec: dict[str, Any]) -> Any:
        active, forced = self.effective_modules(body, tenant)
        rec.update(forced_modules=forced, active_modules=active)
        row = self.row(body, active)
        rid, created = rec["request_id"], int(time.time())
        if not body.stream:
            result: RowResult = await self.call(self.backbone.generate.remote(row))
            self.record_result(rec, result)
            if result.error is not None:
                result.error.raise_()
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": self.settings.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "finish_reason": result.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": _usage(result),
                "mosaic": _mosaic(result, forced, body, tenant),
            }

        events = self.backbone.options(stream=True).stream.remote(row)
        first: StreamEvent = await self.call(events.__anext__(), cancel_with=events)
        if first.kind == "end" and first.result is not None and first.result.error is not None:
            self.record_result(rec, first.result)
            first.result.error.raise_()  # refused before any token: a plain JSON error, not a stream

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.settings.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                **extra,
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def sse() -> AsyncIterator[str]:
            ev: StreamEvent | None = first
            error: ApiError | ErrorBody | None = None
            try:
                try:
                    while ev is not None:
                        if ev.kind == "start" and ev.result is not None:
                            start = _mosaic(ev.result, forced, body, tenant)
                            yield _sse(chunk({"role": "assistant", "content": ""}, mosaic=start))
                        elif ev.kind == "delta" and ev.text:
                            yield _sse(chunk({"content": ev.text}))
                        elif ev.kind == "end" and ev.result is not None:
                            self.record_result(rec, ev.result)
                            if ev.result.error is not None:
                                err = error = ev.result.error
                                yield _sse(_error_payload(err))
                            else:
                                yield _sse(chunk({}, ev.result.finish_reason))
                                if include_usage:  # OpenAI: usage only when asked, once, on a final chunk of its own
                                    yield _sse({**chunk({}), "choices": [], "usage": _usage(ev.result)})
                            break
                        ev = await self.call(events.__anext__(), cancel_with=events)
                except ApiError as e:  # headers are gone: report in-band, as OpenAI does
                    error = e
                    yield _sse(_error_payload(e))
                except StopAsyncIteration:
                    pass
                yield "data: [DONE]\n\n"
            except BaseException as e:  # the client went away (GeneratorExit, cancelled): still audited, released
                error = InternalError(f"stream ended early: {type(e).__name__}", code="client_disconnected")
                error.status = 499
                raise
            finally:
                self.finish(rec, error=error)
                self.in_flight -= 1

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _cancel_quietly(response: Any) -> None:
    """Cancel a backbone call (a DeploymentResponse / stream) if it can be; best effort: the replica also drops a
    row whose caller is gone at its next decode step."""
    cancel = getattr(response, "cancel", None)
    if callable(cancel):
        try:
            cancel()
        except Exception:
            pass


def _usage(r: RowResult) -> dict[str, int]:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
    }


def _mosaic(r: RowResult, forced: list[str], body: ChatCompletionRequest, tenant: TenantPolicy | None) -> dict[str, Any]:
    return {
        "active_modules": r.active_modules,
        "inserted_modules": r.inserted_modules,
        "module_versions": r.module_versions,
        "forced_modules": forced,
        "profile": body.safety_profile,
        "tenant": tenant.name if tenant else None,
        "control_tokens": r.control_tokens,
    }
