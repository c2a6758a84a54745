"""The safetensors files of a model directory: written in shards, indexed, hashed, and read lazily.

One file is ``model.safetensors``; more follow Hugging Face's convention: ``model-00001-of-00003.safetensors``
... plus ``model.safetensors.index.json`` mapping every tensor name to its file. Reading goes through the
headers first (names, shapes, dtypes: no tensor data), then one tensor at a time from memory-mapped files, so
a checkpoint is never held in memory twice and a wrong shape is found before anything is allocated.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from typing import Iterator, Optional

import torch

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's default shard size

#: safetensors header dtype -> torch dtype.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

Header = dict[str, tuple[tuple[int, ...], torch.dtype]]


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


#: torch dtype -> safetensors header dtype (the inverse of SAFETENSORS_DTYPES).
_HEADER_DTYPES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class ShardWriter:
    """Writes tensors as safetensors shards of at most ``max_bytes`` of data each (a larger tensor gets a shard of
    its own), streaming: each tensor's bytes go to disk when it is added, so memory holds one tensor, not a shard.

    A shard's data is appended to a temporary file; when the shard is full its header is written and the data
    copied behind it (disk holds one shard twice, briefly). :meth:`finish` names the files and writes the index;
    a single shard is plain ``model.safetensors`` with no index.
    """

    def __init__(self, directory: str, max_bytes: int = DEFAULT_SHARD_BYTES, metadata: Optional[dict] = None) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_shard_bytes must be a positive integer, got {max_bytes!r}")
        self.directory, self.max_bytes, self.metadata = directory, max_bytes, metadata or {}
        self.entries: dict[str, dict] = {}  # the open shard's header
        self.data_path = os.path.join(directory, ".shard-data.partial")
        self.data = open(self.data_path, "wb")
        self.written: list[tuple[str, list[str]]] = []  # (temporary path, tensor names)
        self.names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name!r} added twice to one checkpoint")
        if tensor.dtype not in _HEADER_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors here")
        # An empty tensor can carry a zero stride (e.g. built from an empty NumPy array), which view() refuses.
        flat = tensor.detach().cpu().contiguous().reshape(-1) if tensor.numel() else torch.empty(0, dtype=tensor.dtype)
        raw = flat.view(torch.uint8).numpy()
        offset = self.data.tell()
        if self.entries and offset + raw.nbytes > self.max_bytes:
            self._close_shard()
            offset = 0
        self.data.write(raw.tobytes())
        self.entries[name] = {"dtype": _HEADER_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [offset, offset + raw.nbytes]}
        self.names.add(name)
        self.total_bytes += raw.nbytes

    def _close_shard(self) -> None:
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt", **self.metadata}, **self.entries},
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data that follows starts 8-byte aligned
        path = os.path.join(self.directory, f".shard-{len(self.written) + 1:05d}.partial")
        with open(path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 1 << 24)
        self.written.append((path, list(self.entries)))
        self.entries = {}
        self.data = open(self.data_path, "wb")

    def finish(self) -> dict[str, str]:
        """Write the open shard, give the shards their final names; returns ``{file name: SHA-256}``."""
        if self.entries or not self.written:
            self._close_shard()
        self.data.close()
        os.remove(self.data_path)
        count = len(self.written)
        final = [WEIGHTS_NAME] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        digests, weight_map = {}, {}
        for (path, names), name in zip(self.written, final):
            os.rename(path, os.path.join(self.directory, name))
            digests[name] = sha256_of(os.path.join(self.directory, name))
            weight_map.update(dict.fromkeys(names, name))
        if count > 1:
            with open(os.path.join(self.directory, INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2,
                          sort_keys=True)
        return digests


def weight_files(directory: str) -> list[str]:
    """File names of the directory's weights: the shards its index names, or ``model.safetensors``."""
    index = os.path.join(directory, INDEX_NAME)
    if not os.path.isfile(index):
        if not os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
            raise FileNotFoundError(f"{directory}: {WEIGHTS_NAME} is missing")
        return [WEIGHTS_NAME]
    weight_map = _read_index(index)
    files = sorted(set(weight_map.values()))
    for name in files:
        if not os.path.isfile(os.path.join(directory, name)):
            raise FileNotFoundError(f"{directory}: shard {name} named by {INDEX_NAME} is missing")
    return files


