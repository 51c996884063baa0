"""``peqa generate``: answer a prompt with a model and, in turn, with each of several deltas.

The base is loaded once. Each delta is checked against it (fingerprint, layers, shapes,
bits, group size, finite values) before anything is generated, then applied in place
(``apply_delta``: s = s0 + Δs per layer, milliseconds), answers, and gives way to the next:
the task switching that PEQA's scale-only deltas allow. Decoding is greedy unless a
temperature is given; answers stream to stdout as they are produced.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from peqa_cli.errors import InputError
from peqa_cli.io.delta import ScaleDelta, apply_delta, check_compatible, load_delta, remove_delta
from peqa_cli.io.models import LoadedModel, load_model
from peqa_cli.recipes.quantize import resolve_device

log = logging.getLogger(__name__)


@dataclass
class GenerateSettings:
    max_new_tokens: int = 128
    chat: bool | None = None  # None: use the chat template when the tokenizer has one
    temperature: float = 0.0  # 0 = greedy
    top_p: float | None = None
    seed: int = 0  # sampling only: every answer starts from the same seed

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens: {self.max_new_tokens} (must be at least 1)")
        if self.temperature < 0:
            raise InputError(f"--temperature: {self.temperature} (0 = greedy, or a positive value)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"--top-p: {self.top_p} (must be in (0, 1])")


class TaskSwitcher:
    """One loaded model; deltas come and go in place."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer

    @classmethod
    def load(cls, spec: str, device: str = "auto") -> TaskSwitcher:
        return cls(load_model(spec, device=resolve_device(device)))

    def check(self, delta: ScaleDelta) -> None:
        """Refuse a delta unless it belongs to this base."""
        q = self.loaded.quantized
        if q is None:
            raise InputError(
                f"{self.loaded.name} is a float model; --delta needs the peqa/GPTQ checkpoint "
                "the delta was trained on"
            )
        check_compatible(delta, q.model, q.fingerprint, q.spec.bits, q.spec.group_size)

    def use(self, delta: ScaleDelta | None) -> float:
        """Switch to ``delta`` (None: the base) in place; returns the switch time in ms."""
        if delta is not None:
            self.check(delta)
        t0 = time.perf_counter()
        if delta is None:
            remove_delta(self.model)
        else:
            apply_delta(self.model, delta)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    def encode(self, prompt: str, chat: bool | None) -> torch.Tensor:
        """Prompt ids [1, T]: through the chat template when asked (or by default if any)."""
        tok = self.tokenizer
        has_template = bool(getattr(tok, "chat_template", None))
        if chat and not has_template:
            raise InputError(
                f"{self.loaded.name}: the tokenizer has no chat template; use --no-chat for a raw completion"
            )
        if has_template if chat is None else chat:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
        return ids.to(self.model.device)

    def _stop_ids(self) -> list[int]:
        ids: list[int] = []
        for value in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            ids += value if isinstance(value, list) else [] if value is None else [value]
        return sorted(set(ids))

    @torch.inference_mode()
    def generate(self, prompt: str, settings: GenerateSettings, streamer=None) -> list[int]:
        """New token ids for ``prompt`` with whatever delta is in place."""
        from transformers import GenerationConfig

        ids = self.encode(prompt, settings.chat)
        stop = self._stop_ids()
        pad = self.tokenizer.pad_token_id
        sample = settings.temperature > 0
        gen = GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=sample,
            eos_token_id=stop or None,
            pad_token_id=pad if pad is not None else (stop[0] if stop else None),
            **(
                {"temperature": settings.temperature, "top_p": settings.top_p or 1.0}
                if sample
                else {}
            ),
        )
        if sample:
            torch.manual_seed(settings.seed)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=gen,
            streamer=streamer,
        )
        return out[0, ids.shape[1] :].tolist()


def run(
    model: str, deltas: list[str], prompt: str, settings: GenerateSettings, device: str = "auto"
) -> list[dict]:
    """Answer ``prompt`` with the model alone, or with each delta in turn; answers stream to
    stdout (preceded by ``[delta]`` when there are several)."""
    from transformers import TextStreamer

    settings.check()
    loaded = [load_delta(d) for d in deltas]  # a missing or corrupt delta: before loading
    switcher = TaskSwitcher.load(model, device)
    for delta in loaded:  # a delta for another base: before generating anything
        switcher.check(delta)
    results = []
    for name, delta in zip(deltas or [None], loaded or [None], strict=True):
        ms = switcher.use(delta)
        if len(deltas) > 1:
            print(f"[{name}]", flush=True)
        log.info("%s in %.2f ms", f"applied {name}" if name else "base model", ms)
        streamer = TextStreamer(switcher.tokenizer, skip_prompt=True, skip_special_tokens=True)
        tokens = switcher.generate(prompt, settings, streamer)
        results.append({"delta": name, "switch_ms": round(ms, 3), "new_tokens": len(tokens)})
    return results
