"""The PEQA training loop on a tiny random Llama: learning, masking, exact resume, outputs."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from peqa_cli.data import DataConfig, build_datasets
from peqa_cli.errors import CheckpointError, RunError
from peqa_cli.io.checkpoint import load_quantized, quant_layers
from peqa_cli.io.delta import apply_delta, check_compatible, load_delta
from peqa_cli.recipes.finetune import FinetuneRecipe, TrainSettings, load_tokenizer, run
from peqa_cli.train import testing
from peqa_cli.train.signals import TrainingInterrupted
from peqa_cli.train.state import complete_checkpoints


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-assets")
    float_dir = testing.save_float_model(root / "float")
    return {
        "root": root,
        "float": float_dir,
        "q4": testing.save_quantized_model(root / "q4", float_dir, bits=4, group_size=32),
        "q3": testing.save_quantized_model(root / "q3", float_dir, bits=3, group_size=48),
        "text": testing.write_text_jsonl(root / "text.jsonl", rows=60),
        "alpaca": testing.write_alpaca_jsonl(root / "alpaca.jsonl", rows=24),
    }


def recipe(out, model, data, fmt="text", max_length=32, val_size=0.0, **train) -> FinetuneRecipe:
    """A recipe built in Python (the CLI tests cover YAML); one metrics record per step."""
    train.setdefault("log_every", 1)
    return FinetuneRecipe(
        model=str(model),
        data=DataConfig(path=str(data), format=fmt, max_length=max_length, val_size=val_size),
        train=TrainSettings(**train),
        out=str(out),
    )


def delta_tensors(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "adapter_model.safetensors"))


def metrics(out, kind="train") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_loss_falls_and_only_scales_change(tmp_path, assets):
    out = tmp_path / "run"
    cfg = recipe(out, assets["q3"], assets["text"], lr=0.02, max_steps=15, batch_size=8,
                 scheduler="constant", val_size=8)  # fmt: skip
    summary = run(cfg)
    losses = [r["loss"] for r in metrics(out)]
    assert len(losses) == 15 and summary["steps"] == 15
    assert sum(losses[-5:]) / 5 < losses[0] - 0.1, losses
    assert summary["val_loss"] < summary["val_loss_start"] - 0.1

    # The base on disk and a base with the delta applied differ only in their scales.
    base, tuned = load_quantized(assets["q3"]), load_quantized(assets["q3"])
    delta = load_delta(out / "final")
    check_compatible(delta, tuned.model, base.fingerprint, 3, 48)
    apply_delta(tuned.model, delta)
    sb, st = base.model.state_dict(), tuned.model.state_dict()
    for name, t in sb.items():
        if name.endswith(".scales"):
            assert not torch.equal(t, st[name]), name
        else:
            assert torch.equal(t, st[name]), name  # integers, zeros, g_idx, embeddings, norms


def test_delta_metadata_and_size(tmp_path, assets):
    out = tmp_path / "run"
    summary = run(recipe(out, assets["q4"], assets["text"], max_steps=2))
    cfg = json.loads((out / "final" / "adapter_config.json").read_text())
    base = load_quantized(assets["q4"])
    assert cfg["base_fingerprint"] == base.fingerprint
    assert (cfg["bits"], cfg["group_size"]) == (4, 32)
    assert cfg["base_path"] == str(assets["q4"].resolve())
    assert cfg["recipe"]["train"]["max_steps"] == 2 and cfg["recipe"]["data"]["format"] == "text"
    assert set(cfg["layers"]) == set(quant_layers(base.model))
    n_scales = sum(m.scales.numel() for m in quant_layers(base.model).values())
    assert summary["trainable_params"] == n_scales
    assert summary["delta_bytes"] == sum(f.stat().st_size for f in (out / "final").iterdir())
    # readable by the team like the files around it (mkstemp / safetensors alone give 0600)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (out / "final").iterdir()}
    assert len(set(modes.values())) == 1 and modes["adapter_model.safetensors"] & 0o044, modes


def test_delta_refuses_another_base(tmp_path, assets):
    out = tmp_path / "run"
    run(recipe(out, assets["q4"], assets["text"], max_steps=1))
    delta = load_delta(out / "final")
    # Same shapes, bits and group size, different weights: only the fingerprint tells them apart.
    other_float = testing.save_float_model(tmp_path / "other-float", seed=1)
    other = load_quantized(testing.save_quantized_model(tmp_path / "other", other_float, 4, 32))
    with pytest.raises(CheckpointError, match="belongs to another base"):
        check_compatible(delta, other.model, other.fingerprint, 4, 32)
    q3 = load_quantized(assets["q3"])
    with pytest.raises(CheckpointError, match="bits=4"):
        check_compatible(delta, q3.model, q3.fingerprint, 3, 48)


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # optimizer.step is stubbed
def test_loss_ignores_masked_prompt_tokens(tmp_path, assets):
    """The trainer's step loss is the token mean of a cross-entropy that skips -100 labels."""
    from peqa_cli.recipes.finetune import make_accelerator
    from peqa_cli.train.loop import LoopSettings, Trainer

    cfg = recipe(tmp_path / "run", assets["q4"], assets["alpaca"], fmt="alpaca", max_length=64)
    tok = load_tokenizer(assets["q4"])
    train_ds, _, _ = build_datasets(cfg.data, tok, model_max_length=256)
    from peqa_cli.data import make_dataloader

    group = list(make_dataloader(train_ds, tok, 3, shuffle=False))[:2]
    masked = sum(int((b["labels"] == -100).sum() - (b["input_ids"] == tok.pad_token_id).sum())
                 for b in group)  # fmt: skip
    assert masked > 0  # the prompts really are masked

    model = load_quantized(assets["q4"]).model
    ref_model = load_quantized(assets["q4"]).model
    settings = LoopSettings(
        lr=1e-3, scheduler="constant", warmup_steps=0, total_steps=1, steps_per_epoch=1,
        batch_size=3, grad_accum=2, max_grad_norm=0.0, weight_decay=0.0, adam_betas=(0.9, 0.999),
        adam_eps=1e-8, gradient_checkpointing=False, seed=0, shuffle=False, eval_every=0,
        eval_batches=0, eval_batch_size=0, eval_at_start=False, save_every=0, keep_last=1,
        log_every=1,
    )  # fmt: skip
    trainer = Trainer(make_accelerator(cfg, tmp_path), model, tok, train_ds, None, settings,
                      tmp_path, "fp")  # fmt: skip
    grads = {}
    trainer.optimizer.step = lambda: grads.update(  # capture gradients instead of stepping
        {n: p.grad.clone() for n, p in trainer.scales.items()}
    )
    loss, _, _ = trainer._step(group)

    # Reference: one big masked cross-entropy over both micro-batches, autograd on the scales.
    for p in ref_model.parameters():
        p.requires_grad_(False)
    ref_scales = {n: m.scales.requires_grad_(True) for n, m in quant_layers(ref_model).items()}
    total, count = 0.0, 0
    for b in group:
        logits = ref_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        target = b["labels"][:, 1:]
        total = total + F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(),
                                        ignore_index=-100, reduction="sum")  # fmt: skip
        count += int((target != -100).sum())
    ref = total / count
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_scales[n].grad, rtol=1e-4, atol=1e-7)


