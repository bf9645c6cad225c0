"""Read and write tomograms: zarr format 2 with OME-NGFF 0.4 ``multiscales``, as in the Kaggle data.

Arrays are indexed ``[z, y, x]``. Level ``k`` is level 0 mean-binned by ``2**k`` per axis (odd edges
are averaged over the voxels that exist, so 630 -> 315 -> 158 as in the real data), with voxel size
``voxel_size * 2**k``; its OME translation is the true centre of its voxel 0,
:func:`czii_kit.coords.level_origin` (readers that ignore it, like copick, are off by half a
level-0 voxel at most). Chunks are blosc-lz4 compressed with byte shuffle, keyed with ``"/"``
(copick silently reads zeros from ``"."``-keyed stores). Works with zarr 2.18+ and zarr 3.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from czii_kit.atomic import atomic_dir
from czii_kit.errors import DataError, FileExistsNoForce
from czii_kit.layout import folder_spacing

DEFAULT_CHUNKS = (64, 256, 256)

NONFINITE_LIMIT = 1e-3
"""Largest fraction of NaN / infinite voxels a tomogram level may hold: they are filled with the mean
of the others (with a warning); more is refused as not a tomogram."""

_REFUSED_KINDS = {"b": "boolean", "c": "complex", "O": "Python objects", "S": "byte strings", "U": "strings",
                  "T": "strings", "V": "raw / structured records", "M": "dates", "m": "time spans"}
_told: set = set()


def warn_once(key, message: str, stacklevel: int = 3) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process only (one notice per store)."""
    if key in _told:
        return
    _told.add(key)
    warnings.warn(message, stacklevel=stacklevel)


def check_voxel_dtype(dtype, where: Path) -> None:
    """Refuse a ``dtype`` that cannot hold a tomogram; note once (per ``where``) that another real one is cast.

    Integers and float16/32/64 are read as float32; boolean, complex, object, string, record and
    date dtypes are refused.

    Raises
    ------
    DataError
        Naming ``where`` (the store level) and its dtype.
    """
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise DataError(where, f"voxels of dtype {dtype} are not numbers: not a tomogram") from None
    if dt.kind in _REFUSED_KINDS:
        raise DataError(where, f"voxels are {_REFUSED_KINDS[dt.kind]} ({dt}), not real numbers: not a tomogram "
                               "(czii_kit reads integer or float voxels)")
    if dt != np.float32:
        warn_once(("dtype", str(where)), f"{where}: voxels are {dt}; read as float32")


class VoxelCheck:
    """Count NaN / infinite voxels of a level while its chunks are read, then settle them once.

    ``count(block)`` after each block is read as float32; ``settle(volume)`` fills up to
    :data:`NONFINITE_LIMIT` of them with the mean of the finite voxels (one warning per store) and
    refuses more (:class:`DataError` naming the store).
    """

    def __init__(self, where: Path):
        self.where = Path(where)
        self.n_bad = 0

    def count(self, block: np.ndarray) -> None:
        """Add the non-finite voxels of ``block`` (float array, any shape)."""
        self.n_bad += int(block.size - np.count_nonzero(np.isfinite(block)))

    def settle(self, volume: np.ndarray) -> np.ndarray:
        """``volume`` (float32 ``[z, y, x]``, all blocks counted), its non-finite voxels filled in place."""
        if not self.n_bad:
            return volume
        frac = self.n_bad / max(volume.size, 1)
        if frac > NONFINITE_LIMIT:
            raise DataError(self.where, f"{self.n_bad} of {volume.size} voxels ({frac:.2%}) are NaN or infinite, "
                                        f"more than {NONFINITE_LIMIT:.1%}: not a usable tomogram")
        bad = ~np.isfinite(volume)
        volume[bad] = float(volume[~bad].mean(dtype=np.float64))
        warn_once(("nonfinite", str(self.where)), f"{self.where}: {self.n_bad} NaN or infinite voxel(s) "
                                                  f"({frac:.3%}) filled with the mean of the others")
        return volume


