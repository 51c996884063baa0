"""CausalLMScorer: HFLM tokenization rules, exact scores, batch-size invariance, fallbacks."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from peqa_cli.eval.lm import CausalLMScorer, resolve_max_length, rolling_windows
from peqa_cli.eval.testing import tiny_llama, tiny_tokenizer
from tests.eval_fixtures import model, one_thread, tok  # noqa: F401 (fixtures)

REQUESTS = [
    ("Question: Which gas do plants absorb from the air?\nAnswer:", " carbon dioxide"),
    ("Question: Which gas do plants absorb from the air?\nAnswer:", " oxygen"),
    ("Question: Which gas do plants absorb from the air?\nAnswer:", " the sun and water"),
    ("Question: What is the boiling point of water?\nAnswer: ", "one hundred degrees"),
    ("Question: What is the boiling point of water?\nAnswer:", " zero"),
    ("Pole vault: A man runs with a pole.", " He jumps over the bar and lands on a mat."),
    ("", "Hello world"),
    ("x", " y"),
    ("How to clean a window. Spray the glass.", " Wipe it with a cloth."),
    # PIQA-like: choices that start alike (the common tokens run once, in the shared part),
    # one a prefix of another, and two identical ones
    ("Question: Keep milk fresh\nAnswer:", " Put the milk in the fridge."),
    ("Question: Keep milk fresh\nAnswer:", " Put the milk in the oven."),
    ("Question: Keep milk fresh\nAnswer:", " Put the milk"),
    ("Question: Dry a cup\nAnswer:", " Use a towel."),
    ("Question: Dry a cup\nAnswer:", " Use a towel."),
]


def direct_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Reference: one unpadded forward of (context + continuation)[:-1]."""
    inp = torch.tensor([(context + continuation)[:-1]])
    with torch.no_grad():
        logits = model(input_ids=inp).logits[0, -len(continuation) :].float()
    target = torch.tensor(continuation)
    lp = F.log_softmax(logits, -1).gather(1, target[:, None]).sum()
    return float(lp), bool((logits.argmax(-1) == target).all())


def test_trailing_space_moves_to_continuation(tok, model):
    s = CausalLMScorer(model, tok)
    assert s.encode_pair("Answer: ", "yes") == s.encode_pair("Answer:", " yes")
    ctx, cont = s.encode_pair("Question: Which gas?\nAnswer:", " carbon dioxide")
    whole = tok.encode("Question: Which gas?\nAnswer: carbon dioxide")
    assert ctx == tok.encode("Question: Which gas?\nAnswer:")
    assert cont == whole[len(ctx) :]


def test_special_tokens_follow_tokenizer_default_like_hflm(model):
    no_bos = CausalLMScorer(model, tiny_tokenizer(bos=False))
    assert no_bos.tok_encode("Answer:")[0] != 1
    with_bos = CausalLMScorer(model, tiny_tokenizer(bos=True))
    assert with_bos.tok_encode("Answer:")[0] == 1
    # HFLM: a string that already starts with the BOS text gets no second BOS.
    plain = tiny_tokenizer(bos=True).encode("Answer:", add_special_tokens=False)
    assert with_bos.tok_encode("<s>Answer:") == [1] + plain
    forced = CausalLMScorer(model, tiny_tokenizer(bos=True), add_bos_token=False)
    assert forced.tok_encode("Answer:")[0] != 1
    # Continuation tokens never contain the BOS: it is part of the context encoding.
    ctx, cont = with_bos.encode_pair("Answer:", " yes")
    assert ctx[0] == 1 and 1 not in cont


def test_empty_context_uses_prefix_token(tok, model):
    s = CausalLMScorer(model, tok)
    ctx, cont = s.encode_pair("", "Hello world")
    assert ctx == [tok.bos_token_id]
    assert cont == tok.encode("Hello world", add_special_tokens=False)


@pytest.mark.parametrize("share", [True, False])
def test_loglikelihood_matches_direct_forward(tok, model, share):
    s = CausalLMScorer(model, tok, batch_size=4, share_prefix=share, progress=False)
    got = s.loglikelihood(REQUESTS)
    assert s.share_prefix == share  # the packed path passed its self-check
    for (ctx, cont), (ll, greedy) in zip(REQUESTS, got, strict=True):
        ref_ll, ref_greedy = direct_loglikelihood(model, *s.encode_pair(ctx, cont))
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy
        assert ll < 0


def test_batch_size_and_sharing_do_not_change_results(tok, model):
    runs = {
        (bs, share): CausalLMScorer(
            model, tok, batch_size=bs, share_prefix=share, progress=False
        ).loglikelihood(REQUESTS)
        for bs in (1, 3, 8)
        for share in (True, False)
    }
    ref = runs[(1, False)]
    for key, res in runs.items():
        assert [g for _, g in res] == [g for _, g in ref], key
        # Same math, different GEMM shapes: equal up to float32 rounding.
        lls = [ll for ll, _ in res]
        assert lls == pytest.approx([ll for ll, _ in ref], rel=1e-6, abs=1e-5), key


def test_greedy_flag_on_a_greedy_continuation(tok, model):
    s = CausalLMScorer(model, tok, progress=False)
    ctx = tok.encode("Question: What is")
    with torch.no_grad():
        nxt = int(model(input_ids=torch.tensor([ctx])).logits[0, -1].argmax())
    [(ll, greedy)] = s.loglikelihood_tokens([(ctx, [nxt])])
    assert greedy
    [(_, not_greedy)] = s.loglikelihood_tokens([(ctx, [(nxt + 1) % 384])])
    assert not not_greedy