def _interrupt_at(step: int):
    def on_step(state):
        if state.step == step:
            os.kill(os.getpid(), signal.SIGINT)  # the real handler: finish the step, save, exit

    return on_step


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, assets):
    # 31 windows of 64 tokens, 4 for validation, 27 / (2 x 2) rows per step = 6 steps per
    # epoch: the run crosses epoch boundaries after the interruption, with shuffling,
    # accumulation, warmup and decay.
    kw = dict(lr=0.01, max_steps=10, batch_size=2, grad_accum=2, warmup_steps=2, max_length=64,
              scheduler="cosine", save_every=2, keep_last=2, val_size=4, eval_every=4)  # fmt: skip
    straight = tmp_path / "straight"
    run(recipe(straight, assets["q4"], assets["text"], **kw))

    resumed = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted) as info:
        run(recipe(resumed, assets["q4"], assets["text"], **kw), on_step=_interrupt_at(5))
    assert info.value.exit_code == 130
    assert "SIGINT" in info.value.message and "--resume" in info.value.message
    assert [s for s, _ in complete_checkpoints(resumed)] == [4, 5]  # keep_last 2
    assert not (resumed / "final").exists()
    (resumed / "checkpoints" / ".step-8.tmp").mkdir()  # a crashed save: must be ignored

    summary = run(recipe(resumed, assets["q4"], assets["text"], **kw), resume=True)
    assert summary["resumed_from"].endswith("step-5")
    a, b = delta_tensors(straight), delta_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert metrics(straight) == [
        {**r, "time": m["time"], "tokens_per_s": m["tokens_per_s"]}
        for r, m in zip(metrics(resumed), metrics(straight), strict=True)
    ]  # the log reads like one run (time and speed aside)
    assert [r["step"] for r in metrics(resumed, "eval")] == [0, 4, 8, 10]
    assert not (resumed / "checkpoints" / ".step-8.tmp").exists()


def test_resume_without_checkpoint_starts_fresh_and_rejects_another_base(tmp_path, assets):
    out = tmp_path / "run"
    run(recipe(out, assets["q4"], assets["text"], max_steps=2), resume=True)  # nothing to resume
    assert (out / "final").is_dir()
    with pytest.raises(CheckpointError, match="another base"):
        run(recipe(out, assets["q3"], assets["text"], max_steps=3), resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, assets, monkeypatch):
    import peqa_cli.train.optim as optim

    real = optim.token_loss_sum

    def poisoned(logits, labels):
        return real(logits, labels) * (math.nan if poisoned.calls > 5 else 1.0)

    def counting(logits, labels):
        poisoned.calls += 1
        return poisoned(logits, labels)

    poisoned.calls = 0
    monkeypatch.setattr(optim, "token_loss_sum", counting)
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"loss became nan at step 6.*step-4"):
        run(recipe(out, assets["q4"], assets["text"], max_steps=10, save_every=2, lr=1e-3))
    assert [s for s, _ in complete_checkpoints(out)] == [2, 4]
    assert not (out / "final").exists()


def test_gradient_checkpointing_gives_the_same_run(tmp_path, assets):
    kw = dict(lr=0.01, max_steps=3, batch_size=4)
    run(recipe(tmp_path / "a", assets["q3"], assets["text"], **kw))
    run(recipe(tmp_path / "b", assets["q3"], assets["text"], gradient_checkpointing=True, **kw))
    a, b = delta_tensors(tmp_path / "a"), delta_tensors(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_trains(tmp_path, assets):
    out = tmp_path / "run"
    summary = run(recipe(out, assets["q4"], assets["text"], max_steps=3, lr=0.01,
                         mixed_precision="bf16"))  # fmt: skip
    assert summary["steps"] == 3 and math.isfinite(summary["train_loss"])
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in delta_tensors(out).values())