class ChunkFiles:
    """The chunk files of a zarr-v2 float32 array in a local folder, read and decompressed by czii_kit itself.

    zarr decompresses each chunk into a fresh array (and reads its file into a fresh bytes object) before
    copying it where it belongs; here both go into buffers each reading thread keeps, so a whole
    tomogram is read without fresh memory per chunk (a full-size tomogram in 9 chunks of 184 x 256 x 256,
    2 cores: 0.365 -> 0.26 s, 0.60 -> 0.45 CPU seconds). The same voxels as zarr's reading: the codec is numcodecs' own, built from the
    array's ``.zarray``. Only the plain case is read this way (:meth:`of`); anything else, and a region
    with a missing chunk file, is left to zarr.
    """

    def __init__(self, folder: Path, shape: tuple, chunks: tuple, separator: str, codec):
        self.folder, self.shape, self.chunks, self.separator, self.codec = folder, shape, chunks, separator, codec
        self._local = threading.local()

    @classmethod
    def of(cls, folder: str | Path, shape: tuple) -> ChunkFiles | None:
        """The reader of the array in ``folder`` (its ``.zarray``) when it is C-ordered little-endian float32
        of ``shape`` with at most a compressor (no filters), else ``None``."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / ".zarray").read_text())
            compressor = meta.get("compressor")
            plain = (meta.get("zarr_format") == 2 and meta.get("dtype") == "<f4" and meta.get("order") == "C"
                     and not meta.get("filters") and tuple(meta.get("shape", ())) == tuple(shape)
                     and len(meta.get("chunks", ())) == 3 and meta.get("dimension_separator", ".") in (".", "/")
                     and (compressor is None or isinstance(compressor, dict)) and sys.byteorder == "little")
            if not plain:
                return None
            codec = None
            if compressor is not None:
                from numcodecs import get_codec

                codec = get_codec(dict(compressor))
        except Exception:  # no or unreadable metadata, unknown codec: zarr reads it (and says what is wrong)
            return None
        return cls(folder, tuple(int(n) for n in shape), tuple(int(c) for c in meta["chunks"]),
                   meta.get("dimension_separator", "."), codec)

    def _buffers(self, nbytes: int) -> tuple[np.ndarray, memoryview]:
        """This thread's chunk buffer and a view of ``nbytes`` of its file buffer (grown as needed)."""
        local = self._local
        if getattr(local, "chunk", None) is None:
            local.chunk, local.raw = np.empty(self.chunks, np.float32), bytearray()
        if nbytes > len(local.raw):
            local.raw = bytearray(nbytes)
        return local.chunk, memoryview(local.raw)[:nbytes]

    def read_into(self, out: np.ndarray, key: tuple[slice, ...]) -> bool:
        """Voxels ``key`` (unit-step slices ``[z, y, x]``) written into ``out`` (float32, their shape); ``False``,
        with ``out`` partly written, when a chunk file is missing (zarr's fill value then applies). Errors of a
        file or its codec propagate."""
        ranges = [range(*k.indices(n)) for k, n in zip(key, self.shape, strict=True)]
        if any(r.step != 1 for r in ranges):
            raise ValueError(f"{self.folder}: unit-step slices only, got {key}")
        per_axis = [range(r.start // c, -(-r.stop // c)) if len(r) else range(0) for r, c in
                    zip(ranges, self.chunks, strict=True)]
        for iz in per_axis[0]:
            for iy in per_axis[1]:
                for ix in per_axis[2]:
                    idx = (iz, iy, ix)
                    file = self.folder / self.separator.join(str(i) for i in idx)
                    try:
                        with open(file, "rb") as fh:
                            n = os.fstat(fh.fileno()).st_size
                            chunk, view = self._buffers(n)
                            if fh.readinto(view) != n:
                                raise OSError(f"{file}: short read")
                    except FileNotFoundError:
                        return False
                    if self.codec is None:
                        if n != chunk.nbytes:
                            raise ValueError(f"chunk {file.name} holds {n} bytes, not the {chunk.nbytes} of a chunk")
                        chunk.reshape(-1).view(np.uint8)[:] = np.frombuffer(view, np.uint8)
                    else:
                        self.codec.decode(view, out=chunk)
                    src, dst = [], []
                    for i, r, c in zip(idx, ranges, self.chunks, strict=True):
                        lo, hi = max(r.start, i * c), min(r.stop, (i + 1) * c)
                        src.append(slice(lo - i * c, hi - i * c))
                        dst.append(slice(lo - r.start, hi - r.start))
                    out[tuple(dst)] = chunk[tuple(src)]
        return True


def _zarr():
    import zarr

    return zarr


def _zarr_major() -> int:
    return int(_zarr().__version__.split(".")[0])


def _blosc():
    from numcodecs import Blosc

    return Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)


