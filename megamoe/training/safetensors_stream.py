"""A safetensors file written tensor by tensor, so a checkpoint never holds all of a rank's tensors at
once (``safetensors.torch.save_file`` needs them all in memory). The header is written first from the
names, dtypes and shapes, then each tensor goes to its place as it is produced, in any order. The
result is an ordinary safetensors file: ``safetensors.safe_open`` reads it.

Format: u64 little-endian header size, a JSON header {name: {dtype, shape, data_offsets: [begin,
end)}, "__metadata__": {str: str}} padded with spaces to 8 bytes, then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.uint8: "U8", torch.int64: "I64", torch.int32: "I32"}


class StreamingSafetensors:
    """``with StreamingSafetensors(path, {name: (dtype, shape)}, metadata) as f: f.write(name, t)``;
    every declared tensor must be written in full (at once, or in flat ranges with
    :meth:`write_range`) before the file closes.

    A failed write (a full disk) does not raise at once: later writes are skipped and the error is
    raised when the file closes, so that a caller interleaving writes with collectives (the
    checkpoint's state gathering) keeps taking part in them and no peer waits for ever."""

    def __init__(self, path: str, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str]) -> None:
        header: dict[str, object] = {"__metadata__": metadata}
        self.spans: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, (dtype, shape) in layout.items():
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self.spans[name] = (offset, nbytes)
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.layout, self.path = layout, path
        self.missing = {name: span[1] for name, span in self.spans.items()}  # bytes still to write
        self.data_start = 8 + len(encoded)
        self.error: OSError | None = None
        self.file = open(path, "wb")
        self._guard(lambda: (self.file.write(struct.pack("<Q", len(encoded)) + encoded),
                             self.file.truncate(self.data_start + offset)))

    def _guard(self, action) -> None:
        if self.error is None:
            try:
                action()
            except OSError as e:
                self.error = e

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != tuple(self.layout[name][1]):
            raise ValueError(f"{name}: got shape {tuple(tensor.shape)}, declared {self.layout[name][1]}")
        self.write_range(name, 0, tensor.reshape(-1))

    def write_range(self, name: str, first: int, values: torch.Tensor) -> None:
        """Elements [first, first + len(values)) of tensor ``name`` (flattened, row-major)."""
        dtype, _ = self.layout[name]
        offset, nbytes = self.spans[name]
        size = values.element_size()
        if values.dtype != dtype or (first + values.numel()) * size > nbytes:
            raise ValueError(f"{name}: {values.dtype} [{first}, {first + values.numel()}) does not fit "
                             f"the declared {dtype} tensor")
        host = values.detach().to("cpu").contiguous().view(torch.uint8)
        self.missing[name] -= host.numel()
        if host.numel():
            self._guard(lambda: (self.file.seek(self.data_start + offset + first * size),
                                 self.file.write(host.numpy())))  # the buffer itself, no bytes copy

    def __enter__(self) -> StreamingSafetensors:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            unwritten = sorted(name for name, left in self.missing.items() if left)
            if exc_type is None and unwritten:
                raise RuntimeError(f"{self.path}: {len(unwritten)} declared tensors not fully written, "
                                   f"e.g. {unwritten[0]}")
            self._guard(lambda: (self.file.flush(), os.fsync(self.file.fileno())))
        finally:
            try:
                self.file.close()
            except OSError as e:
                self.error = self.error or e
        if exc_type is None and self.error is not None:
            raise self.error


_FROM_CODE = {code: dtype for dtype, code in _DTYPES.items()}


class SafetensorsReader:
    """A safetensors file read tensor by tensor with plain reads (no mmap): only the tensor asked for
    is ever in memory, and nothing stays resident once it is dropped (an mmap'd file's touched pages
    count toward the process's memory until it is closed). ``with SafetensorsReader(path) as f:
    f.shapes, f.dtypes, f.get(name)``. Raises ValueError on a file that is not safetensors."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = open(path, "rb")
        try:
            size = self.file.seek(0, os.SEEK_END)
            self.file.seek(0)
            (n,) = struct.unpack("<Q", self.file.read(8))
            if n > size - 8:
                raise ValueError("header larger than the file")
            header = json.loads(self.file.read(n))
            self.data_start = 8 + n
            self.entries = {k: v for k, v in header.items() if k != "__metadata__"}
            self.metadata: dict[str, str] = header.get("__metadata__") or {}
            self.shapes = {k: tuple(v["shape"]) for k, v in self.entries.items()}
            self.dtypes = {k: _FROM_CODE[v["dtype"]] for k, v in self.entries.items()}
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            self.file.close()
            raise ValueError(f"{path} is not a safetensors file ({type(e).__name__}: {e})") from None
        except BaseException:
            self.file.close()
            raise

    def get(self, name: str) -> torch.Tensor:
        begin, end = self.entries[name]["data_offsets"]
        self.file.seek(self.data_start + begin)
        data = bytearray(end - begin)
        if self.file.readinto(data) != end - begin:
            raise ValueError(f"{self.path} is truncated: {name} ends past the end of the file")
        flat = torch.frombuffer(data, dtype=self.dtypes[name]) if data else torch.empty(
            0, dtype=self.dtypes[name])
        return flat.reshape(self.shapes[name])

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
