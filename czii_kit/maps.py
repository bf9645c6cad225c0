"""Density maps: read MRC files or the maps shipped with czii_kit, normalise and crop them.

A map is a ``[z, y, x]`` float32 array with a voxel size in Å (isotropic). :func:`read_map` is the
one strict MRC reader of the package; :func:`load_map_model` turns a map into a
:class:`ParticleModel` (solid protein ~1, cropped, centre of mass and bounding radius), which the
simulator places in its phantoms and :mod:`czii_kit.templates` matches against tomograms.

The seven polnet maps (the six particles and a distractor; Apache-2.0, see
``czii_kit/assets/NOTICE-polnet.txt``) ship inside the package as ``czii_kit/assets/density_maps.npz``
(float16, written by ``czii-kit maps pack``). Wherever maps are asked for, :data:`SHIPPED` (the
default) means those, :data:`PROCEDURAL` the simulator's built-in models, and a folder its MRC files
(names from :mod:`czii_kit.catalog`); :func:`load_models` reads either kind.
"""

from __future__ import annotations

import datetime as _dt
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from czii_kit import __version__
from czii_kit.atomic import atomic_write
from czii_kit.catalog import DISTRACTOR_MAP_FILE, PARTICLE_NAMES, get_particle
from czii_kit.checksum import file_sha256
from czii_kit.errors import DataError

SHIPPED = "shipped"
"""Maps option: the density maps shipped in ``czii_kit/assets`` (the default)."""
PROCEDURAL = "procedural"
"""Maps option: the simulator's built-in procedural particle models."""
DISTRACTOR = "distractor"
"""Model name of the unrelated small protein the simulator uses as a distractor."""
PACKED_FORMAT = "czii_kit density maps 1"
PACKED_DTYPE = np.float16
"""Storage type of packed maps: lossy, but moves the simulator's output far less than its noise
(``tests/test_maps.py`` measures it)."""


@dataclass
class ParticleModel:
    """A density model on its own grid.

    Attributes
    ----------
    name : str
        Particle type (catalog name) or ``"distractor"`` (the simulator's unrelated protein).
    density : ndarray ``(n, n, n)`` float32
        Protein volume fraction (1 = solid protein), cropped to its support.
    voxel_size : float
        Å per voxel of ``density``.
    center : ndarray (3,)
        Centre of mass in ``density`` index coordinates ``(z, y, x)``: this point lands on the pick.
    radius : float
        Bounding radius around ``center`` in Å.
    source : str
        File it came from, or ``"procedural"``.
    """

    name: str
    density: np.ndarray
    voxel_size: float
    center: np.ndarray
    radius: float
    source: str = "procedural"

    @property
    def mass_fraction_volume(self) -> float:
        """Total protein volume in Å³ (sum of the volume fraction)."""
        return float(self.density.sum() * self.voxel_size**3)