@dataclass
class Tomogram:
    """A lazily opened tomogram level.

    Attributes
    ----------
    path : Path
        The ``.zarr`` group.
    level : str
        Multiscale dataset path (``"0"``, ``"1"``, ``"2"``).
    voxel_size : float
        Å per voxel at this level, from the ``multiscales`` metadata.
    array : zarr array
        Indexed ``[z, y, x]``; nothing is read until sliced.
    origin : float
        Å position of voxel 0's centre: 0 at the finest level, ``(voxel_size - finest) / 2`` at a
        mean-binned one. Pass it as ``origin`` to :mod:`czii_kit.coords` functions.
    """

    path: Path
    level: str
    voxel_size: float
    array: object
    origin: float = 0.0
    files: ChunkFiles | None = field(default=None, repr=False, compare=False)
    """Its chunk files where czii_kit reads them itself (:class:`ChunkFiles`), else ``None`` (zarr reads)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(nz, ny, nx)``."""
        return tuple(int(s) for s in self.array.shape)

    def read(self, z0: int = 0, z1: int | None = None) -> np.ndarray:
        """Slices ``z0 <= z < z1`` as float32 ``(z1 - z0, ny, nx)``; only those chunks are read."""
        nz = self.shape[0]
        z1 = nz if z1 is None else z1
        if not (0 <= z0 <= z1 <= nz):
            raise ValueError(f"{self.path}: z range {z0}:{z1} outside 0:{nz}")
        try:
            block = np.asarray(self.array[z0:z1], dtype=np.float32)
        except Exception as exc:  # corrupt chunk, missing codec, ...
            raise DataError(self.path / self.level, f"cannot read voxels: {exc}") from exc
        check = VoxelCheck(self.path / self.level)
        check.count(block)
        return check.settle(block)

    def __getitem__(self, key) -> np.ndarray:
        return np.asarray(self.array[key], dtype=np.float32)

    def read_into(self, out: np.ndarray, key: tuple[slice, ...]) -> None:
        """Voxels ``key`` (slices ``[z, y, x]``) written into ``out`` (float32, their shape, may be a view of a
        larger array): decompressed straight into it when the array is float32 zarr, else read and copied.
        Errors of the store propagate (see :func:`czii_kit.volumes.read_volume`)."""
        if self.files is not None and self.files.read_into(out, key):
            return
        arr = self.array
        if getattr(arr, "dtype", None) == np.float32 and hasattr(arr, "get_basic_selection"):
            if _zarr_major() >= 3:
                from zarr.core.buffer.cpu import NDBuffer

                arr.get_basic_selection(key, out=NDBuffer.from_numpy_array(out))
            else:
                arr.get_basic_selection(key, out=out)
            return
        out[...] = arr[key]


