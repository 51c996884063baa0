"""Collator padding, seeded per-epoch order, exact resume, packed-row isolation."""

from __future__ import annotations

import pytest
import torch

from peqa_cli.data.encode import IGNORE_INDEX
from peqa_cli.data.loader import Collator, EpochSampler, TokenizedDataset, make_dataloader
from peqa_cli.data.testing import make_tiny_tokenizer
from peqa_cli.errors import InputError

TOK = make_tiny_tokenizer()


def ex(ids, labels=None, **extra):
    return {"input_ids": list(ids), "labels": list(labels if labels is not None else ids), **extra}


def test_collator_right_pads_to_the_longest():
    batch = [ex([5, 6, 7], [IGNORE_INDEX, 6, 7]), ex([8])]
    out = Collator(TOK)(batch)
    assert set(out) == {"input_ids", "labels", "attention_mask"}
    assert all(t.dtype == torch.long for t in out.values())
    pad = TOK.pad_token_id
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collator_pads_with_eos_without_pad_token():
    tok = make_tiny_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    out = Collator(tok)([ex([5, 6]), ex([5])])
    assert out["input_ids"][1, 1].item() == tok.eos_token_id


def test_collator_needs_pad_or_eos():
    class NoTokens:
        pad_token_id = eos_token_id = None

    with pytest.raises(InputError, match="neither a pad nor an EOS"):
        Collator(NoTokens())


def test_collator_pad_to_multiple():
    out = Collator(TOK, pad_to_multiple_of=8)([ex([1, 2, 3])])
    assert out["input_ids"].shape == (1, 8)


def test_collator_packed_rows():
    batch = [ex([5, 6, 7, 8], position_ids=[0, 1, 0, 1]), ex([9, 9], position_ids=[0, 1])]
    plain = Collator(TOK)(batch)
    assert "position_ids" not in plain and plain["attention_mask"].tolist()[1] == [1, 1, 0, 0]
    iso = Collator(TOK, isolate_packed=True)(batch)
    assert set(iso) == {"input_ids", "labels", "position_ids"}
    assert iso["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 0]]
    unpacked = Collator(TOK, isolate_packed=True)([ex([5, 6, 7]), ex([8])])
    assert unpacked["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def order_of(loader):
    return [row for batch in loader for row in batch["input_ids"][:, 0].tolist()]


DS = TokenizedDataset([ex([i + 10]) for i in range(23)])


def test_shuffle_is_seeded_per_epoch_and_covers_everything():
    orders = {
        (seed, epoch): order_of(make_dataloader(DS, TOK, 4, shuffle=True, seed=seed, epoch=epoch))
        for seed in (0, 1)
        for epoch in (0, 1)
    }
    for order in orders.values():
        assert sorted(order) == list(range(10, 33))
    assert len({tuple(o) for o in orders.values()}) == 4  # seed and epoch both change the order
    again = order_of(make_dataloader(DS, TOK, 4, shuffle=True, seed=1, epoch=1))
    assert again == orders[(1, 1)]
    assert order_of(make_dataloader(DS, TOK, 4, shuffle=False)) == list(range(10, 33))


@pytest.mark.parametrize("skip", [0, 1, 3, 5, 6])
def test_resume_reproduces_the_remaining_batches(skip):
    full = list(make_dataloader(DS, TOK, 4, shuffle=True, seed=7, epoch=2))
    resumed = list(make_dataloader(DS, TOK, 4, shuffle=True, seed=7, epoch=2, skip_batches=skip))
    assert len(resumed) == len(full) - skip
    for a, b in zip(full[skip:], resumed, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_accelerate_skip_first_batches_agrees():
    from accelerate import skip_first_batches

    loader = make_dataloader(DS, TOK, 4, shuffle=True, seed=3, epoch=1)
    skipped = [b["input_ids"].tolist() for b in skip_first_batches(loader, 2)]
    ours = make_dataloader(DS, TOK, 4, shuffle=True, seed=3, epoch=1, skip_batches=2)
    assert skipped == [b["input_ids"].tolist() for b in ours]


def test_sampler_set_epoch_restarts_from_the_beginning():
    s = EpochSampler(10, shuffle=True, seed=0, epoch=0, start=4)
    assert len(list(s)) == 6
    s.set_epoch(1)
    assert sorted(s) == list(range(10)) and len(s) == 10


def test_isolated_packing_matches_unpacked_logits():
    """With isolate_packed the second piece of a row sees nothing of the first."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    a, b = [5, 6, 7, 8, 9], [20, 21, 22]
    packed = ex(a + b, position_ids=[0, 1, 2, 3, 4, 0, 1, 2])
    other = ex([30, 31], position_ids=[0, 1])  # shorter row -> padding in the same batch
    with torch.no_grad():
        iso = Collator(TOK, isolate_packed=True)([packed, other])
        out = model(**{k: v for k, v in iso.items() if k != "labels"}, use_cache=False).logits
        alone = model(input_ids=torch.tensor([b])).logits
        mixed = Collator(TOK)([packed, other])
        leak = model(input_ids=mixed["input_ids"], attention_mask=mixed["attention_mask"]).logits
    assert torch.allclose(out[0, 5:8], alone[0], atol=1e-5)
    assert not torch.allclose(leak[0, 5:8], alone[0], atol=1e-3)  # default mode does attend across
