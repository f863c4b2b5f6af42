"""`mosaic` command line. Each subcommand parses its flags, builds typed configs, and calls one stage's
code; typed MosaicErrors become one clear message and exit code 2 (no traceback for user errors)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Each pipeline stage parses its own flags: `mosaic <stage> ...` == `python -m <module> ...` (the ray job entry point).
STAGES: dict[str, tuple[str, str]] = {
    "data": ("pipelines.data", "Ray Data: combination-sampled examples + counterfactual teacher"),
    "train": ("pipelines.train", "Ray Train + DeepSpeed: train the token bank"),
    "eval": ("pipelines.eval", "DSR / over-refusal / utility per order vs base and in-context"),
    "modules": ("pipelines.modules", "MLflow registry of module versions: register | list | promote | show"),
    "serve": ("pipelines.serve", "Ray Serve: OpenAI-compatible endpoint with composable modules"),
    "run": ("pipelines.run", "the main job: data -> train -> eval -> register, then the results table"),
}


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def cmd_chat(args: argparse.Namespace) -> None:
    """One-shot generation with a set of modules switched on."""
    import torch

    from mosaic_core.artifact import load_bank
    from mosaic_core.backbone import load_backbone
    from mosaic_core.batch import encode_batch, needs_cache
    from mosaic_core.cache import PrefixCache
    from mosaic_core.errors import ArtifactError
    from mosaic_core.generation import generate
    from mosaic_core.template import as_messages, encode_chat

    torch.set_num_threads(args.threads or torch.get_num_threads())
    modules = _split(args.modules)
    if modules and not args.bank:
        raise ArtifactError("--modules needs --bank DIR (a trained bank: runs/<name>/bank, or `mosaic bank init`)")
    t0 = time.perf_counter()
    bb = load_backbone(args.backbone)
    bank = load_bank(Path(args.bank), bb.fingerprint) if args.bank else None
    active = list(bank.canonical(modules)) if bank is not None else []
    placement = bank.placement if bank is not None else "before_assistant"
    # deep blocks follow the request's cached keys/values, and gates read its features there
    cache = PrefixCache.for_chat(bb.model, bb.tokenizer, system=args.system) if needs_cache(bank) else None
    batch = encode_batch(
        bb.tokenizer, bb.model.get_input_embeddings(), bank, [args.prompt], [active], placement, system=args.system, cache=cache
    )
    shown = ", ".join(active) or "none"
    if bank is not None and bank.gates and active and cache is not None:  # which gated modules the request let in
        before = encode_chat(bb.tokenizer, as_messages(args.prompt, args.system), placement).before
        inserted = bank.firing([active], cache.features([before], bank.gate_layers, bank.gate_recency))[0]
        shown += f" (inserted: {', '.join(inserted) or 'none'})"
    t1 = time.perf_counter()
    [g] = generate(
        bb.model,
        batch,
        max_new_tokens=args.max_new_tokens,
        eos_token_ids=[bb.tokenizer.eos_token_id],
        temperature=args.temperature,
        seed=args.seed,
    )
    t2 = time.perf_counter()
    text = bb.tokenizer.decode(g.token_ids, skip_special_tokens=True)
    print(f"[backbone {bb.fingerprint.model_id} ({bb.fingerprint.digest}) | modules: {shown} | placement {placement}]")
    print(text)
    print(
        f"[{len(g.token_ids)} tokens, finish_reason={g.finish_reason}, load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s]",
        file=sys.stderr,
    )


def cmd_bank_init(args: argparse.Namespace) -> None:
    """Write an untrained (initialised) bank: the starting point of training, and a way to try composition."""
    from mosaic_core.artifact import save_bank
    from mosaic_core.backbone import load_backbone
    from mosaic_core.bank import ControlTokenBank
    from mosaic_core.categories import CATEGORIES
    from mosaic_core.config import BankConfig

    cfg = BankConfig(
        categories=tuple(_split(args.categories) or CATEGORIES),
        m=args.m,
        init=args.init,
        placement=args.placement,
    )
    bb = load_backbone(args.backbone)
    bank = ControlTokenBank.build(cfg, bb.embeddings, bb.tokenizer, seed=args.seed)
    save_bank(bank, Path(args.out), fingerprint=bb.fingerprint, init=cfg.init, training_run_id=None)
    print(
        f"wrote untrained bank {list(bank.categories)} (m={cfg.m}, d={bank.d}, {bank.num_trainable()} parameters, "
        f"placement {cfg.placement}) to {args.out}"
    )


def cmd_bank_average(args: argparse.Namespace) -> None:
    """Average seeds of one training stage into one bank (their mean lands near their average operating point)."""
    from mosaic_core.artifact import average_banks

    manifest = average_banks([Path(b) for b in args.banks], Path(args.out))
    print(f"wrote the mean of {len(args.banks)} banks ({manifest['categories']}, depth {manifest['depth']}) to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    from mosaic_core.backbone import EMBEDDED

    p = argparse.ArgumentParser(prog="mosaic", description="MOSAIC on Ray: composable safety modules for a frozen chat LLM")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("chat", help="one-shot generation with modules switched on")
    c.add_argument("prompt")
    c.add_argument("--modules", default="", help="comma-separated categories to switch on, e.g. alcohol,betting")
    c.add_argument("--bank", default=None, help="bank directory (holds manifest.json)")
    c.add_argument("--backbone", default=EMBEDDED, help=f"HF id, local dir, or {EMBEDDED!r} (embedded, default)")
    c.add_argument("--system", default=None, help="optional system message")
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--threads", type=int, default=None)
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser("bank", help="bank utilities").add_subparsers(dest="bank_command", required=True)
    bi = b.add_parser("init", help="write an untrained, initialised bank")
    bi.add_argument("--out", required=True)
    bi.add_argument("--categories", default="", help="comma-separated (default: the five paper categories)")
    bi.add_argument("--m", type=int, default=5)
    bi.add_argument("--init", default="text", choices=["text", "vocab", "normal"])
    bi.add_argument("--placement", default="before_assistant", choices=["prefix", "before_assistant"])
    bi.add_argument("--seed", type=int, default=0)
    bi.add_argument("--backbone", default=EMBEDDED)
    bi.set_defaults(func=cmd_bank_init)
    ba = b.add_parser("average", help="write the element-wise mean of banks trained from one start (seeds of a stage)")
    ba.add_argument("banks", nargs="+", help="bank directories (each holds manifest.json), at least two")
    ba.add_argument("--out", required=True, help="new directory for the averaged bank")
    ba.set_defaults(func=cmd_bank_average)

    for name, (_, text) in STAGES.items():  # listed for --help; dispatched in main() with their argv verbatim
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> None:
    from mosaic_core.errors import MosaicError

    argv = list(sys.argv[1:] if argv is None else argv)
    # Stage subcommands own their flags (`mosaic modules --tracking-uri X list`): argparse's REMAINDER would
    # reject a leading option, so everything after the stage name goes straight to the stage's own parser.
    if argv and argv[0] in STAGES:
        import importlib

        command = argv[0]
        run = lambda: importlib.import_module(STAGES[command][0]).cli(argv[1:])  # noqa: E731
    else:
        args = build_parser().parse_args(argv)
        command, run = args.command, lambda: args.func(args)
    try:
        run()
    except MosaicError as e:
        print(f"mosaic {command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
