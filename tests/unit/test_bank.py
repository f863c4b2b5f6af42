import pytest
import torch

from mosaic_core.bank import ControlTokenBank, init_vectors
from mosaic_core.config import BankConfig
from mosaic_core.errors import DuplicateCategoryError, UnknownCategoryError

CATS = ("addiction", "alcohol", "betting", "horror", "sex")


@pytest.fixture
def bank(tiny_backbone):
    return ControlTokenBank.build(BankConfig(categories=CATS, m=3, init="vocab"), tiny_backbone.embeddings)


def test_shapes_and_trainable_count(bank, tiny_backbone):
    d = tiny_backbone.embeddings.shape[1]
    assert bank.categories == list(CATS)
    assert all(p.shape == (3, d) for p in bank.vectors.values())
    assert bank.num_trainable() == 5 * 3 * d
    assert bank.compose([]).shape == (0, d)
    assert bank.compose(["sex", "alcohol"]).shape == (6, d)


def test_composition_is_canonical(bank):
    a = bank.compose(["betting", "alcohol", "sex"])
    b = bank.compose(["sex", "alcohol", "betting", "alcohol"])
    assert torch.equal(a, b)
    assert torch.equal(a[:3], bank.vectors["alcohol"])
    assert bank.canonical({"sex", "addiction"}) == ("addiction", "sex")


def test_unknown_and_duplicate_categories_raise_typed_errors(bank):
    with pytest.raises(UnknownCategoryError) as e:
        bank.compose(["alcohol", "vaping"])
    assert e.value.unknown == ["vaping"] and "alcohol" in str(e.value)
    with pytest.raises(DuplicateCategoryError):
        bank.add("alcohol", torch.zeros(3, bank.d))
    with pytest.raises(ValueError, match="expected shape"):
        bank.add("news", torch.zeros(2, bank.d))


def test_freeze_for_incremental_expansion(bank):
    bank.freeze(["alcohol", "betting"])
    bank.add("violence", torch.zeros(3, bank.d))
    trainable = {c for c in bank.categories if bank.vectors[c].requires_grad}
    assert trainable == {"addiction", "horror", "sex", "violence"}
    assert bank.categories[-1] == "violence"


@pytest.mark.parametrize("method", ["text", "vocab", "normal"])
def test_init_methods(tiny_backbone, method):
    emb = tiny_backbone.embeddings
    g = torch.Generator().manual_seed(0)
    v = init_vectors(emb, 4, method, tokenizer=tiny_backbone.tokenizer, text="alcohol beer wine", generator=g)
    assert v.shape == (4, emb.shape[1]) and torch.isfinite(v).all()
    if method == "text":
        ids = tiny_backbone.tokenizer("alcohol beer wine", add_special_tokens=False).input_ids
        first_chunk = ids[: -(-len(ids) // 4)]  # tensor_split puts ceil(n / 4) ids in the first chunk
        assert torch.allclose(v[0], emb[first_chunk].mean(0), atol=1e-6)
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(v, init_vectors(emb, 4, method, tokenizer=tiny_backbone.tokenizer, text="alcohol beer wine", generator=g2))


def test_norm_cap(tiny_backbone):
    bank = ControlTokenBank.build(
        BankConfig(categories=("alcohol",), m=2, init="normal", max_norm_ratio=0.5), tiny_backbone.embeddings
    )
    with torch.no_grad():
        bank.vectors["alcohol"].mul_(100)
    bank.clamp_norms_()
    assert bank.vectors["alcohol"].norm(dim=-1).max() <= bank.max_norm * (1 + 1e-5)


def test_both_banks_meet_the_protocol_on_their_own(bank, tiny_backbone):
    """ControlTokenBank and DeepTokenBank each satisfy `Bank` structurally, as plain nn.Modules: no shared
    implementation base (nothing between them and nn.Module), no member left to a subclass."""
    from torch import nn

    from mosaic_core.bank import Bank, DeepTokenBank

    deep = DeepTokenBank.for_model(tiny_backbone.model, 2)
    members = {n for n in vars(Bank) if not n.startswith("_")} | set(Bank.__annotations__)
    assert {"depth", "module_shape", "compose", "set_gate", "parameters"} <= members
    for b in (bank, deep):
        assert isinstance(b, Bank) and isinstance(b, nn.Module)
        assert type(b).__bases__ == (nn.Module,), type(b).__mro__
        assert all(hasattr(b, name) for name in members)
    for b in (bank, deep):  # every member works on both (a base class's NotImplementedError would raise here)
        b.add("extra", torch.zeros(b.module_shape))
        assert b.canonical(["extra"]) == ("extra",) and b.compose(["extra"]).numel() == b.vectors["extra"].numel()
        assert b.gates == {} and b.firing([["extra"]], None) == [("extra",)]
        b.freeze(["extra"])
        b.clamp_norms_()
