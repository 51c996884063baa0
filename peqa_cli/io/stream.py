"""Tensor-by-tensor safetensors reading and writing with flat memory.

Why not ``safetensors.safe_open`` for the quantizer's input: it mmaps the whole file, and
every page touched stays resident (and counted in RSS) until the file is closed, so reading
a 5 GB shard costs 5 GB of RSS. Here each tensor is read with ``pread`` into its own
buffer and dropped after use, and outputs are written at precomputed offsets, so peak
memory is one tensor whatever the model size. The on-disk format is plain safetensors:
an 8-byte little-endian header length, a JSON header, then the tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from peqa_cli.errors import InputError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(groups: Iterable[Sequence[TensorSpec]], limit: int) -> list[list[TensorSpec]]:
    """Consecutive tensors into shards of at most ``limit`` bytes; a group (e.g. one layer's
    qweight/qzeros/scales/g_idx) never splits, and a group larger than ``limit`` gets a shard
    of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for group in groups:
        nbytes = sum(s.nbytes for s in group)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += nbytes
    return shards


class SafetensorsReader:
    """Validated header plus ``read(name)``; raises :class:`InputError` on a corrupt file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        bad = f"corrupt or truncated safetensors file: {self.path}"
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise InputError(f"{bad} (shorter than its 8-byte header length)")
                (hlen,) = struct.unpack("<Q", head)
                if hlen > _MAX_HEADER or 8 + hlen > size:
                    raise InputError(f"{bad} (header length {hlen} exceeds the file)")
                raw = f.read(hlen)
        except OSError as exc:
            raise InputError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{bad} (header is not valid JSON)") from None
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._base = 8 + hlen
        self._entries: dict[str, tuple[TensorSpec, int, int]] = {}
        end_max = 0
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{bad} (bad header entry for tensor '{name}')") from None
            spec = TensorSpec(name, dtype, shape)
            if end - start != spec.nbytes or start < 0:
                raise InputError(f"{bad} (tensor '{name}' has inconsistent offsets)")
            end_max = max(end_max, end)
            self._entries[name] = (spec, start, end)
        if self._base + end_max > size:
            raise InputError(
                f"{bad} (data ends at byte {self._base + end_max}, file has {size} bytes)"
            )

    def keys(self) -> list[str]:
        """Tensor names in file order (sorted by offset, i.e. the order they are stored)."""
        return sorted(self._entries, key=lambda n: self._entries[n][1])

    def spec(self, name: str) -> TensorSpec:
        return self._entries[name][0]

    def read(self, name: str) -> torch.Tensor:
        spec, start, end = self._entries[name]
        buf = bytearray(end - start)
        with open(self.path, "rb") as f:
            f.seek(self._base + start)
            got = f.readinto(buf)
        if got != len(buf):
            raise InputError(f"corrupt or truncated safetensors file: {self.path} (short read)")
        if not buf:
            return torch.empty(spec.shape, dtype=spec.dtype)
        return torch.frombuffer(buf, dtype=spec.dtype).reshape(spec.shape)


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are known in advance, one tensor at a time.

    The header (names, dtypes, shapes, offsets) is written first from ``specs``; each
    :meth:`write` then puts one tensor's bytes at its offset. :meth:`close` checks that
    every planned tensor arrived, so a crashed job never leaves a plausible-looking file.
    """

    def __init__(
        self, path: str | os.PathLike, specs: list[TensorSpec], metadata: dict | None = None
    ) -> None:
        self.path = Path(path)
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._offsets: dict[str, tuple[TensorSpec, int]] = {}
        for spec in specs:
            header[spec.name] = {
                "dtype": NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            self._offsets[spec.name] = (spec, offset)
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment, as safetensors pads its header
        self._base = 8 + len(raw)
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._f.truncate(self._base + offset)
        self._pending = set(self._offsets)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec, offset = self._offsets[name]
        assert tensor.dtype == spec.dtype and tuple(tensor.shape) == spec.shape, (
            f"{name}: planned {spec.dtype}{list(spec.shape)}, got {tensor.dtype}{list(tensor.shape)}"
        )
        data = tensor.detach().contiguous().cpu()
        self._f.seek(self._base + offset)
        if data.numel():
            # Raw bytes through a uint8 view: no copy, and numpy needs no bf16 support.
            self._f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._pending.discard(name)

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        assert not self._pending, f"{self.path}: tensors never written: {sorted(self._pending)[:5]}"
