"""How a float target array is kept on disk: one codec per cached feature location (and the logits).

A codec turns float values (N, V, *shape) into the arrays it stores, and back (float16 and float32 as
stored, the others as float32), and names the byte pipeline those arrays go through in zarr. The
scaled codecs hold codes of at most 8 bits with one float32 scale per (sample, view, channel) of a
map: for a (C, H, W) map, one scale per channel over H x W, and for a (C,) vector, one scale per
row over C. The scales are kept in a companion array (`scales.<location>`, `scales.logits`).

| codec              | stored                          | on the way to disk         |
|--------------------|---------------------------------|----------------------------|
| float32            | float32                         | zstd                       |
| float16            | float16                         | zstd                       |
| float16-shuffle    | float16                         | byte shuffle + zstd (blosc)|
| float16-bitshuffle | float16                         | bit shuffle + zstd (blosc) |
| bfloat16           | bfloat16 bits as uint16         | zstd                       |
| uint8              | round(x / s), s = max / 255     | zstd; x must be >= 0       |
| uint7 ... uint4    | round(x / s), s = max / (2^b-1) | zstd; x must be >= 0       |
| int8               | round(x / s), s = max|x| / 127  | zstd                       |
| float8             | e4m3 of x / s, s = max|x| / 448 | zstd                       |

The narrower unsigned codes are still kept one per byte: zstd's entropy coding takes the unused high
bits out, so a code of b bits costs about b bits less what its distribution leaves to compress.
numpy has no bfloat16 or float8, so torch does their rounding (to nearest even), and the stored
bits are plain unsigned integers. The shuffles use zarr's blosc codec, which is part of the zarr v3
spec (numcodecs' own shuffle filter is not, and zarr warns about it). Blosc has no checksum of its
own, but every chunk's rows are also tied to the chunk digests the store writes beside them.
"""

from __future__ import annotations

import numpy as np
import torch
from zarr.codecs import BloscCodec, ZstdCodec

from pipeline.errors import BkdError


class CodecError(BkdError):
    """Values a codec cannot store (negative values for uint8); the message says why and what to use."""


class Codec:
    """Float values kept as `dtype` on disk, at full float precision or rounded to it."""

    scaled = False  # with a companion array of per-(sample, view, channel) scales

    def __init__(self, name: str, dtype: str, shuffle: str | None = None):
        self.name, self.dtype, self.shuffle = name, dtype, shuffle

    def compressors(self, level: int, itemsize: int | None = None) -> list:
        """The zarr bytes-to-bytes codecs of the stored array."""
        if self.shuffle is None:
            return [ZstdCodec(level=level, checksum=True)]  # checksums make corrupted chunks detectable
        return [BloscCodec(cname="zstd", clevel=level, shuffle=self.shuffle, typesize=itemsize)]

    def encode(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(codes, scales or None) of float `values` (N, V, *shape)."""
        return np.asarray(values).astype(self.dtype), None

    def decode(self, codes: np.ndarray, scales: np.ndarray | None = None) -> np.ndarray:
        """Float values from what `encode` stored: float16 and float32 as stored (a loader's buffers stay
        that size), the others as float32."""
        return codes

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one (sample, view)'s scales for values of `shape` ((C, H, W) or (C,))."""
        return shape[:1] if len(shape) >= 2 else (1,)


class BFloat16(Codec):
    def __init__(self):
        super().__init__("bfloat16", "uint16")

    def encode(self, values):
        bits = torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(torch.bfloat16).view(torch.int16)
        return bits.numpy().view(np.uint16), None

    def decode(self, codes, scales=None):
        return torch.from_numpy(np.ascontiguousarray(codes).view(np.int16)).view(torch.bfloat16).float().numpy()


class Scaled(Codec):
    """Codes (of at most 8 bits, one per byte) of values divided by a scale per (sample, view, channel of a
    map / row of a vector)."""

    scaled = True

    def __init__(self, name: str, top: float, signed: bool):
        super().__init__(name, "uint8")
        self.top, self.signed = top, signed  # the largest code magnitude; whether values may be negative

    @staticmethod
    def _axes(values: np.ndarray) -> tuple[int, ...]:
        return tuple(range(3, values.ndim)) if values.ndim >= 4 else (2,)

    def scales(self, values: np.ndarray) -> np.ndarray:
        """(N, V, C) or (N, V, 1): the largest magnitude of each slice over `top`; 1 for an all-zero slice."""
        peak = np.abs(values).max(axis=self._axes(values), keepdims=True)
        scale = (peak / self.top).astype(np.float32)
        scale[~(scale > 0)] = 1.0  # all zero: any scale stores it exactly
        return scale

    def encode(self, values):
        values = np.asarray(values, np.float32)
        if not self.signed and values.size and values.min() < 0:
            raise CodecError(f"the {self.name} codec stores non-negative values (post-ReLU maps), and these reach "
                             f"{values.min():.3g}; use int8 or float8 for them")
        scale = self.scales(values)
        codes = self.quantise(values / scale)
        return codes, scale.reshape(scale.shape[:3])

    def decode(self, codes, scales=None):
        scale = scales.reshape(scales.shape + (1,) * (codes.ndim - scales.ndim))
        return self.dequantise(codes) * scale

    def quantise(self, x: np.ndarray) -> np.ndarray:
        if self.signed:
            return np.clip(np.rint(x), -self.top, self.top).astype(np.int8).view(np.uint8)
        return np.clip(np.rint(x), 0, self.top).astype(np.uint8)

    def dequantise(self, codes: np.ndarray) -> np.ndarray:
        return (codes.view(np.int8) if self.signed else codes).astype(np.float32)


class Float8(Scaled):
    """float8 e4m3 (4 exponent bits, 3 mantissa bits, largest 448) of the scaled values."""

    def __init__(self):
        super().__init__("float8", 448.0, signed=True)

    def quantise(self, x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()

    def dequantise(self, codes):
        return torch.from_numpy(np.ascontiguousarray(codes)).view(torch.float8_e4m3fn).float().numpy()


CODECS: dict[str, Codec] = {codec.name: codec for codec in (
    Codec("float32", "float32"),
    Codec("float16", "float16"),
    Codec("float16-shuffle", "float16", shuffle="shuffle"),
    Codec("float16-bitshuffle", "float16", shuffle="bitshuffle"),
    BFloat16(),
    Scaled("uint8", 255.0, signed=False),
    *(Scaled(f"uint{bits}", 2.0 ** bits - 1, signed=False) for bits in (7, 6, 5, 4)),
    Scaled("int8", 127.0, signed=True),
    Float8(),
)}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r} (known: {', '.join(CODECS)})") from None
