"""The backbone deployment: the frozen backbone and every module of its bundle in one replica. One engine thread
decodes requests with different active sets together (iteration-level batching, `mosaic_core.scheduler`); a new
`user_config` swaps the modules live in `reconfigure` (docs/serving.md)."""

import asyncio
import collections
import functools
import itertools
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ray import serve

from mosaic_core.errors import MosaicError
from mosaic_core.generation import find_stop, holdback
from pipelines.serve.errors import (
    ApiError,
    Cancelled,
    InternalError,
    InvalidRequest,
    Overloaded,
    Unavailable,
    _from_mosaic_error,
)
from pipelines.serve.modules import ModuleLoader, ModuleState, load_modules
from pipelines.serve.schema import RowRequest, RowResult, StreamEvent
from pipelines.serve.settings import BACKBONE_DEPLOYMENT, BackboneSettings, ModuleSource

logger = logging.getLogger("ray.serve")  # Serve routes this logger into each replica's log file


@dataclass
class _Job:
    """A request inside the backbone replica, from `generate`/`stream` to its result. `done(result)` is called once,
    from the engine thread; `emit(event)` streams events (already thread-safe)."""

    row: RowRequest
    done: Callable[["RowResult"], None]
    emit: Callable[[StreamEvent], None] | None = None
    cancelled: bool = False


@dataclass
class _Prepared:
    """A validated, encoded row: its canonical active set, token budget and the module snapshot it was admitted
    under (a swap applies to rows admitted after it)."""

    job: _Job
    state: "ModuleState"
    segments: Any  # mosaic_core.template.Segments
    active: tuple[str, ...]
    inserted: tuple[str, ...]  # the active modules whose gates fire on this request (all of them where ungated)
    max_tokens: int
    prompt_tokens: int
    control_tokens: int
    emitted: int = 0


# --------------------------------------------------------------------------------------------- backbone deployment