def _read_attrs(path: Path) -> dict:
    """Group attributes, from ``.zattrs`` (zarr 2 format) or ``zarr.json`` (zarr 3 format)."""
    if (path / ".zattrs").is_file():
        src = path / ".zattrs"
        try:
            return json.loads(src.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(src, f"not valid JSON: {exc}") from exc
    if (path / "zarr.json").is_file():
        src = path / "zarr.json"
        try:
            return json.loads(src.read_text()).get("attributes", {})
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(src, f"not valid JSON: {exc}") from exc
    return {}


UNIT_ANGSTROM = {"angstrom": 1.0, "nanometer": 10.0, "micrometer": 1e4, "millimeter": 1e7, "picometer": 0.01}
"""Å per unit of the OME-NGFF space units a ``multiscales`` scale may be given in (no unit: Å)."""


def _axis_unit(ms: dict, path: Path) -> float:
    """Å per unit of the x axis of a ``multiscales`` entry (OME 0.4+ axes dicts; 0.3 names: Å)."""
    axes = ms.get("axes") or []
    unit = axes[-1].get("unit") if axes and isinstance(axes[-1], dict) else None
    if unit is None:
        return 1.0
    if str(unit).lower() not in UNIT_ANGSTROM:
        raise DataError(path, f"'multiscales' axis unit {unit!r} is not a length unit ({', '.join(UNIT_ANGSTROM)})")
    return UNIT_ANGSTROM[str(unit).lower()]


def _check_axes(ms: dict, path: Path) -> None:
    """A :class:`DataError` when the ``multiscales`` axes are named in another order than z, y, x."""
    axes = ms.get("axes") or []
    names = [a.get("name") if isinstance(a, dict) else a for a in axes]
    if names and all(isinstance(n, str) for n in names) and [n.lower() for n in names] != ["z", "y", "x"]:
        raise DataError(path, f"array axes are ({', '.join(names)}); czii_kit reads tomograms as [z, y, x] "
                              "(the Kaggle / OME-NGFF order): rewrite the array in that order")


def read_multiscales(path: str | Path) -> list[tuple[str, float]]:
    """``[(dataset path, voxel size Å), ...]`` from the OME-NGFF ``multiscales`` metadata, finest first.

    Scales given in another length unit (``axes[...]["unit"]``, e.g. nanometer) are converted to Å.
    A store without that metadata falls back, with a warning, to the voxel size in its
    ``VoxelSpacing{size}`` folder name (nominal: 10.000 for the real data's 10.012444 Å) and to the
    3D arrays it holds (:func:`_levels_without_metadata`).

    Raises
    ------
    DataError
        If the store is missing, or its metadata is unusable and there is no fallback.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(path, "no such zarr group")
    if not any((path / f).is_file() for f in (".zgroup", ".zarray", "zarr.json")):
        raise DataError(path, "not a zarr group (no .zgroup, .zarray or zarr.json)")
    attrs = _read_attrs(path)
    ms = attrs.get("multiscales")
    if not ms and isinstance(attrs.get("ome"), dict):  # OME-NGFF 0.5 nests it under "ome"
        ms = attrs["ome"].get("multiscales")
    if not ms:
        return _levels_without_metadata(path)
    out = []
    try:
        _check_axes(ms[0], path)
        unit = _axis_unit(ms[0], path)
        for ds in ms[0]["datasets"]:
            scale = next(t["scale"] for t in ds["coordinateTransformations"] if t["type"] == "scale")
            out.append((str(ds["path"]), float(scale[-1]) * unit))
    except (KeyError, IndexError, TypeError, StopIteration, ValueError, AttributeError) as exc:
        raise DataError(path, f"malformed 'multiscales' metadata ({exc!r})") from exc
    if not out:
        raise DataError(path, "'multiscales' metadata lists no datasets")
    bad = [(k, vs) for k, vs in out if not (vs > 0 and vs < float("inf"))]
    if bad:
        raise DataError(path, f"'multiscales' level {bad[0][0]!r} has a non-positive voxel size {bad[0][1]!r}")
    return sorted(out, key=lambda t: t[1])


def _levels_without_metadata(path: Path) -> list[tuple[str, float]]:
    """Levels of a store without ``multiscales``: the voxel size from the ``VoxelSpacing`` folder name.

    The store itself when it is an array (level ``""``), else its 3D arrays; the widest is level 0
    at the folder's voxel size, the others at that size times the ratio of widths (x).
    """

    size = folder_spacing(path.parent.name)
    if not (size or 0) > 0:
        raise DataError(path, "no OME-NGFF 'multiscales' metadata: cannot tell the voxel size (nor from a "
                              "VoxelSpacing{size} parent folder)")
    try:
        node = _zarr().open(str(path), mode="r")
    except Exception as exc:
        raise DataError(path, f"cannot open zarr store: {exc}") from exc
    if hasattr(node, "shape"):
        widths = {"": node.shape[-1]} if len(node.shape) == 3 else {}
    else:
        widths = {str(k): a.shape[-1] for k, a in node.arrays() if len(a.shape) == 3}
    if not widths:
        raise DataError(path, "no OME-NGFF 'multiscales' metadata and no 3D array [z, y, x] in the store")
    widest = max(widths.values())
    warn_once(("no-multiscales", str(path)), f"{path}: no OME-NGFF 'multiscales' metadata; voxel size {size:g} A "
                                             f"taken from the folder name {path.parent.name}", stacklevel=4)
    out = [(k, size * widest / w) for k, w in widths.items()]
    return sorted(out, key=lambda t: (t[1], t[0]))


def open_tomogram(path: str | Path, level: int | str = 0) -> Tomogram:
    """Open one level of a tomogram lazily.

    Parameters
    ----------
    path : path-like
        The ``.zarr`` group (e.g. ``.../VoxelSpacing10.000/denoised.zarr``).
    level : int or str
        Multiscale dataset path; ``0`` is full resolution (an int that names no dataset path picks
        the level-th finest one, e.g. for datasets named ``"s0"``).

    Raises
    ------
    DataError
        Missing group, missing level, or unreadable metadata.
    """
    path = Path(path)
    ordered = read_multiscales(path)
    levels = dict(ordered)
    key = str(level)
    if key not in levels and isinstance(level, int) and 0 <= level < len(ordered):
        key = ordered[level][0]  # datasets named otherwise ("s0", or the bare array ""): k-th finest
    if key not in levels:
        raise DataError(path, f"no multiscale level {key!r} (levels: {', '.join(levels)})")
    zarr = _zarr()
    try:
        arr = zarr.open_array(str(path), mode="r") if key == "" else zarr.open_group(str(path), mode="r")[key]
    except Exception as exc:
        raise DataError(path / key, f"cannot open zarr array: {exc}") from exc
    if len(arr.shape) != 3:
        raise DataError(path / key, f"expected a 3D array [z, y, x], got shape {tuple(arr.shape)}")
    if min(arr.shape) < 1:
        raise DataError(path / key, f"empty array of shape {tuple(arr.shape)}: no voxels to read")
    check_voxel_dtype(arr.dtype, path / key)
    finest = min(levels.values())
    return Tomogram(path, key, levels[key], arr, origin=(levels[key] - finest) / 2,
                    files=ChunkFiles.of(path / key if key else path, tuple(arr.shape)))


def describe_tomogram(path: str | Path) -> list[dict]:
    """Per level: ``{"level", "shape", "voxel_size", "dtype"}`` (reads metadata only)."""
    out = []
    for key, vs in read_multiscales(path):
        t = open_tomogram(path, key)
        out.append({"level": key, "shape": t.shape, "voxel_size": vs, "dtype": str(t.array.dtype)})
    return out


def _along(a: np.ndarray, axis: int, sl: slice) -> np.ndarray:
    index = [slice(None)] * a.ndim
    index[axis] = sl
    return a[tuple(index)]


def bin2(volume: np.ndarray) -> np.ndarray:
    """Mean-bin a ``[z, y, x]`` volume by 2 on each axis; odd edges average the voxels that exist.

    Computed one axis at a time in float32 (the mean is separable), so the peak extra memory is
    about half the input: ``(184, 630, 630) -> (92, 315, 315)``.
    """
    out = np.asarray(volume, dtype=np.float32)
    if out.ndim != 3:
        raise ValueError(f"expected a 3D volume [z, y, x], got shape {out.shape}")
    for axis in range(3):
        n = out.shape[axis]
        even = n - n % 2

        binned = _along(out, axis, slice(0, even, 2)) + _along(out, axis, slice(1, even, 2))
        binned *= 0.5
        if n % 2:  # the last voxel has no partner: its mean is itself
            binned = np.concatenate([binned, _along(out, axis, slice(n - 1, n))], axis=axis)
        out = binned
    return out


def multiscale_metadata(voxel_size: float, n_levels: int, name: str = "") -> dict:
    """OME-NGFF 0.4 ``multiscales`` attributes for ``n_levels`` mean-binned levels."""
    return {
        "multiscales": [
            {
                "version": "0.4",
                "name": name,
                "axes": [{"name": a, "type": "space", "unit": "angstrom"} for a in ("z", "y", "x")],
                "datasets": [
                    {
                        "path": str(k),
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [voxel_size * 2**k] * 3},
                            {"type": "translation", "translation": [(2**k - 1) / 2 * voxel_size] * 3},
                        ],
                    }
                    for k in range(n_levels)
                ],
                "metadata": {"description": "mean binning by 2 per level", "method": "czii_kit.tomogram.bin2"},
            }
        ]
    }


def _create_level(group, key: str, data: np.ndarray, chunks) -> None:
    chunks = tuple(min(c, s) for c, s in zip(chunks, data.shape, strict=True))
    if _zarr_major() >= 3:
        arr = group.create_array(
            name=key,
            shape=data.shape,
            chunks=chunks,
            dtype=data.dtype,
            compressors=_blosc(),
            chunk_key_encoding={"name": "v2", "separator": "/"},
            fill_value=0.0,
        )
    else:
        arr = group.create_dataset(
            key,
            shape=data.shape,
            chunks=chunks,
            dtype=data.dtype,
            compressor=_blosc(),
            dimension_separator="/",
            fill_value=0.0,
        )
    arr[...] = data


def write_tomogram(
    path: str | Path,
    volume: np.ndarray,
    voxel_size: float,
    n_levels: int = 3,
    chunks: tuple[int, int, int] = DEFAULT_CHUNKS,
    overwrite: bool = False,
) -> Path:
    """Write a ``[z, y, x]`` volume as a multiscale zarr group (format 2, OME-NGFF 0.4).

    The group is written to a temporary sibling and renamed into place, so a crash never leaves a
    half-written tomogram at ``path``.

    Parameters
    ----------
    path : path-like
        Destination ``.zarr`` folder.
    volume : ndarray ``(nz, ny, nx)``
        Stored as float32.
    voxel_size : float
        Å per voxel at level 0.
    n_levels : int
        Number of levels (0 = full resolution, each next one mean-binned by 2).
    overwrite : bool
        Replace an existing ``path``; otherwise :class:`FileExistsNoForce`.
    """
    path = Path(path)
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3D [z, y, x], got shape {vol.shape}")
    if not np.isfinite(vol).all():
        raise ValueError("volume contains NaN or infinite values")
    if path.exists() and not overwrite:
        raise FileExistsNoForce(f"{path}: already exists (pass overwrite=True to replace it)")
    zarr = _zarr()
    with atomic_dir(path) as tmp:
        if _zarr_major() >= 3:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        else:
            group = zarr.open_group(zarr.storage.DirectoryStore(str(tmp), dimension_separator="/"), mode="w")
        level = vol
        for k in range(n_levels):
            if k:
                level = bin2(level)
            _create_level(group, str(k), level, chunks)
        group.attrs.update(multiscale_metadata(voxel_size, n_levels, name=path.stem))
    return path
