"""Fine-tuning data: load Alpaca / chat / plain-text data, tokenize with loss masks, batch.

Public API: ``DataConfig``, ``build_datasets``, ``make_dataloader``, ``Collator``,
``TokenizedDataset``, ``DataStats``.
"""

from peqa_cli.data.config import DataConfig
from peqa_cli.data.encode import IGNORE_INDEX
from peqa_cli.data.loader import Collator, EpochSampler, TokenizedDataset, make_dataloader
from peqa_cli.data.pipeline import DataStats, build_datasets

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "DataConfig",
    "DataStats",
    "EpochSampler",
    "TokenizedDataset",
    "build_datasets",
    "make_dataloader",
]