@serve.deployment(name=BACKBONE_DEPLOYMENT)
class MosaicBackbone:
    """The frozen backbone + all modules of its bundle; batches rows with different active sets into one forward."""

    def __init__(self, settings: dict[str, Any], loader: ModuleLoader | None = None) -> None:
        from pipelines import _loopback

        # The replica's internal gRPC server starts after this constructor returns: bind it to 127.0.0.1.
        _loopback.install()
        import torch

        from mosaic_core.backbone import load_backbone

        self.settings = BackboneSettings.model_validate(settings)
        torch.set_num_threads(self.settings.threads)
        self.bb = load_backbone(self.settings.backbone)
        self.embed = self.bb.model.get_input_embeddings()
        from mosaic_core.cache import PrefixCache

        # Deep modules are keys/values appended after the request's own, which come from this cache (bounded; a
        # lock because decoding runs on worker threads). Input-token banks do not use it. for_chat: the template's
        # head is kept once, and gated modules' features skip it as their training did.
        self.prefix_cache = PrefixCache.for_chat(self.bb.model, self.bb.tokenizer, max_bytes=256 << 20)
        self._prefix_lock = threading.Lock()
        cfg = self.bb.model.config
        self.context = self.settings.max_context_tokens or int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        eos = {self.bb.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.bb.model, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos = sorted(t for t in eos if t is not None)
        self.loader = loader or load_modules
        self.state: ModuleState | None = None
        self.last_error: str | None = None
        self._swap_lock = asyncio.Lock()
        self._poll_task: asyncio.Task | None = None
        # Observability (health()): decode steps ("batches"), and proof that rows with different active sets share them.
        self.stats = {
            "batches": 0,
            "rows": 0,
            "mixed_batches": 0,
            "max_batch_rows": 0,
            "max_batch_active_sets": 0,
            "joins": 0,
            "cancelled": 0,
            "rejected": 0,
            "queued": 0,
            "running": 0,
        }
        # The engine: one thread owns the running batch (mosaic_core.scheduler); requests wait in a bounded queue.
        self._queue: collections.deque[_Job] = collections.deque()
        self._held, self._held_lock = 0, threading.Lock()  # requests accepted and not answered yet (rows + queue)
        self._wake = threading.Event()
        self._engine = threading.Thread(target=self._engine_loop, name="mosaic-engine", daemon=True)
        self._engine.start()
        logger.info(
            "backbone %s (fingerprint %s) loaded; context %d tokens",
            self.bb.fingerprint.model_id,
            self.bb.fingerprint.digest,
            self.context,
        )

    # ----------------------------------------------------------------------------------------- modules, live

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Resolve the modules of a new `user_config` and swap them in atomically.

        The first call (replica start) raises on a bad bundle, so a broken deploy fails loudly. Later calls keep
        serving the current modules when the new ones cannot be loaded — dropping every request because an alias
        pointed at an incompatible version is worse — and report the error in /v1/modules and the log."""
        source = ModuleSource.model_validate(user_config or {})
        if not await self._swap(source, initial=self.state is None):
            return  # still serving (and polling) the previous source
        if self._poll_task is not None:
            self._poll_task.cancel()
            self._poll_task = None
        if source.poll_interval_s and source.modules:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll(source))

    async def _swap(self, source: ModuleSource, *, initial: bool) -> bool:
        async with self._swap_lock:
            try:
                state = await asyncio.to_thread(self.loader, source, self.bb.fingerprint)
            except Exception as e:
                if initial:
                    raise
                self.last_error = f"{type(e).__name__}: {e}"
                logger.error("module swap failed, still serving %s: %s", self.state.versions if self.state else {}, e)
                return False
            before = self.state.versions if self.state else {}
            self.state, self.last_error = state, None  # one assignment: batches in flight keep their snapshot
            logger.info("serving modules %s (was %s)", state.versions, before)
            return True

    async def _poll(self, source: ModuleSource) -> None:
        """Follow moving aliases: re-resolve every poll interval, swap only when a version changed."""
        while True:
            await asyncio.sleep(source.poll_interval_s or 60)
            if self.state is None or self.state.source != source:
                return
            try:
                fresh = await asyncio.to_thread(self.loader, source, self.bb.fingerprint)
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                continue
            if fresh.versions != self.state.versions:
                async with self._swap_lock:
                    if self.state.source == source:
                        logger.info("alias moved: serving %s (was %s)", fresh.versions, self.state.versions)
                        self.state, self.last_error = fresh, None

    async def modules(self) -> dict[str, Any]:
        """What /v1/modules shows."""
        st = self.state
        return {
            "backbone": self.bb.fingerprint.model_id,
            "fingerprint": self.bb.fingerprint.digest,
            "placement": st.bank.placement if st and st.bank is not None else None,
            "source": "bank_dir" if st and st.source.bank_dir else "registry" if st and st.source.modules else "none",
            "loaded_at": st.loaded_at if st else None,
            "last_error": self.last_error,
            "modules": [dict(m) for m in (st.modules if st else ())],
        }

    async def health(self) -> dict[str, Any]:
        """Liveness + identity (the pid lets a test kill this replica)."""
        return {
            "status": "ok" if self.state is not None else "loading",
            "pid": os.getpid(),
            "backbone": self.bb.fingerprint.model_id,
            "modules": sorted(self.state.versions) if self.state else [],
            "stats": dict(self.stats),
        }

    def check_health(self) -> None:
        """Serve's periodic probe: a replica without modules loaded is not healthy."""
        if self.state is None:
            raise RuntimeError("modules not loaded")
        if not self._engine.is_alive():
            raise RuntimeError("the decoding engine thread died")

    # ----------------------------------------------------------------------------------------- requests

    async def generate(self, row: RowRequest) -> RowResult:
        """One chat completion: joins the running batch at the next decode step. A caller that goes away (Serve
        cancels this call when the HTTP client disconnects or the ingress gives up) frees its row within a step."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[RowResult] = loop.create_future()
        job = _Job(row, done=lambda r: loop.call_soon_threadsafe(_resolve, fut, r))
        self._submit(job)
        try:
            return await fut
        finally:
            job.cancelled = True  # no-op once finished; otherwise the engine drops the row at its next step

    async def stream(self, row: RowRequest) -> AsyncIterator[StreamEvent]:
        """The same, as events (call with `handle.options(stream=True)`): start, deltas as tokens decode, end."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        put = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)  # noqa: E731
        job = _Job(row, done=lambda r: put(StreamEvent(kind="end", result=r)), emit=put)
        self._submit(job)
        try:
            while True:
                ev = await queue.get()
                yield ev
                if ev.kind == "end":
                    return
        finally:
            job.cancelled = True  # a client that went away stops its row at the next step

    def _submit(self, job: _Job) -> None:
        """Queue a job for the engine, or answer it at once: 429 when the queue is full, 503 before modules load."""
        if self.state is None:
            job.done(RowResult(error=Unavailable("modules are still loading", code="not_ready", retry_after_s=1.0).to_body()))
            return
        capacity = self.settings.max_batch_size + self.settings.max_queued_requests
        with self._held_lock:
            full = self._held >= capacity
            if not full:
                self._held += 1
        if full:
            self.stats["rejected"] += 1
            job.done(
                RowResult(
                    error=Overloaded(
                        f"the server is busy ({self.settings.max_batch_size} rows decoding and {self.settings.max_queued_requests} "
                        "requests waiting); retry shortly",
                        code="queue_full",
                        retry_after_s=self.settings.retry_after_s,
                    ).to_body()
                )
            )
            return
        done = job.done

        def release(result: RowResult) -> None:  # the job's slot frees when it is answered, whatever the answer
            with self._held_lock:
                self._held -= 1
            done(result)

        job.done = release
        self._queue.append(job)
        self.stats["queued"] = len(self._queue)
        self._wake.set()

    def _engine_loop(self) -> None:
        """Iteration-level scheduling: before every decode step, drop cancelled rows and admit queued requests into
        free rows (their prefill is the only extra work); then one step for every running row."""
        from mosaic_core.scheduler import ContinuousBatcher

        batcher = ContinuousBatcher(self.bb.model, self.prefix_cache)
        running: dict[int, _Prepared] = {}
        ids = itertools.count()
        while True:  # a daemon thread: it ends with the replica process
            for key in [k for k, p in running.items() if p.job.cancelled]:
                batcher.cancel(key)
                self.stats["cancelled"] += 1
                running.pop(key).job.done(_GONE)
            self.stats["running"] = len(running)
            joining: list[tuple[int, _Prepared]] = []
            while self._queue and len(running) + len(joining) < self.settings.max_batch_size:
                job = self._queue.popleft()
                if job.cancelled:
                    self.stats["cancelled"] += 1
                    job.done(_GONE)
                    continue
                p = self._admit(job)
                if p is not None:
                    joining.append((next(ids), p))
            self.stats["queued"] = len(self._queue)
            if not running and not joining:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self._join(batcher, running, joining)
                finished = batcher.step()
            except Exception as e:  # never let one bad step take the replica down: fail the rows it held
                logger.exception("decoding %d rows failed", len(running))
                for p in running.values():
                    p.job.done(RowResult(error=InternalError(f"internal error: {type(e).__name__}").to_body()))
                running.clear()
                batcher = ContinuousBatcher(self.bb.model, self.prefix_cache)
                continue
            self._count_step(running.values())
            for key, g in finished:
                self._finish(running.pop(key), g)
            self.stats["running"] = len(running)

    def _admit(self, job: _Job) -> "_Prepared | None":
        """Validate and encode a queued job under the current modules; an invalid one is answered at once."""
        try:
            return self._prepare(self.state, job)
        except ApiError as e:
            job.done(RowResult(error=e.to_body()))
        except MosaicError as e:
            job.done(RowResult(error=_from_mosaic_error(e).to_body()))
        except Exception as e:  # never let one request take the replica (or its batch-mates) down
            logger.exception("preparing a request failed")
            job.done(RowResult(error=InternalError(f"internal error: {type(e).__name__}").to_body()))
        return None

    def _join(self, batcher: Any, running: dict[int, "_Prepared"], joining: list[tuple[int, "_Prepared"]]) -> None:
        """Prefill the joining rows (one forward per module snapshot) into the running batch."""
        from mosaic_core.scheduler import RowSpec

        by_state: dict[int, list[tuple[int, _Prepared]]] = {}
        for key, p in joining:
            by_state.setdefault(id(p.state), []).append((key, p))
        for group in by_state.values():
            specs = []
            for key, p in group:
                r = p.job.row
                specs.append(
                    (
                        key,
                        RowSpec(
                            p.segments,
                            p.active,
                            p.max_tokens,
                            eos_token_ids=[] if r.ignore_eos else self.eos,
                            temperature=r.temperature,
                            top_p=r.top_p,
                            seed=r.seed if r.temperature > 0 else None,
                            should_stop=functools.partial(self._should_stop, p),
                        ),
                    )
                )
            try:
                with self._prefix_lock:
                    batcher.join(specs, group[0][1].state.bank)
            except Exception as e:
                logger.exception("prefilling %d rows failed", len(group))
                for _, p in group:
                    p.job.done(RowResult(error=InternalError(f"internal error: {type(e).__name__}").to_body()))
                continue
            running.update(group)
            self.stats["joins"] += 1

    def _count_step(self, rows: Any) -> None:
        rows = list(rows)
        st, sets = self.stats, len({p.active for p in rows})
        st["batches"] += 1
        st["mixed_batches"] += sets > 1
        st["max_batch_rows"] = max(st["max_batch_rows"], len(rows))
        st["max_batch_active_sets"] = max(st["max_batch_active_sets"], sets)

    def _should_stop(self, p: "_Prepared", tokens: list[int]) -> bool:
        """After each new token of a row: a stop string ends it; a streaming row gets the text that is safe to send."""
        stops = p.job.row.stop
        if not stops and p.job.emit is None:
            return False
        text = self.bb.tokenizer.decode(tokens, skip_special_tokens=True)
        if stops and find_stop(text, stops) is not None:
            return True
        if p.job.emit is not None:
            safe = len(text) - holdback(text, stops)
            if safe > p.emitted:
                p.job.emit(StreamEvent(kind="delta", text=text[p.emitted : safe]))
                p.emitted = safe
        return False

    def _finish(self, p: "_Prepared", g: Any) -> None:
        text = self.bb.tokenizer.decode(g.token_ids, skip_special_tokens=True)
        cut = find_stop(text, p.job.row.stop)
        reason = g.finish_reason
        if cut is not None:
            text, reason = text[:cut], "stop"
        if p.job.emit is not None and len(text) > p.emitted:
            p.job.emit(StreamEvent(kind="delta", text=text[p.emitted :]))
            p.emitted = len(text)
        p.job.done(self._result(p, text, reason, len(g.token_ids)))

    def _prepare(self, state: ModuleState, job: _Job) -> _Prepared:
        from mosaic_core.template import encode_chat

        row = job.row
        active = state.canonical(row.active)
        placement = state.bank.placement if state.bank is not None else "before_assistant"
        try:
            segments = encode_chat(self.bb.tokenizer, row.messages, placement)
        except Exception as e:  # the chat template refuses e.g. roles out of order (jinja raise_exception)
            raise InvalidRequest(f"the chat template rejected these messages: {e}", param="messages") from None
        prompt = len(segments.before) + len(segments.after)
        bank, inserted = state.bank, active
        if bank is not None and bank.gates and active:  # memoised: the prefill reads the same features again
            with self._prefix_lock:
                features = self.prefix_cache.features([segments.before], bank.gate_layers, bank.gate_recency)
            inserted = bank.firing([active], features)[0]
        control = len(inserted) * (bank.m if bank is not None else 0)
        room = self.context - prompt - control
        wanted = row.max_tokens if row.max_tokens is not None else min(self.settings.default_max_tokens, room)
        if room < 1 or wanted > room:
            raise InvalidRequest(
                f"this model's context is {self.context} tokens; the messages take {prompt} tokens plus {control} "
                f"control tokens, leaving {max(room, 0)}, and {wanted} new tokens were requested: shorten the messages "
                "or lower max_tokens",
                param="messages",
                code="context_length_exceeded",
            )
        p = _Prepared(job, state, segments, active, inserted, wanted, prompt, control)
        self.stats["rows"] += 1
        if job.emit is not None:
            job.emit(StreamEvent(kind="start", result=self._result(p, "", None, 0)))
        return p

    @staticmethod
    def _result(p: _Prepared, text: str, reason: str | None, n: int) -> RowResult:
        versions = p.state.versions
        return RowResult(
            text=text,
            finish_reason=reason or "stop",
            prompt_tokens=p.prompt_tokens,
            completion_tokens=n,
            control_tokens=p.control_tokens,
            active_modules=list(p.active),
            inserted_modules=list(p.inserted),
            module_versions={c: versions[c] for c in p.active},
        )


_GONE = RowResult(error=Cancelled("the client went away", code="client_disconnected").to_body())
"""What a row whose caller went away is answered with (nobody reads it; the slot it held is released)."""


def _resolve(fut: "asyncio.Future[RowResult]", result: RowResult) -> None:
    if not fut.done():  # a cancelled caller's future stays cancelled
        fut.set_result(result)
