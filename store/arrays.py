"""Entry and its arrays: numpy views of what is stored, torch tensors only on demand; bfloat16 as uint16 bits."""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import numpy as np

# how each dtype the store writes sits in memory: numpy has no bfloat16, so its bits are uint16
STORAGE = {"bfloat16": np.dtype("<u2"), "float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "int64": np.dtype("<i8")}
EMBED_DTYPES = ("bfloat16", "float16", "float32")
EXPONENT = {"bfloat16": (np.uint16, 0x7F80), "float16": (np.uint16, 0x7C00), "float32": (np.uint32, 0x7F800000)}


class Raw(NamedTuple):
    """An array as stored: float16/float32/int64 as such, bfloat16 as uint16 bits; dtype names which."""

    array: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape


def is_tensor(x: object) -> bool:
    """A torch tensor (without importing torch: a process that never imported it holds none)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def dtype_name(dtype: Any) -> str:
    """"bfloat16" for torch.bfloat16, np.dtype("float16") or "torch.bfloat16" alike."""
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        return np.dtype(dtype).name
    return str(dtype).removeprefix("torch.")


def dtype_of(x: Any) -> str:
    """The dtype name of a tensor, a numpy array or a Raw."""
    if isinstance(x, Raw):
        return x.dtype
    return dtype_name(getattr(x, "dtype", type(x).__name__))


def as_raw(x: Any) -> Raw:
    """A tensor (copied to the CPU if it is elsewhere), an array or a Raw as a contiguous Raw; views where it can."""
    if isinstance(x, Raw):
        return x if x.array.flags.c_contiguous else Raw(np.ascontiguousarray(x.array), x.dtype)
    if is_tensor(x):
        import torch

        t = x.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            return Raw(t.view(torch.int16).numpy().view(np.uint16), "bfloat16")
        return Raw(t.numpy(), dtype_name(t.dtype))
    if isinstance(x, np.ndarray):
        return Raw(np.ascontiguousarray(x), x.dtype.name)
    raise TypeError(f"a torch tensor or a numpy array, not {type(x).__name__}")


def to_tensor(raw: Raw) -> Any:
    """The torch tensor viewing a Raw's memory (no copy); imports torch."""
    import torch

    if raw.dtype == "bfloat16":
        return torch.from_numpy(raw.array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(raw.array)


def widen(raw: Raw, dtype: str = "float32") -> np.ndarray:
    """float32 (exact for every bfloat16 and float16 value, NaN payloads too), or "native" as is."""
    if raw.dtype == "bfloat16":
        if dtype == "native":
            raise ValueError("bfloat16 has no numpy dtype; use dtype='float32' (exact for every bfloat16 value)")
        return (raw.array.astype(np.uint32) << 16).view(np.float32)  # a bfloat16 is the top half of a float32
    if dtype == "float32" and raw.array.dtype.kind == "f":
        return raw.array.astype(np.float32)
    return raw.array


def raw_bytes(x: Any) -> np.ndarray:
    """The bytes of an array (or tensor) as a flat uint8 array viewing them (no copy when contiguous)."""
    return as_raw(x).array.reshape(-1).view(np.uint8)


def non_finite(raw: Raw) -> int:
    """How many NaN or Inf values: those whose exponent bits are all ones."""
    bits, mask = EXPONENT[raw.dtype]
    return int(np.count_nonzero((raw.array.view(bits) & mask) == mask))


class Entry:
    """One entry: its key, image_embeds [n_tokens, hidden] in the model's dtype, image_grid_thw int64 [1, 3], metadata.

    Made from torch tensors (or numpy arrays) by a writer, or read from a store as numpy views of the
    checked blob. image_embeds and image_grid_thw give torch tensors, made on first use from a read
    entry (viewing the same memory; torch is imported then); embeds_array, grid_array and numpy()
    never need torch.
    """

    def __init__(self, key: str, image_embeds: Any, image_grid_thw: Any, meta: dict[str, str] | None = None):
        self.key = key
        self.image_embeds = image_embeds
        self.image_grid_thw = image_grid_thw
        self.meta = {} if meta is None else meta

    @property
    def image_embeds(self) -> Any:  # torch.Tensor
        if self._embeds is None:
            self._embeds = to_tensor(self._embeds_raw)
        return self._embeds

    @image_embeds.setter
    def image_embeds(self, value: Any) -> None:
        self._embeds, self._embeds_raw = (None, value) if isinstance(value, Raw) else (value, None)

    @property
    def image_grid_thw(self) -> Any:  # torch.Tensor
        if self._grid is None:
            self._grid = to_tensor(self._grid_raw)
        return self._grid

    @image_grid_thw.setter
    def image_grid_thw(self, value: Any) -> None:
        self._grid, self._grid_raw = (None, value) if isinstance(value, Raw) else (value, None)

    @property
    def raw_embeds(self) -> Raw:
        """The embeddings as stored, without torch: (numpy array, dtype name); bfloat16 as its uint16 bits."""
        return self._embeds_raw if self._embeds_raw is not None else as_raw(self._embeds)

    @property
    def embeds_array(self) -> np.ndarray:
        """A numpy view of the embeddings: float16 or float32 as such, bfloat16 as uint16 bits (see numpy())."""
        return self.raw_embeds.array

    @property
    def embeds_dtype(self) -> str:
        """"bfloat16", "float16" or "float32"."""
        return dtype_of(self._embeds_raw if self._embeds_raw is not None else self._embeds)

    @property
    def grid_array(self) -> np.ndarray:
        """image_grid_thw as numpy (int64 [1, 3] in a read entry)."""
        return (self._grid_raw if self._grid_raw is not None else as_raw(self._grid)).array

    def numpy(self, dtype: str = "float32") -> np.ndarray:
        """The embeddings as numpy: "float32" widens bfloat16/float16 exactly; "native" float16/float32 as is."""
        return widen(self.raw_embeds, dtype)

    @property
    def n_tokens(self) -> int:
        return int((self._embeds_raw if self._embeds is None else self._embeds).shape[0])

    @property
    def nbytes(self) -> int:
        """The embeddings' size in bytes."""
        return int((self._embeds_raw.array if self._embeds is None else self._embeds).nbytes)  # tensors have it too

    def __getstate__(self) -> dict:
        """Pickled as read: a tensor made from the arrays is made again, still sharing their memory."""
        state = dict(self.__dict__)
        for name in ("_embeds", "_grid"):
            if state[name + "_raw"] is not None:
                state[name] = None
        return state

    def __repr__(self) -> str:
        shape = list((self._embeds_raw if self._embeds is None else self._embeds).shape)
        return f"Entry({self.key!r}, {self.embeds_dtype} {shape}, meta={len(self.meta)} fields)"
