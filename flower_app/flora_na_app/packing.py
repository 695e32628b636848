"""A message's arrays as two objects: Flower 1.42 moves every Array of a message as an object
of its own, one HTTP request per object on each hop (ClientApp <-> SuperNode <-> SuperLink
<-> ServerApp, two at a time), and a round's LoRA factors and head are dozens of arrays. pack
puts them in one flat byte Array (each array's bytes at its own dtype, one after another: a
codec's int8 values, uint8 packed codes, int32 indices and float32 scales travel at their size)
and a layout (names, shapes and dtypes, JSON); unpack gives them back bit for bit. numpy only:
the ClientApp's per-message process imports no torch.
"""
from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord

KEYS = ("packed", "layout")


def pack(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of "packed" (the bytes of `arrays`, one after another, as uint8) and
    "layout" ([[name, shape, dtype], ...] as UTF-8 JSON bytes). ValueError for a dtype that is
    not a plain number (object, structured)."""
    other = {k: str(a.dtype) for k, a in arrays.items() if a.dtype.kind not in "biuf"}
    if other:
        raise ValueError(f"pack takes numeric arrays only, got {other}")
    layout = [[name, list(a.shape), a.dtype.str] for name, a in arrays.items()]
    flat = (np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                            for a in arrays.values()])
            if arrays else np.zeros(0, dtype=np.uint8))
    text = np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8).copy()
    return ArrayRecord(OrderedDict(packed=Array(flat), layout=Array(text)))


def unpack(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays `pack` put in `record`, in their order and dtypes, each its own copy."""
    if sorted(record.keys()) != sorted(KEYS):
        raise ValueError(f"expected a packed ArrayRecord ({KEYS}), got keys {list(record)}")
    flat = record["packed"].numpy()
    layout = json.loads(record["layout"].numpy().tobytes().decode())
    out, start = {}, 0
    for name, shape, dtype in layout:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out[name] = flat[start:start + size].copy().view(dtype).reshape(shape)
        start += size
    if start != flat.size:
        raise ValueError(f"the layout covers {start} bytes, the packed array holds {flat.size}")
    return out