def test_left_truncation_to_max_length(tok, model):
    s = CausalLMScorer(model, tok, max_length=8, progress=False)
    ctx, cont = s.encode_pair(*REQUESTS[0])
    assert len(ctx) + len(cont) > 9
    [(ll, _)] = s.loglikelihood([REQUESTS[0]])
    inp = (ctx + cont)[-9:][:-1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([inp])).logits[0, -len(cont) :]
    ref = F.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum()
    assert ll == pytest.approx(float(ref), abs=1e-4)


def test_rolling_windows_match_lm_eval():
    utils = pytest.importorskip("lm_eval.utils")
    for n in range(0, 23):
        for max_len in (1, 2, 3, 5, 8):
            tokens = list(range(100, 100 + n))
            ref = [
                utils.make_disjoint_window(w)
                for w in utils.get_rolling_token_windows(tokens, 7, max_len, context_len=1)
            ]
            assert rolling_windows(tokens, 7, max_len) == [tuple(w) for w in ref]


def test_loglikelihood_rolling_is_sum_of_token_logprobs(tok, model):
    text = "The following are multiple choice questions (with answers) about astronomy."
    ids = tok.encode(text)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[tok.bos_token_id] + ids[:-1]])).logits[0]
    ref = float(F.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None]).sum())
    full = CausalLMScorer(model, tok, progress=False).loglikelihood_rolling([text, "Hello"])
    assert full[0] == pytest.approx(ref, abs=1e-4)
    # Small windows: more windows, less context, but every token still scored once.
    short = CausalLMScorer(model, tok, max_length=4, progress=False).loglikelihood_rolling([text])
    assert math.isfinite(short[0]) and short[0] != pytest.approx(ref, abs=1e-3)


class PlainWrapper(torch.nn.Module):
    """A model exposing only ``forward(input_ids, attention_mask)``: no cache, no positions."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_generic_module_without_cache_support(tok, model):
    wrapped = PlainWrapper(model)
    s = CausalLMScorer(wrapped, tok, batch_size=3, progress=False)
    assert not s.share_prefix
    ref = CausalLMScorer(model, tok, progress=False).loglikelihood(REQUESTS)
    got = s.loglikelihood(REQUESTS)
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in ref], abs=1e-5)


class IgnoresMasks(torch.nn.Module):
    """Takes position ids and a 4-D mask but ignores both, as a naive custom model might."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_falls_back_when_model_ignores_packing(tok, model):
    buf = io.StringIO()
    s = CausalLMScorer(
        IgnoresMasks(model), tok, batch_size=2, progress=False, console=Console(file=buf)
    )
    assert s.share_prefix
    ref = CausalLMScorer(model, tok, progress=False).loglikelihood(REQUESTS)
    got = s.loglikelihood(REQUESTS)
    assert not s.share_prefix
    assert "does not honour packed attention masks" in buf.getvalue()
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in ref], abs=1e-5)


def test_weights_are_read_at_call_time(tok):
    m = tiny_llama(seed=1)
    s = CausalLMScorer(m, tok, progress=False)
    before = s.loglikelihood(REQUESTS[:3])
    with torch.no_grad():
        m.lm_head.weight.mul_(0.5)
    after = s.loglikelihood(REQUESTS[:3])
    assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(before, after, strict=True))


def test_progress_never_writes_stdout(tok, model, capsys):
    CausalLMScorer(model, tok, progress=True).loglikelihood(REQUESTS[:2])
    assert capsys.readouterr().out == ""


def test_transformers_llama_uses_prefix_sharing(tok, model):
    assert CausalLMScorer(model, tok).share_prefix
    assert not CausalLMScorer(model, tok, share_prefix=False).share_prefix


def test_max_length_from_config(tok, model):
    assert resolve_max_length(model, tok) == model.config.max_position_embeddings
    assert CausalLMScorer(model, tok, max_length=64).max_length == 64


class SoftCapped(torch.nn.Module):
    """A model that post-processes its logits (Gemma-2 style soft-capping): projecting the
    decoder's hidden states with the output embeddings alone would be wrong for it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids)  # fmt: skip
        out.logits = 2.0 * torch.tanh(out.logits / 2.0)
        return out


def test_scored_positions_only_projection_is_checked_once(tok, model):
    s = CausalLMScorer(model, tok, batch_size=3, progress=False)
    got = s.loglikelihood(REQUESTS)
    assert s._split is not None  # a plain Llama: backbone + head on the scored positions
    for (ctx, cont), (ll, greedy) in zip(REQUESTS, got, strict=True):
        ref_ll, ref_greedy = direct_loglikelihood(model, *s.encode_pair(ctx, cont))
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy

    capped = SoftCapped(model)
    c = CausalLMScorer(capped, tok, batch_size=3, progress=False)
    got = c.loglikelihood(REQUESTS)
    assert c._split is None  # the check saw different numbers and kept the model's forward
    for (ctx, cont), (ll, _) in zip(REQUESTS, got, strict=True):
        ref_ll, _ = direct_loglikelihood(capped, *c.encode_pair(ctx, cont))
        assert ll == pytest.approx(ref_ll, abs=1e-4)