def _read_index(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{path}: no weight_map object")
    for tensor, file in weight_map.items():
        # A shard name is a plain file name in this directory: never a path that leaves it.
        if not isinstance(file, str) or os.path.basename(file) != file or not file.endswith(".safetensors"):
            raise ValueError(f"{path}: weight_map[{tensor!r}] = {file!r} is not a .safetensors file name")
    return weight_map


def read_header(path: str) -> Header:
    """``name -> (shape, torch dtype)`` from one safetensors file's header; no tensor data is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            header = {}
            for key in f.keys():
                info = f.get_slice(key)
                dtype = info.get_dtype()
                if dtype not in SAFETENSORS_DTYPES:
                    raise ValueError(f"{path}: tensor {key} has unsupported dtype {dtype}")
                header[key] = (tuple(info.get_shape()), SAFETENSORS_DTYPES[dtype])
            return header
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path}: unreadable safetensors file ({err})") from None


class TensorFiles(contextlib.AbstractContextManager):
    """Every tensor of a model directory by name, read one at a time after a header check.

    Each read maps its file only for that read and copies the tensor out: a mapping kept open (by a handle, or by
    a tensor viewing it) keeps the pages read through it resident, so reading a model block by block would end
    with the files in memory, once per mapping. (A context manager so callers
    need not change if handles are ever cached again.)
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.files = weight_files(directory)
        self.header: Header = {}
        self.file_of: dict[str, str] = {}
        for name in self.files:
            for key, info in read_header(os.path.join(directory, name)).items():
                if key in self.file_of:
                    raise ValueError(f"{directory}: tensor {key} is in both {self.file_of[key]} and {name}")
                self.header[key], self.file_of[key] = info, name
        self._check_index()

    def _check_index(self) -> None:
        index = os.path.join(self.directory, INDEX_NAME)
        if os.path.isfile(index) and _read_index(index) != self.file_of:
            raise ValueError(f"{index}: weight_map does not match the tensors the shards hold")

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, as stored (``KeyError`` when absent)."""
        from safetensors import SafetensorError, safe_open

        path = os.path.join(self.directory, self.file_of[name])
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name).clone()  # a view would keep the file's whole mapping resident
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ValueError(f"{path}: cannot read tensor {name} ({err})") from None

    def bytes_of(self, names: Optional[Iterator[str]] = None) -> int:
        """Stored bytes of ``names`` (all tensors by default), from the headers."""
        keys = self.header if names is None else names
        return sum(math.prod(self.header[k][0]) * self.header[k][1].itemsize for k in keys)

    def __exit__(self, *exc: object) -> None:
        return None


def verify_files(directory: str, files: list[str], expected: object) -> None:
    """Raise ``ValueError`` unless every file's SHA-256 matches ``expected`` (one digest for a single
    ``model.safetensors``, else ``{file name: digest}`` covering exactly ``files``)."""
    if isinstance(expected, str):
        expected = {WEIGHTS_NAME: expected}
    if not isinstance(expected, dict) or sorted(expected) != sorted(files):
        raise ValueError(f"{directory}: quantization_config.weights_sha256 does not list exactly the weight files "
                         f"{files} (got {str(expected)[:120]})")
    for name in files:
        if sha256_of(os.path.join(directory, name)) != expected[name]:
            raise ValueError(f"{os.path.join(directory, name)}: SHA-256 does not match "
                             "quantization_config.weights_sha256: the file is truncated, corrupted or was modified "
                             "after saving")