def finish_model(name: str, dens: np.ndarray, voxel_size: float, source: str, rel_threshold: float = 0.02):
    dens = np.asarray(dens, np.float32)
    mask = dens > rel_threshold * float(dens.max())
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - 2, 0)
    hi = np.minimum(idx.max(0) + 3, dens.shape)
    dens = np.ascontiguousarray(dens[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
    dens = np.where(dens > 0, dens, 0).astype(np.float32)
    grid = np.indices(dens.shape).reshape(3, -1).astype(np.float64)
    w = dens.reshape(-1).astype(np.float64)
    center = (grid * w).sum(1) / w.sum()
    sup = dens.reshape(-1) > rel_threshold * float(dens.max())
    radius = float(np.sqrt(((grid[:, sup] - center[:, None]) ** 2).sum(0).max()) + 1.0) * voxel_size
    return ParticleModel(name, dens, float(voxel_size), center, radius, source)


def read_map(path: str | Path) -> tuple[np.ndarray, float]:
    """Read an MRC density map: ``(array [z, y, x] float32, voxel size Å)``.

    Raises
    ------
    DataError
        Missing file, unreadable MRC, not 3D, not finite, constant, or without positive density.
    """
    import mrcfile

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "density map not found")
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if len(head) < 1024 or head[208:211] != b"MAP":
        raise DataError(path, "not an MRC density map (no 'MAP' signature in a 1024-byte header)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # permissive mode warns about what it then reports as None
            with mrcfile.open(path, permissive=True) as m:
                if m.data is None:
                    raise DataError(path, "not a readable MRC file (no data block)")
                data = np.asarray(m.data, dtype=np.float32).copy()
                vs = m.voxel_size
                vsz = [float(vs.x), float(vs.y), float(vs.z)]
    except DataError:
        raise
    except Exception as exc:  # mrcfile raises ValueError / OSError on corrupt headers
        raise DataError(path, f"not a readable MRC density map ({exc})") from exc
    if data.ndim != 3 or min(data.shape) < 4:
        raise DataError(path, f"expected a 3D density map, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise DataError(path, "density map contains NaN or infinite values")
    if float(data.max()) <= 0 or float(data.max()) == float(data.min()):
        raise DataError(path, "density map has no positive density (constant or all <= 0)")
    if not (max(vsz) > 0):
        raise DataError(path, "the MRC header gives no voxel size (0 Å); cannot rescale the map")
    if max(vsz) - min(vsz) > 1e-3 * max(vsz):
        raise DataError(path, f"anisotropic voxel size {vsz} is not supported")
    return data, vsz[0]


def load_map_model(name: str, path: str | Path) -> ParticleModel:
    """A :class:`ParticleModel` from an MRC map; density is normalised so solid protein is ~1.

    The scale is the 99th percentile of the voxels above 10 % of the maximum (solid-protein voxels of a
    density map proportional to mass), so maps of different proteins keep their relative masses.
    """
    data, vs = read_map(path)
    return map_model(name, data, vs, str(path))


def map_model(name: str, data: np.ndarray, voxel_size: float, source: str) -> ParticleModel:
    """A :class:`ParticleModel` from a map array ``[z, y, x]`` (see :func:`load_map_model`); ``source`` names it."""
    data = np.asarray(data, np.float32)
    if data.mean() > 0.5 * data.max():
        raise DataError(source, "map looks inverted or has a large positive background (mean > half of max)")
    core = data[data > 0.1 * data.max()]
    scale = float(np.quantile(core, 0.99))
    return finish_model(name, data / scale, voxel_size, source)


def map_file(name: str) -> str:
    """File name of the density map of a particle type or of :data:`DISTRACTOR` (``"8cpv.mrc"``, ...)."""
    return DISTRACTOR_MAP_FILE if name == DISTRACTOR else get_particle(name).map_file


ALL_MAP_NAMES = (*PARTICLE_NAMES, DISTRACTOR)
"""The seven maps a maps folder (and the shipped file) holds."""


def shipped_maps_path() -> Path:
    """Path of the packed density maps shipped in the package (``czii_kit/assets/density_maps.npz``)."""
    return Path(str(resources.files("czii_kit") / "assets" / "density_maps.npz"))


def maps_option(value) -> str | Path:
    """Parse a maps option: :data:`SHIPPED`, :data:`PROCEDURAL` (also ``None`` or ``"none"``) or a folder.

    Raises
    ------
    DataError
        A folder that does not exist.
    """
    if value is None or str(value).lower() in (PROCEDURAL, "none"):
        return PROCEDURAL
    if str(value).lower() == SHIPPED:
        return SHIPPED
    path = Path(value)
    if not path.is_dir():
        raise DataError(path, f"density map folder not found (give a folder of MRC maps, {SHIPPED!r} or {PROCEDURAL!r})")
    return path


def describe_maps(maps) -> str:
    """One line saying which maps ``maps`` (anything :func:`maps_option` takes) means, for records and logs."""
    kind = maps_option(maps)
    if kind == SHIPPED:
        return "shipped density maps (czii_kit/assets/density_maps.npz)"
    if kind == PROCEDURAL:
        return PROCEDURAL
    return str(Path(kind).resolve())


def pack_maps(maps_dir: str | Path, out: str | Path, command: str = "", overwrite: bool = False) -> Path:
    """Pack the seven density maps of ``maps_dir`` into one compressed ``.npz`` (float16, atomic write).

    Parameters
    ----------
    maps_dir : path-like
        Folder holding ``8cpv.mrc``, ``1fa2.mrc``, ... and ``8vaf.mrc`` (names from :func:`map_file`).
    out : path-like
        The ``.npz`` to write; an existing file is refused (:class:`~czii_kit.errors.FileExistsNoForce`)
        unless ``overwrite``.
    command : str
        The command line that made it, kept in the file's metadata with each source's SHA-256.

    Raises
    ------
    DataError
        The folder or a map is missing or unreadable.
    """
    maps_dir = Path(maps_dir)
    if not maps_dir.is_dir():
        raise DataError(maps_dir, "density map folder not found")
    arrays, record = {}, {}
    for name in ALL_MAP_NAMES:
        f = maps_dir / map_file(name)
        if not f.is_file():
            raise DataError(f, f"density map of {name} not found (expected {f.name} in {maps_dir})")
        data, vs = read_map(f)
        arrays[f"map/{f.name}"] = data.astype(PACKED_DTYPE)
        arrays[f"voxel_size/{f.name}"] = np.float64(vs)
        record[f.name] = {"name": name, "sha256": file_sha256(f), "shape": list(data.shape), "voxel_size": vs}
    meta = {"format": PACKED_FORMAT, "dtype": np.dtype(PACKED_DTYPE).name, "maps": record,
            "command": command, "czii_kit_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    return atomic_write(out, write, overwrite)


def read_packed_maps(path: str | Path | None = None) -> tuple[dict[str, tuple[np.ndarray, float]], dict]:
    """``({file name: (map [z, y, x] float32, voxel size Å)}, meta)`` from a :func:`pack_maps` file.

    ``path`` defaults to the shipped maps (:func:`shipped_maps_path`).

    Raises
    ------
    DataError
        Missing file, not a packed-maps file, or a map without its voxel size.
    """
    path = shipped_maps_path() if path is None else Path(path)
    if not path.is_file():
        raise DataError(path, "packed density maps not found (a broken install? reinstall czii_kit)")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format") != PACKED_FORMAT:
                raise DataError(path, f"not a czii_kit packed-maps file (format {meta.get('format')!r})")
            out = {f: (z[f"map/{f}"].astype(np.float32), float(z[f"voxel_size/{f}"])) for f in meta["maps"]}
    except DataError:
        raise
    except Exception as exc:  # zipfile / KeyError / JSON errors of a damaged file
        raise DataError(path, f"not a readable packed-maps file ({type(exc).__name__}: {exc})") from exc
    return out, meta


def load_models(maps, names: Sequence[str] = ALL_MAP_NAMES) -> dict[str, ParticleModel]:
    """:class:`ParticleModel` s of ``names`` from :data:`SHIPPED` maps or a folder of MRC maps.

    Raises
    ------
    DataError
        The folder or one of the maps is missing or unreadable (the file is named); ``maps`` is
        :data:`PROCEDURAL` (the procedural models live in :mod:`czii_kit.synthetic.phantom`).
    """
    kind = maps_option(maps)
    if kind == PROCEDURAL:
        raise DataError(None, "procedural models are not density maps; give the shipped maps or a folder")
    if kind == SHIPPED:
        packed, _ = read_packed_maps()
        source = shipped_maps_path()
        return {n: map_model(n, *packed[map_file(n)], f"{source}:{map_file(n)}") for n in names}
    out = {}
    for name in names:
        f = Path(kind) / map_file(name)
        if not f.is_file():
            raise DataError(f, f"density map of {name} not found (expected {f.name} in {kind})")
        out[name] = load_map_model(name, f)
    return out


def map_sources(maps, names: Sequence[str]) -> dict[str, dict]:
    """``{name: {"map": file name, "sha256": of the source MRC}}``: the record of where models came from.

    For the shipped maps the SHA-256 is the one :func:`pack_maps` recorded of the MRC it packed, so
    a file built from the shipped maps and one built from the same MRC folder carry the same record.
    """
    kind = maps_option(maps)
    if kind == SHIPPED:
        record = read_packed_maps()[1]["maps"]
        return {n: {"map": map_file(n), "sha256": record[map_file(n)]["sha256"]} for n in names}
    return {n: {"map": map_file(n), "sha256": file_sha256(Path(kind) / map_file(n))} for n in names}
