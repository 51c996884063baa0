"""``peqa generate``: one loaded base answers with the base and each delta in turn, streaming."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from peqa_cli.cli import app
from peqa_cli.data.testing import make_tiny_tokenizer
from peqa_cli.io.checkpoint import load_quantized
from peqa_cli.io.delta import apply_delta, load_delta
from peqa_cli.recipes.generate import GenerateSettings, TaskSwitcher
from peqa_cli.recipes.quantize import QuantizeRecipe, QuantSettings
from peqa_cli.recipes.quantize import run as quantize
from tests.conftest import make_tiny_llama
from tests.test_merge_gptq import make_delta

PROMPT = "What is two plus two?"
N = 8


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    tok = make_tiny_tokenizer()
    src = root / "src"
    make_tiny_llama(3, vocab_size=len(tok)).half().save_pretrained(src)
    tok.save_pretrained(src)
    base = root / "base"
    quantize(
        QuantizeRecipe(model=str(src), out=str(base), quant=QuantSettings(bits=4, group_size=32))
    )
    other = root / "other"  # another model: its tokenizer has no chat template
    make_tiny_llama(4, vocab_size=len(tok)).half().save_pretrained(other)
    plain = root / "plain"
    quantize(
        QuantizeRecipe(model=str(other), out=str(plain), quant=QuantSettings(bits=4, group_size=32))
    )
    make_tiny_tokenizer(chat_template=None).save_pretrained(plain)
    a = make_delta(base, root / "a", seed=1, rel=0.3)
    b = make_delta(base, root / "b", seed=2, rel=0.3)
    return {"root": root, "src": src, "base": base, "plain": plain, "a": a, "b": b, "tok": tok}


@torch.no_grad()
def greedy_text(model, tok, ids: list[int]) -> str:
    """Greedy decoding without a cache or generate(): argmax, append, until EOS or N tokens."""
    x, new = torch.tensor([ids]), []
    for _ in range(N):
        nxt = int(model(x).logits[0, -1].argmax())
        new.append(nxt)
        if nxt == tok.eos_token_id:
            break
        x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return tok.decode(new, skip_special_tokens=True)


def chat_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tok(text, add_special_tokens=False)["input_ids"]


def generate(*args):
    return CliRunner().invoke(app, ["generate", *map(str, args), "--max-new-tokens", str(N)])


def test_base_answer_streams_greedy_through_the_chat_template(work):
    res = generate(work["base"], "--prompt", PROMPT)
    assert res.exit_code == 0, res.output
    model = load_quantized(work["base"]).model
    expected = greedy_text(model, work["tok"], chat_ids(work["tok"], PROMPT))
    assert expected  # a random model may well answer in newlines; the point is equality
    assert res.stdout == expected + "\n"


def test_each_delta_answers_in_turn_on_one_loaded_base(work):
    res = generate(work["base"], "--delta", work["a"], "--delta", work["b"], "--prompt", PROMPT)
    assert res.exit_code == 0, res.output
    model = load_quantized(work["base"]).model
    ids = chat_ids(work["tok"], PROMPT)
    parts = []
    for d in (work["a"], work["b"]):
        apply_delta(model, load_delta(d))
        parts.append(f"[{d}]\n{greedy_text(model, work['tok'], ids)}\n")
    assert res.stdout == "".join(parts)


def test_raw_completion_and_float_model(work):
    tok = work["tok"]
    res = generate(work["base"], "--no-chat", "--prompt", "The quick brown")
    assert res.exit_code == 0, res.output
    model = load_quantized(work["base"]).model
    assert res.stdout == greedy_text(model, tok, tok("The quick brown")["input_ids"]) + "\n"
    res = generate(work["src"], "--no-chat", "--prompt", "The quick brown")
    assert res.exit_code == 0, res.output


def test_sampling_is_seeded(work):
    args = (
        work["base"],
        "--prompt",
        PROMPT,
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "5",
    )
    first, second = generate(*args), generate(*args)
    assert first.exit_code == 0 and first.stdout == second.stdout


def test_switcher_swaps_in_place(work):
    sw = TaskSwitcher.load(str(work["base"]), "cpu")
    a, b = load_delta(work["a"]), load_delta(work["b"])
    ids = torch.tensor([chat_ids(work["tok"], PROMPT)])
    settings = GenerateSettings(max_new_tokens=N)
    sw.use(a)
    with torch.no_grad():
        first = sw.model(ids).logits
    answer = sw.generate(PROMPT, settings)
    assert sw.use(b) >= 0 and sw.use(a) >= 0
    with torch.no_grad():
        assert torch.equal(sw.model(ids).logits, first)
    assert sw.generate(PROMPT, settings) == answer


@pytest.mark.parametrize(
    "case,needle",
    [
        ("float-with-delta", "is a float model; --delta needs the peqa/GPTQ checkpoint"),
        ("chat-without-template", "has no chat template; use --no-chat"),
        ("other-base", "belongs to another base"),
        ("missing-delta", "delta not found"),
        ("bad-temperature", "--temperature: -1.0"),
    ],
)
def test_refusals(work, tmp_path, case, needle):
    args = {
        "float-with-delta": [work["src"], "--delta", work["a"]],
        "chat-without-template": [work["plain"], "--chat"],
        "other-base": [work["plain"], "--delta", work["a"]],
        "missing-delta": [work["base"], "--delta", tmp_path / "nope"],
        "bad-temperature": [work["base"], "--temperature", "-1"],
    }[case]
    res = generate(*args, "--prompt", PROMPT)
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("peqa: error: ") and needle in lines[-1], res.stderr
    assert not any(line.startswith("peqa: error") for line in lines[:-1])
