"""Conversion between numpy arrays / torch tensors and the wire's raw little-endian tensors.

Inputs may be numpy arrays or torch tensors of any floating dtype (any device); they are rounded
to the worker's model dtype (round to nearest even) and sent with their own shape, so the worker,
not this module, judges whether a shape is right and names the field when it is not. Outputs come
back in the kind of the query: a torch tensor in the model dtype on the query's device for a torch
query, else a numpy array (float16 for fp16; float32 holding the exact bfloat16 values for bf16,
numpy having no bfloat16).
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:  # torch is optional: numpy-only routers never import it
    import torch
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None

__all__ = ["FP16", "BF16", "FP32", "is_torch", "to_wire_bytes", "from_wire"]

# Model dtypes by their Describe names (ModelShape.dtype).
FP16 = "float16"
BF16 = "bfloat16"
FP32 = "float32"


def is_torch(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = np.isnan(values)
    if nan.any():
        rounded = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded)
    return rounded.astype("<u2")


def to_wire_bytes(x: Any, dtype: str) -> tuple[list[int], bytes]:
    """Shape and little-endian bytes of `x` rounded to `dtype` (FP16 or BF16)."""
    if is_torch(x):
        t = x.detach()
        if dtype == FP16:
            return list(t.shape), t.to(device="cpu", dtype=torch.float16).contiguous().numpy().tobytes()
        if dtype == BF16:
            bits = t.to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16)
            return list(t.shape), bits.numpy().tobytes()
        raise ValueError(f"model dtype {dtype} is not float16 or bfloat16")
    a = np.asarray(x)
    if dtype == FP16:
        return list(a.shape), np.ascontiguousarray(a, dtype="<f2").tobytes()
    if dtype == BF16:
        return list(a.shape), _bf16_bits(a.astype(np.float32, copy=False)).tobytes()
    raise ValueError(f"model dtype {dtype} is not float16 or bfloat16")


def from_wire(data: bytes, shape: list[int], dtype: str, like: Any = None) -> Any:
    """A tensor of `shape` from wire bytes, as torch (on `like`'s device) when `like` is torch."""
    if dtype == FP32:
        a = np.frombuffer(data, dtype="<f4").reshape(shape)
        if is_torch(like):
            return torch.from_numpy(a.copy()).to(like.device)
        return a
    if dtype == FP16:
        a = np.frombuffer(data, dtype="<f2").reshape(shape)
        if is_torch(like):
            return torch.from_numpy(a.copy()).to(like.device)
        return a
    if dtype == BF16:
        bits = np.frombuffer(data, dtype="<u2").reshape(shape)
        if is_torch(like):
            return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).to(like.device)
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    raise ValueError(f"wire dtype {dtype} is not float16, bfloat16 or float32")
