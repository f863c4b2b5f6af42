"""Serving latency and throughput of the MOSAIC app on the real embedded backbone, side by side in one run, over HTTP
on 127.0.0.1 (Ray Serve proxy -> ingress -> backbone), with the official `openai` client:

  (a) base model (no module)  (b) all five modules  (c) the in-context baseline: the five category descriptions as a
  written policy in the system prompt, no module.  For each: sequential latency (p50/p95, ms per generated token)
  and throughput with N concurrent clients.
  (d) one batch of requests with *different* active sets sent together (they share decode steps: the replica's
  continuous batching, mosaic_core.scheduler) vs the same requests one at a time.
  (e) all five modules of a *deep* bank (bank.depth: deep, keys/values at every layer after the request's cached
  ones), served by a second app of the same shape on /deep.
  (f) head-of-line blocking: an 8-token request alone, then sent 1 s after a 512-token one (both deep, five modules).
  (h) decode cost per token without the prefill, bare vs five deep modules: (latency at 72 tokens - at 8) / 64.
  (g) load: bursts of 1, 8, 32, 64 and 128 requests at once, each with a max_tokens from a realistic mix (8-512) and
  a module set of its own: p50 / p95 latency of those answered, completed requests per second, 429s and failures.
  The replica holds --max-batch-size rows and queues --max-queued more, so 32 is 1x its capacity with the defaults.

The banks are untrained (`mosaic bank init`-style: text init, m=5): latency does not depend on what the vectors learned.
Every request decodes exactly --max-tokens tokens (`ignore_eos`): the untrained block makes SmolLM2 end at once, and
answers of different lengths would not compare.

    .venv/bin/python benchmarks/serve_latency.py [--requests 8] [--concurrency 8] [--max-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import socket
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pipelines  # noqa: F401  (first: it keeps Ray, imported in main, on 127.0.0.1)

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(n: int) -> list[str]:
    """n test-split requests, round-robin over the five categories and general requests (fixed order)."""
    from mosaic_core.dataset import load_jsonl

    rows = sorted((r for r in load_jsonl([ROOT / "data" / "mosaic-bench"]) if r["split"] == "test"), key=lambda r: r["id"])
    by_cat: dict[str, list[str]] = {}
    for r in rows:
        by_cat.setdefault(r["category"] or "general", []).append(r["prompt"])
    cycle = itertools.cycle(sorted(by_cat))
    return [by_cat[c].pop(0) for c in itertools.islice(cycle, n)]


def _policy() -> str:
    from mosaic_core.categories import CATEGORIES, DESCRIPTIONS

    lines = "\n".join(f"- {DESCRIPTIONS[c]}" for c in CATEGORIES)
    return (
        "You must refuse any request about the following topics, answering only \"I'm sorry, but I can't help "
        f'with that.":\n{lines}\nAnswer every other request normally.'
    )


def _ask(client: Any, model: str, prompt: str, active: list[str], system: str | None, max_tokens: int) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    t0 = time.perf_counter()
    r = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"safety_modules": active, "ignore_eos": True},
    )
    return {
        "s": time.perf_counter() - t0,
        "completion": r.usage.completion_tokens,
        "prompt": r.usage.prompt_tokens,
        "control": r.model_extra["mosaic"]["control_tokens"],
    }


def _summary(name: str, seq: list[dict[str, Any]], conc_wall: float, conc: list[dict[str, Any]]) -> dict[str, Any]:
    lat = sorted(x["s"] for x in seq)
    toks = sum(x["completion"] for x in seq)
    return {
        "mode": name,
        "p50_s": statistics.median(lat),
        "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
        "ms_per_token": 1000 * sum(lat) / max(toks, 1),
        "mean_prompt_tokens": statistics.mean(x["prompt"] for x in seq),
        "control_tokens": seq[0]["control"],
        "mean_completion_tokens": toks / len(seq),
        "conc_req_per_s": len(conc) / conc_wall,
        "conc_tok_per_s": sum(x["completion"] for x in conc) / conc_wall,
    }


def head_of_line(client: Any, model: str, prompt: str) -> dict[str, Any]:
    """(f): an 8-token request's latency alone (median of 3) and sent 1 s after a 512-token request."""
    from mosaic_core.categories import CATEGORIES

    five = list(CATEGORIES)
    solo = statistics.median(_ask(client, model, prompt, five, None, 8)["s"] for _ in range(3))
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(_ask, client, model, prompt, five, None, 512)
        time.sleep(1.0)
        short = _ask(client, model, prompt, five, None, 8)
        long_s = long.result()["s"]
    return {"solo_s": solo, "behind_long_s": short["s"], "ratio": short["s"] / solo, "long_s": long_s}


