"""The portable model file: named tensors plus a JSON document, versioned and checksummed.

Layout (the safetensors layout, so the tensors can be read by other tools too)::

    8 bytes   N, little-endian unsigned: the header's length
    N bytes   JSON header: {"__metadata__": {...}, "<tensor>": {"dtype", "shape", "data_offsets"}, ...}
    ...       the tensors' bytes, little-endian, C order, at data_offsets from here

``__metadata__`` holds strings only: ``format`` (always ``s2meta-model``), ``format_version``,
``document`` (this package's JSON: model, settings, id maps) and ``sha256``. The checksum covers
the header without the ``sha256`` entry (serialised with sorted keys and no spaces) followed by
the tensor bytes, so any flipped byte anywhere is caught.

Reading never unpickles anything: a tensor is rebuilt from its dtype, shape and raw bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import torch

from ..errors import ModelFileError
from ..fileio import atomic_write_bytes

FORMAT = "s2meta-model"
FORMAT_VERSION = 1
_MAX_HEADER = 256 * 1024 * 1024   # a header is JSON ids and shapes; beyond this it is not our file

_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


def _canonical(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    # a byte view: bf16 and friends have no numpy twin, bytes of uint8 always do
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def write(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], document: Mapping[str, Any]) -> Path:
    """Writes `tensors` and the JSON-serialisable `document` to `path` atomically (temp file + rename)."""
    header: Dict[str, Any] = {}
    chunks = []
    offset = 0
    for name, tensor in tensors.items():
        if name == "__metadata__":
            raise ValueError("a tensor cannot be named '__metadata__'")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored")
        data = _tensor_bytes(tensor)
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                              "document": json.dumps(document, sort_keys=True, separators=(",", ":"))}
    digest = hashlib.sha256(_canonical(header))
    for chunk in chunks:
        digest.update(chunk)
    header["__metadata__"]["sha256"] = digest.hexdigest()
    encoded = _canonical(header)
    encoded += b" " * (-len(encoded) % 8)   # tensors start 8-byte aligned, as safetensors readers expect

    path = Path(path)
    atomic_write_bytes(path, [struct.pack("<Q", len(encoded)), encoded, *chunks])
    return path


def read(path: str | os.PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors on the CPU, document) of a model file; refuses anything it cannot vouch for.

    Raises:
        ModelFileError: no file, not a model file, a newer format version, truncated, or checksum mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no model file at {str(path)!r}")
    raw = path.read_bytes()
    where = f"model file {str(path)!r}"
    if len(raw) < 8:
        raise ModelFileError(f"{where} is truncated or not a model file: {len(raw)} bytes, less than its "
                             f"8-byte header length")
    (size,) = struct.unpack("<Q", raw[:8])
    if size > _MAX_HEADER:
        raise ModelFileError(f"{where} is not an s2meta_fast model file (its first 8 bytes are no header length)")
    if 8 + size > len(raw):
        raise ModelFileError(f"{where} is truncated: its header needs {size} bytes, only {len(raw) - 8} follow")
    try:
        header = json.loads(raw[8:8 + size].decode("utf-8"))
        meta = header["__metadata__"]
        identity = meta.get("format")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ModelFileError(f"{where} is corrupt or not an s2meta_fast model file (unreadable header)") from None
    if identity != FORMAT:
        raise ModelFileError(f"{where} is not an s2meta_fast model file (format {identity!r}, "
                             f"expected {FORMAT!r})")
    try:
        version = int(meta["format_version"])
    except (KeyError, ValueError, TypeError):
        raise ModelFileError(f"{where} is corrupt: its format version is unreadable") from None
    if version > FORMAT_VERSION:
        from .. import __version__
        raise ModelFileError(f"{where} has format version {version}, written by a newer s2meta_fast; this is "
                             f"s2meta_fast {__version__}, which reads format versions up to {FORMAT_VERSION}: "
                             f"upgrade s2meta_fast to load it")
    if version < 1:
        raise ModelFileError(f"{where} is corrupt: format version {version} does not exist")
    data = memoryview(raw)[8 + size:]
    entries = {name: spec for name, spec in header.items() if name != "__metadata__"}
    try:
        end = max((int(spec["data_offsets"][1]) for spec in entries.values()), default=0)
    except (KeyError, ValueError, TypeError, IndexError):
        raise ModelFileError(f"{where} is corrupt: a tensor entry has no valid data_offsets") from None
    if end > len(data):
        raise ModelFileError(f"{where} is truncated: its tensors need {end} bytes after the header, only "
                             f"{len(data)} are there")
    expected = meta.pop("sha256", None)
    digest = hashlib.sha256(_canonical(header))
    digest.update(data)
    if expected != digest.hexdigest():
        raise ModelFileError(f"{where} is corrupt: checksum mismatch (stored sha256 {str(expected)[:16]}…, "
                             f"content {digest.hexdigest()[:16]}…); the file was modified or damaged "
                             f"after it was written: export it again")
    # past the checksum the header is the one written, so its entries are well formed
    tensors = {}
    for name, spec in entries.items():
        lo, hi = spec["data_offsets"]
        dtype = _TORCH_DTYPES[spec["dtype"]]
        storage = torch.uint8 if dtype == torch.bool else dtype
        flat = torch.frombuffer(bytearray(data[lo:hi]), dtype=storage) if hi > lo else torch.empty(0, dtype=storage)
        tensors[name] = flat.to(dtype).reshape(spec["shape"])
    return tensors, json.loads(meta["document"])
