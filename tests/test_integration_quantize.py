"""SmolLM2-135M end to end: quantize from the embedded GGUF, reload, score and generate."""

from __future__ import annotations

import pytest
import torch

from peqa_cli.eval.perplexity import perplexity
from peqa_cli.io.checkpoint import load_quantized
from peqa_cli.io.models import load_model
from peqa_cli.paths import data_file
from peqa_cli.recipes.quantize import QuantizeRecipe, QuantSettings, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def w4g128(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "w4g128"
    summary = run(
        QuantizeRecipe(
            model="smollm2-135m", out=str(out), quant=QuantSettings(bits=4, group_size=128)
        )
    )
    return out, summary


def test_partial_groups_and_layer_count(w4g128):
    out, summary = w4g128
    assert summary["quantized_layers"] == 30 * 7 and summary["skipped_layers"] == 0
    qm = load_quantized(out)
    q_proj = qm.model.model.layers[0].self_attn.q_proj
    assert q_proj.scales.shape == (5, 576)  # 576 columns: 4 groups of 128 and one of 64
    assert summary["output_bytes"] < summary["input_bytes"] / 4


def test_reloaded_model_answers_and_scores(w4g128):
    out, _ = w4g128
    lm = load_model(str(out))
    tok = lm.tokenizer
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        gen = lm.model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    res = perplexity(
        lm.model, tok, data_file("wikitext2_raw_test.jsonl"), seq_len=512, limit=2, progress=False
    )
    assert 5 < res["ppl"] < 80, res