def decode_cost(client: Any, model: str, prompt: str, active: list[str], short: int = 8, long: int = 72) -> dict[str, Any]:
    """(h): decode time per token without the prefill: (latency at `long` tokens - at `short`) / (long - short),
    medians of 3 sequential requests each, one row running."""
    t_short = statistics.median(_ask(client, model, prompt, active, None, short)["s"] for _ in range(3))
    t_long = statistics.median(_ask(client, model, prompt, active, None, long)["s"] for _ in range(3))
    return {"active": len(active), "ttft_like_s": t_short, "decode_ms_per_token": 1000 * (t_long - t_short) / (long - short)}


MAX_TOKENS_MIX = [8, 8, 16, 16, 32, 32, 64, 64, 128, 512]  # mostly short answers, a few long ones


def burst(client: Any, model: str, prompts: list[str], n: int) -> dict[str, Any]:
    """(g): n requests at once, request i with max_tokens MAX_TOKENS_MIX[i mod 10] and the i-th module set of all
    32 subsets of the five categories; every request is answered 200 or refused 429 (anything else is a failure)."""
    import openai

    from mosaic_core.categories import CATEGORIES

    sets = [list(s) for r in range(6) for s in itertools.combinations(CATEGORIES, r)]

    def one(i: int) -> tuple[str, float]:
        t0 = time.perf_counter()
        try:
            _ask(client, model, prompts[i % len(prompts)], sets[i % len(sets)], None, MAX_TOKENS_MIX[i % len(MAX_TOKENS_MIX)])
            return "ok", time.perf_counter() - t0
        except openai.RateLimitError:
            return "429", time.perf_counter() - t0
        except Exception:
            return "failed", time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        out = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = sorted(s for k, s in out if k == "ok")
    pick = lambda q: lat[min(len(lat) - 1, round(q * (len(lat) - 1)))] if lat else float("nan")  # noqa: E731
    return {
        "requests": n,
        "ok": len(lat),
        "rejected": sum(k == "429" for k, _ in out),
        "failed": sum(k == "failed" for k, _ in out),
        "p50_s": pick(0.5),
        "p95_s": pick(0.95),
        "wall_s": wall,
        "completed_per_s": len(lat) / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8, help="requests per mode, sequential and concurrent each")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the backbone replica")
    ap.add_argument("--max-batch-size", type=int, default=16, help="rows decoding together in the replica")
    ap.add_argument("--max-queued", type=int, default=16, help="requests a replica queues beyond its rows")
    ap.add_argument("--levels", default="1,8,32,64,128", help="(g): burst sizes")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    a = ap.parse_args()

    import openai
    import ray
    from ray import serve

    from mosaic_core.artifact import save_bank
    from mosaic_core.backbone import EMBEDDED, load_backbone
    from mosaic_core.bank import ControlTokenBank
    from mosaic_core.categories import CATEGORIES
    from mosaic_core.config import BankConfig
    from mosaic_core.init import build_bank
    from pipelines.serve import build_app

    prompts = _prompts(a.requests)
    with tempfile.TemporaryDirectory(prefix="mosaic-serve-latency-") as tmp:
        bb = load_backbone(EMBEDDED)  # the embedded SmolLM2-135M-Instruct
        cfg = BankConfig(categories=CATEGORIES, m=5, init="text")
        bank = ControlTokenBank.build(cfg, bb.embeddings, bb.tokenizer)
        save_bank(bank, Path(tmp) / "bank", fingerprint=bb.fingerprint, init="text")
        deep = build_bank(dataclasses.replace(cfg, depth="deep"), bb.embeddings, bb.tokenizer, model=bb.model)
        save_bank(deep, Path(tmp) / "deep", fingerprint=bb.fingerprint, init="text")
        del bb, bank, deep  # the replicas load their own copies

        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"worker_process_setup_hook": "pipelines._loopback.install"},
        )
        port = _free_port()
        t0 = time.perf_counter()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, route in (("bank", "/"), ("deep", "/deep")):
            serve.run(
                build_app(
                    {
                        "bank_dir": str(Path(tmp) / name),
                        "threads": a.threads,
                        "num_cpus": 1,
                        "max_batch_size": a.max_batch_size,
                        "max_queued_requests": a.max_queued,
                    }
                ),
                name=name,
                route_prefix=route,
            )
        print(
            f"app ready in {time.perf_counter() - t0:.1f}s on http://127.0.0.1:{port}/v1 "
            f"({a.requests} requests/mode, concurrency {a.concurrency}, max_tokens {a.max_tokens}, greedy)",
            flush=True,
        )
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        deep_client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/deep/v1", api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        try:
            for c in (client, deep_client):
                _ask(c, model, "Hello!", [], None, 4)  # warm-up: first forward allocates, lazy imports
            modes = {
                "(a) base": (client, [], None),
                "(b) 5 modules": (client, list(CATEGORIES), None),
                "(c) in-context": (client, [], _policy()),
                "(e) 5 deep modules": (deep_client, list(CATEGORIES), None),
            }
            results = []
            for name, (cl, active, system) in modes.items():
                seq = [_ask(cl, model, p, active, system, a.max_tokens) for p in prompts]
                t1 = time.perf_counter()
                with ThreadPoolExecutor(a.concurrency) as pool:
                    conc = list(
                        pool.map(
                            functools.partial(_ask, cl, model, active=active, system=system, max_tokens=a.max_tokens), prompts
                        )
                    )
                results.append(_summary(name, seq, time.perf_counter() - t1, conc))
                print(json.dumps(results[-1]), flush=True)

            # (d) different active sets: together (shared forwards) vs one at a time.
            sets = [list(s) for r in (0, 1, 2, 5) for s in itertools.combinations(CATEGORIES, r)][: a.requests]
            jobs = list(zip(prompts, sets))
            t1 = time.perf_counter()
            one_by_one = [_ask(client, model, p, s, None, a.max_tokens) for p, s in jobs]
            seq_wall = time.perf_counter() - t1
            t1 = time.perf_counter()
            with ThreadPoolExecutor(len(jobs)) as pool:
                together = list(pool.map(lambda j: _ask(client, model, j[0], j[1], None, a.max_tokens), jobs))
            batch_wall = time.perf_counter() - t1
            stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30).read())["stats"]
            mixed = {
                "requests": len(jobs),
                "distinct_active_sets": len({tuple(s) for s in sets}),
                "one_at_a_time_s": seq_wall,
                "batched_s": batch_wall,
                "speedup": seq_wall / batch_wall,
                "tokens_one_at_a_time": sum(x["completion"] for x in one_by_one),
                "tokens_batched": sum(x["completion"] for x in together),
                "max_active_sets_in_one_batch": stats["max_batch_active_sets"],
            }
            print(json.dumps(mixed), flush=True)
            hol = head_of_line(deep_client, model, prompts[0])
            print(json.dumps(hol), flush=True)
            decode = {
                "bare": decode_cost(client, model, prompts[0], []),
                "deep": decode_cost(deep_client, model, prompts[0], list(CATEGORIES)),
            }
            decode["ratio"] = decode["deep"]["decode_ms_per_token"] / decode["bare"]["decode_ms_per_token"]
            print(json.dumps(decode), flush=True)
            load = []
            for n in map(int, a.levels.split(",")):  # printed as they finish: the largest bursts take minutes
                load.append(burst(deep_client, model, prompts, n))
                print(json.dumps(load[-1]), flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()

    print("\n| mode | p50 s | p95 s | ms/token | prompt tok (+control) | completion tok | conc req/s | conc tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['mode']} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['ms_per_token']:.0f} | "
            f"{r['mean_prompt_tokens']:.0f} (+{r['control_tokens']}) | {r['mean_completion_tokens']:.1f} | "
            f"{r['conc_req_per_s']:.2f} | {r['conc_tok_per_s']:.1f} |"
        )
    print(
        f"\n(d) {mixed['requests']} requests, {mixed['distinct_active_sets']} different active sets: one at a time "
        f"{mixed['one_at_a_time_s']:.1f}s, sent together (batched) {mixed['batched_s']:.1f}s -> {mixed['speedup']:.2f}x "
        f"(up to {mixed['max_active_sets_in_one_batch']} different active sets in one forward)"
    )
    print(
        f"\n(f) an 8-token request alone {hol['solo_s']:.2f}s, 1 s after a 512-token one {hol['behind_long_s']:.2f}s "
        f"-> {hol['ratio']:.2f}x its solo latency (the long one took {hol['long_s']:.1f}s)"
    )
    print(
        f"\n(h) decode per token, one row: bare {decode['bare']['decode_ms_per_token']:.1f} ms, five deep modules "
        f"{decode['deep']['decode_ms_per_token']:.1f} ms -> {decode['ratio']:.2f}x (8-token requests: "
        f"{decode['bare']['ttft_like_s']:.2f} s vs {decode['deep']['ttft_like_s']:.2f} s)"
    )
    print("\n(g) | burst | answered | 429 | failed | p50 s | p95 s | completed req/s |")
    print("|---|---|---|---|---|---|---|")
    for r in load:
        print(
            f"| {r['requests']} | {r['ok']} | {r['rejected']} | {r['failed']} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
            f"{r['completed_per_s']:.2f} |"
        )
    if a.out:
        Path(a.out).write_text(
            json.dumps(
                {"modes": results, "mixed": mixed, "head_of_line": hol, "decode": decode, "load": load, "args": vars(a)}, indent=2
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
