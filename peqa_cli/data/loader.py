"""Dataset, collator and a seeded, resumable sampler for the trainer.

Resuming: the order of epoch ``e`` is ``torch.randperm(n)`` drawn from a generator seeded
with ``epoch_seed(seed, e)``, a pure function of (seed, epoch, n), so a checkpoint only needs
(epoch, batches done in that epoch); pass the latter as ``skip_batches`` to
``make_dataloader`` to continue with exactly the next batch (``accelerate.skip_first_batches``
on the same loader gives the same result).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from peqa_cli.data.encode import IGNORE_INDEX, Example
from peqa_cli.errors import InputError


class TokenizedDataset(Dataset):
    """A list of examples (``input_ids``/``labels`` token-id lists, ``position_ids`` if packed)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    @property
    def num_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)

    @property
    def num_trainable_tokens(self) -> int:
        return sum(sum(t != IGNORE_INDEX for t in e["labels"]) for e in self.examples)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (many causal LMs define no pad token)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise InputError("the tokenizer has neither a pad nor an EOS token to pad batches with")


class Collator:
    """Right-pads a list of examples to the longest one and returns torch tensors.

    ``input_ids`` pad with the pad id, ``labels`` with -100, ``attention_mask`` 1 on real
    tokens. For packed examples (which carry ``position_ids``):

    * ``isolate_packed=False`` (default): ``position_ids`` are dropped, so positions run on
      across pieces and each piece attends to the earlier pieces of its row, the usual packing
      trade-off (cheap, slight cross-example leakage).
    * ``isolate_packed=True``: returns ``position_ids`` (restarting per piece, pads 0; 0..n-1
      for a row that is not packed) and *no*
      ``attention_mask``; transformers >= 4.56 then builds a block-diagonal causal mask from the
      position ids, so pieces do not see each other. Right padding needs no mask for a causal
      LM (real tokens never attend to later pads; pad labels are -100). This detection only
      runs without a KV cache: call the model with ``use_cache=False``.
    """

    def __init__(
        self, tokenizer: Any, *, isolate_packed: bool = False, pad_to_multiple_of: int = 1
    ) -> None:
        self.pad_id = pad_token_id(tokenizer)
        self.isolate_packed = isolate_packed
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        assert batch, "empty batch"
        m = self.pad_to_multiple_of
        width = -(-max(len(e["input_ids"]) for e in batch) // m) * m
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
            mask[row, :n] = 1
            # A row without position_ids is one piece (e.g. an unpacked val set).
            pos[row, :n] = torch.tensor(e.get("position_ids", range(n)), dtype=torch.long)
        if self.isolate_packed:
            return {"input_ids": ids, "labels": labels, "position_ids": pos}
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def epoch_seed(seed: int, epoch: int) -> int:
    """Generator seed of one epoch: a hash of (seed, epoch), stable across machines and runs.

    Not ``seed + epoch``: with that, run seed 1 epoch 0 replays run seed 0 epoch 1, so
    "different seeds" would share their epoch orders, shifted by one.
    """
    digest = hashlib.sha256(f"peqa-data:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: always a valid torch seed


class EpochSampler(Sampler[int]):
    """Indices of one epoch: seeded permutation (``epoch_seed``) or in order, from ``start``."""

    def __init__(
        self, n: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, start: int = 0
    ) -> None:
        self.n, self.shuffle, self.seed, self.epoch, self.start = n, shuffle, seed, epoch, start

    def set_epoch(self, epoch: int) -> None:
        """Next epoch from its beginning (the skip applies only to the resumed epoch)."""
        self.epoch, self.start = epoch, 0

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return max(0, self.n - self.start)


def make_dataloader(
    dataset: TokenizedDataset,
    tokenizer: Any,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    skip_batches: int = 0,
    isolate_packed: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset`` for one epoch, starting after ``skip_batches`` batches.

    Same (seed, epoch, batch_size) -> same batches in the same order, on any machine.
    Single process (``num_workers=0``): collation of token-id lists is cheap next to a
    forward pass, and workers would only duplicate the dataset in memory.
    """
    assert batch_size >= 1, "batch_size must be >= 1"
    sampler = EpochSampler(
        len(dataset), shuffle=shuffle, seed=seed, epoch=epoch, start=skip_batches * batch_size
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=Collator(tokenizer, isolate_packed=isolate_packed),
        drop_last=drop_last,
        num_workers=0,
    )
