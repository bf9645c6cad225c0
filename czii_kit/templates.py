"""Template matching at candidate positions: how well each particle's density map fits there.

Beta-galactosidase (a compact D2 tetramer, 465 kDa) and thyroglobulin (an elongated C2 dimer,
660 kDa) look alike at the detector's and the rescorer's resolution: rotationally averaged, they
have the same width. Their 3D shapes differ, and the classical cryo-ET answer to "which protein is
this" is template matching: the normalised cross-correlation (NCC) of the tomogram with each
protein's density map, maximised over orientations. Here it is evaluated only at the candidates a
detector proposed (not over the whole volume), so a CPU does it in seconds per tomogram:

- the tomogram is binned ``bin`` x (block mean; 20 Å voxels by default) and made "dense positive";
- each template is rotated to ``n_rotations`` orientations (uniform on SO(3), seeded), resampled to
  the binned voxel size, cut to a sphere of ``mask_radius`` Å, and normalised (zero mean, unit
  norm inside the sphere), giving a matrix ``(n_rotations, n_mask_voxels)``;
- each candidate's binned neighbourhood (its voxel and the ``shift`` voxels either side along each
  axis) is cut with the same sphere and normalised, so one matrix product gives every NCC; the
  maximum over orientations and shifts is the candidate's match to that type.

:mod:`czii_kit.rescore` turns the matches into a margin (own type minus the best other template
type); a negative margin (another template fits better) lowers the rescored score
(:class:`~czii_kit.rescore.RescoreConfig`'s ``template_weight``, tuned on validation runs by
:func:`czii_kit.tune.tune`).

The template file (``czii_kit_templates.npz`` beside the detector weights) holds each type's
density, block-averaged from its map to ``bin`` x the map's voxel size, with its centre of mass
(the simulator's and the reference picks' particle centre) and a record of the source maps; build it
with :func:`build_templates` / ``czii-kit templates build``.

Arrays are indexed ``[z, y, x]``; points are ``x, y, z`` in Å and converted with :mod:`czii_kit.coords`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from czii_kit import __version__
from czii_kit.atomic import atomic_write
from czii_kit.catalog import PARTICLE_NAMES, get_particle
from czii_kit.config import StrictConfig
from czii_kit.coords import angstrom_to_voxel
from czii_kit.errors import DataError
from czii_kit.maps import SHIPPED, load_models
from czii_kit.offline import czii_home
from czii_kit.preprocess import block_mean
from czii_kit.rotations import random_rotations
from czii_kit.wedge import Wedge, apply_wedge, estimate_wedge

TEMPLATES_FILE = "czii_kit_templates.npz"
DEFAULT_TYPES = ("beta-galactosidase", "thyroglobulin")


@dataclass
class TemplateConfig(StrictConfig):
    """How candidates are matched.

    Attributes
    ----------
    n_rotations : int
        Orientations per template (uniform random on SO(3) from ``seed``).
    bin : int
        Binning of the tomogram (and voxel-size ratio of the templates to the tomogram).
    mask_radius : float or None
        Radius (Å) of the spherical mask both the template and the tomogram patch are cut to, the
        same for every template; ``None``: each template's own radius (:attr:`Template.radius`)
        plus ``mask_pad``.
    mask_pad : float
        Å added to a template's own radius when ``mask_radius`` is None.
    shift : int
        Binned voxels searched either side of the candidate along each axis (the centre and its 6
        face neighbours when 1).
    seed : int
        Seed of the orientations.
    order : int
        Spline order of the rotation's interpolation (3: cubic, sharper than linear on the binned grid).
    batch : int
        Most candidates per matrix product (the product has ``1 + 6 * shift`` rows per candidate, one per
        shift, and working memory of about ``batch * (1 + 6 * shift) * (mask voxels + n_rotations) * 4``
        bytes: 50 MB for the defaults).
    wedge : None, "auto" or (lo, hi)
        The missing wedge given to the rotated templates (:mod:`czii_kit.wedge`): None, none (the
        templates keep every direction); ``"auto"``, each tomogram's own, estimated from its power
        spectrum (:func:`czii_kit.wedge.estimate_wedge`, tilt axis ``y`` or ``x``; none where it shows
        none); or the edges ``(lo, hi)`` of a :class:`czii_kit.wedge.Wedge` about ``y``, in degrees.
    """

    n_rotations: int = 1500
    bin: int = 2
    mask_radius: float | None = 180.0
    mask_pad: float = 20.0
    shift: int = 1
    seed: int = 0
    order: int = 3
    batch: int = 400
    wedge: str | tuple[float, float] | None = None

    def __post_init__(self):
        if self.n_rotations < 1 or self.bin < 1 or self.shift < 0 or self.batch < 1 or not 0 <= self.order <= 5:
            raise ValueError(f"invalid TemplateConfig {self}")
        if self.mask_radius is not None and self.mask_radius <= 0:
            raise ValueError(f"mask_radius must be > 0 Å, got {self.mask_radius}")
        if self.wedge is not None and self.wedge != "auto":

            try:
                lo, hi = (float(a) for a in self.wedge)
                Wedge(lo, hi)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"wedge must be None, 'auto' or two angles in (0, 90), got {self.wedge!r}") from exc
            self.wedge = (lo, hi)



@dataclass
class Template:
    """One particle's density ``[z, y, x]`` (dense positive) at ``voxel_size`` Å, centre of mass ``center`` (voxels)."""

    name: str
    density: np.ndarray
    voxel_size: float
    center: np.ndarray = field(repr=False)

    @property
    def radius(self) -> float:
        """Å from ``center`` to the farthest voxel above 5 % of the maximum density."""
        idx = np.argwhere(self.density > 0.05 * float(self.density.max()))
        return float(np.sqrt(((idx - self.center) ** 2).sum(1).max()) * self.voxel_size)


def build_templates(maps_dir: str | Path = SHIPPED, types: Sequence[str] = DEFAULT_TYPES,
                    bin: int = 2) -> dict[str, Template]:
    """Templates of ``types`` from the shipped density maps (default) or a folder's (file names from
    :mod:`czii_kit.catalog`), block-averaged ``bin`` x. Raises :class:`~czii_kit.errors.DataError` for a
    missing or bad map."""
    names = [get_particle(name).name for name in types]
    out = {}
    for name, m in load_models(maps_dir, names).items():
        d = np.asarray(m.density, np.float32)
        pad = [(0, -n % bin) for n in d.shape]
        dens = block_mean(np.pad(d, pad), bin)
        center = (np.asarray(m.center, float) - (bin - 1) / 2) / bin
        out[name] = Template(name, dens, m.voxel_size * bin, center)
    return out


def save_templates(templates: Mapping[str, Template], path: str | Path, meta: Mapping | None = None,
                   overwrite: bool = False) -> Path:
    """Write ``templates`` to an ``.npz`` (atomically; :class:`~czii_kit.errors.FileExistsNoForce` if
    ``path`` exists and not ``overwrite``)."""

    arrays = {}
    for name, t in templates.items():
        arrays[f"density/{name}"] = t.density.astype(np.float32)
        arrays[f"center/{name}"] = np.asarray(t.center, np.float64)
        arrays[f"voxel_size/{name}"] = np.float64(t.voxel_size)
    record = {"types": list(templates), "czii_kit_version": __version__,
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(meta or {})}
    arrays["meta"] = np.frombuffer(json.dumps(record).encode(), np.uint8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    return atomic_write(path, write, overwrite)


def load_templates(path: str | Path) -> tuple[dict[str, Template], dict]:
    """``(templates by type, meta dict)`` from a file of :func:`save_templates`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "template file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            out = {}
            for name in meta["types"]:
                out[name] = Template(name, z[f"density/{name}"].astype(np.float32),
                                     float(z[f"voxel_size/{name}"]), z[f"center/{name}"].astype(float))
    except DataError:
        raise
    except Exception as exc:  # zipfile / KeyError / JSON errors of a damaged file
        raise DataError(path, f"not a czii_kit template file ({exc})") from exc
    unknown = [n for n in out if n not in PARTICLE_NAMES]
    if unknown:
        raise DataError(path, f"unknown particle types {unknown}")
    return out, meta


def templates_for(weights: str | Path) -> Path | None:
    """The template file beside ``weights``, or None."""
    p = Path(weights).parent / TEMPLATES_FILE
    return p if p.is_file() else None


def sphere_mask(radius_vox: float) -> np.ndarray:
    """Boolean cube of odd side ``2 * ceil(radius) + 1``, True within ``radius_vox`` of its centre."""
    h = int(np.ceil(radius_vox))
    g = np.indices((2 * h + 1,) * 3) - h
    return (g ** 2).sum(0) <= radius_vox ** 2


def _normalise_rows(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of ``a (n, m)`` less their mean, divided by their norm (at least 1e-8), float32; into ``out``
    (an ``(n, m)`` float32 array or view) when given. The float32 sums follow ``a``'s memory order."""
    a = a - a.mean(1, keepdims=True)
    norm = np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-8)
    if out is None:
        return (a / norm).astype(np.float32)
    return np.divide(a, norm, out=out, casting="same_kind")


def rotated_boxes(template: Template, voxel_size: float, side: int, n_rotations: int, seed: int = 0,
                  order: int = 3) -> np.ndarray:
    """``(n_rotations, side, side, side)`` float32 ``[z, y, x]``: ``template`` rotated (uniform on SO(3)) and
    resampled to ``voxel_size`` Å on a cube of ``side`` voxels, its centre of mass at the cube's centre."""
    from scipy import ndimage

    c_out = np.full(3, (side - 1) / 2)
    zoom = voxel_size / template.voxel_size
    dens = ndimage.spline_filter(template.density, order, output=np.float64) if order > 1 else template.density
    boxes = np.empty((n_rotations, side, side, side), np.float32)
    for i, rot in enumerate(random_rotations(np.random.default_rng(seed), n_rotations)):
        mat = rot.T * zoom
        ndimage.affine_transform(dens, mat, offset=template.center - mat @ c_out, output_shape=(side,) * 3,
                                 order=order, mode="constant", cval=0.0, prefilter=False, output=boxes[i])
    return boxes


TEMPLATE_CACHE_ENV = "CZII_KIT_TEMPLATE_CACHE"
"""Environment variable naming the rotated-template cache folder (default ``$CZII_KIT_HOME/templates``)."""


def template_cache() -> Path:
    """The folder rotated templates are cached in: ``$CZII_KIT_TEMPLATE_CACHE``, else ``templates`` in
    czii_kit's cache folder (:func:`czii_kit.offline.czii_home`)."""
    env = os.environ.get(TEMPLATE_CACHE_ENV)
    return Path(env).expanduser() if env else czii_home() / "templates"


def rotation_key(template: Template, voxel_size: float, side: int, n_rotations: int, seed: int, order: int) -> str:
    """SHA-256 (hex) naming the rotated boxes of ``template`` (its density, centre and voxel size) for these
    arguments of :func:`rotated_boxes`: the cache key of :func:`cached_rotated_boxes`."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(template.density, np.float32).tobytes())
    h.update(np.asarray(template.center, np.float64).tobytes())
    h.update(json.dumps([template.name, float(template.voxel_size), round(float(voxel_size), 6), int(side),
                         int(n_rotations), int(seed), int(order), "rotated_boxes/1"]).encode())
    return h.hexdigest()


def _cached_array(path: Path, shape: tuple[int, ...], compute) -> np.ndarray:
    """The float32 array of ``shape`` stored at ``path`` (``.npy``), else ``compute()`` written there atomically
    (a damaged or mismatched file is computed again; a read-only cache is left alone)."""
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == shape and arr.dtype == np.float32:
                return arr
        except (OSError, ValueError):  # a damaged cache file: rebuild it
            pass
    arr = compute()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)

    try:
        atomic_write(path, write, overwrite=True)
    except OSError:  # a read-only cache: work without it
        pass
    return arr


def cached_rotated_boxes(template: Template, voxel_size: float, side: int, n_rotations: int, seed: int = 0,
                         order: int = 3, cache: str | Path | None = None) -> np.ndarray:
    """:func:`rotated_boxes`, read from the cache folder (``cache``, default :func:`template_cache`) when this
    template and these arguments were rotated before (:func:`rotation_key`), else computed and written there
    atomically (``.npy``, float32); an unreadable cache file is computed again. ``cache=False``: no cache."""
    if cache is False:
        return rotated_boxes(template, voxel_size, side, n_rotations, seed, order)
    key = rotation_key(template, voxel_size, side, n_rotations, seed, order)
    return _cached_array(Path(cache or template_cache()) / f"{key[:32]}.npy", (n_rotations, side, side, side),
                         lambda: rotated_boxes(template, voxel_size, side, n_rotations, seed, order))


def cached_template_rows(template: Template, voxel_size: float, mask: np.ndarray, n_rotations: int, seed: int = 0,
                         order: int = 3, wedge=None, cache: str | Path | None = None) -> np.ndarray:
    """:func:`template_rows` of :func:`cached_rotated_boxes` (side of ``mask``) for the missing ``wedge``, cached
    too (keyed by the rotation, the mask and the wedge): a process that meets a wedge seen before reads
    ``(n_rotations, mask.sum())`` floats instead of rotating and Fourier-filtering 2 x 1,500 boxes."""
    side = mask.shape[0]
    boxes = lambda: cached_rotated_boxes(template, voxel_size, side, n_rotations, seed, order, cache)  # noqa: E731
    if cache is False:
        return template_rows(boxes(), mask, wedge)
    h = hashlib.sha256(rotation_key(template, voxel_size, side, n_rotations, seed, order).encode())
    h.update(np.packbits(mask).tobytes())
    h.update(repr(None if wedge is None else (wedge.lo, wedge.hi, wedge.axis)).encode())
    return _cached_array(Path(cache or template_cache()) / f"{h.hexdigest()[:32]}.rows.npy",
                         (n_rotations, int(mask.sum())), lambda: template_rows(boxes(), mask, wedge))


def template_rows(boxes: np.ndarray, mask: np.ndarray, wedge=None, chunk: int = 128) -> np.ndarray:
    """``(n, mask.sum())`` float32: rotated ``boxes (n, s, s, s)`` (:func:`rotated_boxes`, ``s`` = the
    side of ``mask``) given the missing ``wedge`` (a :class:`czii_kit.wedge.Wedge`, or None: none),
    masked and normalised (zero mean, unit norm)."""
    if wedge is None:
        rows = np.ascontiguousarray(boxes[:, mask])
    else:

        rows = np.empty((len(boxes), int(mask.sum())), np.float32)
        for i in range(0, len(boxes), chunk):
            rows[i:i + chunk] = apply_wedge(boxes[i:i + chunk], wedge, pad=mask.shape[0] // 2)[:, mask]
    return _normalise_rows(rows)


class TemplateMatcher:
    """Rotated template matrices of a template file, built once per binned voxel size.

    Parameters
    ----------
    templates : path-like or mapping of :class:`Template`
        A file of :func:`save_templates` or the templates themselves.
    config : TemplateConfig, optional
    cache : path-like or False, optional
        Folder of the rotated templates (:func:`cached_rotated_boxes`; default :func:`template_cache`),
        so they are rotated once per template file and configuration, not once per process; ``False``:
        rotate them in memory only.

    Notes
    -----
    The matrices of one (voxel size, wedge) take 2 x 18 MB for the shipped templates (1,500 rotations).
    With the disk cache only the last tomogram's are kept in memory: an estimated wedge differs from
    tomogram to tomogram, and keeping each would grow the process by 36 MB a run; another is read back
    from the disk cache (a fraction of a second). Without it, those of up to 8 wedges are kept.
    """

    def __init__(self, templates, config: TemplateConfig | None = None, cache: str | Path | None = None):
        self.config = config or TemplateConfig()
        self.cache = cache
        if isinstance(templates, Mapping):
            self.templates, self.meta = dict(templates), {}
        else:
            self.templates, self.meta = load_templates(templates)
        self.types = tuple(self.templates)
        self._cache: dict[tuple, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self._boxes: dict[float, dict[str, np.ndarray]] = {}  # rotated densities per voxel size (cache=False)
        self.last_wedge = None  # the wedge of the last tomogram matched
        self.kept_wedges = 8 if cache is False else 1  # matrices kept in memory, per (voxel size, wedge)

    def _matrices(self, binned_voxel: float, wedge=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{type: (mask, rotated templates)}`` at ``binned_voxel`` Å with the missing ``wedge`` (or None).

        With the disk cache they are read from it (:func:`cached_template_rows`; rotated and filtered the
        first time only); without one, the rotated densities are kept in memory per voxel size, so
        another wedge costs only its Fourier filter."""
        vkey = round(float(binned_voxel), 6)
        key = (vkey, wedge)
        if key not in self._cache:
            while self._cache and len(self._cache) >= self.kept_wedges:  # the oldest go before the new are read
                self._cache.pop(next(iter(self._cache)))
            cfg = self.config
            kept = self._boxes.get(vkey, {})
            out = {}
            for n, t in self.templates.items():
                radius = cfg.mask_radius if cfg.mask_radius is not None else t.radius + cfg.mask_pad
                mask = sphere_mask(radius / binned_voxel)
                if self.cache is not False:
                    out[n] = (mask, cached_template_rows(t, binned_voxel, mask, cfg.n_rotations, cfg.seed, cfg.order,
                                                         wedge, self.cache))
                    continue
                if n not in kept:
                    kept[n] = rotated_boxes(t, binned_voxel, mask.shape[0], cfg.n_rotations, cfg.seed, cfg.order)
                out[n] = (mask, template_rows(kept[n], mask, wedge))
            if kept and vkey not in self._boxes:
                if len(self._boxes) >= 2:  # a dataset has one voxel size
                    self._boxes.pop(next(iter(self._boxes)))
                self._boxes[vkey] = kept
            self._cache[key] = out
        return self._cache[key]

    def wedge_of(self, binned: np.ndarray, binned_voxel: float):
        """The :class:`czii_kit.wedge.Wedge` the templates get for the binned tomogram ``binned [z, y, x]``
        (None: none), by :attr:`TemplateConfig.wedge`; estimated ones are rounded to 2° (None for a volume
        too small to read one off)."""

        w = self.config.wedge
        if w is None:
            return None
        if w == "auto":
            est = estimate_wedge(binned, binned_voxel)
            return est.rounded(2.0) if est is not None else None
        return Wedge(*w)

    def match(self, volume: np.ndarray, points_xyz, voxel_size: float) -> np.ndarray:
        """Best NCC ``(N, len(self.types))`` of each template at each point ``(N, 3)`` (x, y, z Å).

        ``volume [z, y, x]`` is the normalised tomogram (:func:`czii_kit.volumes.normalised_volume`,
        particles dark).
        """
        cfg = self.config
        pts = np.asarray(points_xyz, float).reshape(-1, 3)
        if not len(pts):
            return np.full((0, len(self.types)), np.nan, np.float32)
        binned = block_mean(volume, cfg.bin)
        binned = np.negative(binned, out=binned) if cfg.bin > 1 else -binned  # dense positive, like the templates
        self.last_wedge = self.wedge_of(binned, voxel_size * cfg.bin)
        mats = self._matrices(voxel_size * cfg.bin, self.last_wedge)
        side = max(m.shape[0] for m, _ in mats.values())
        h = side // 2
        centre = np.rint((angstrom_to_voxel(pts, voxel_size) - (cfg.bin - 1) / 2) / cfg.bin).astype(np.int64)
        centre, inverse = np.unique(centre, axis=0, return_inverse=True)  # points in one binned voxel: one match
        inverse = inverse.ravel()
        res = np.empty((len(centre), len(self.types)), np.float32)
        shifts = [np.zeros(3, int)]
        for axis in range(3):
            for s in range(1, cfg.shift + 1):
                for sign in (1, -1):
                    v = np.zeros(3, int)
                    v[axis] = sign * s
                    shifts.append(v)
        groups: list[tuple[np.ndarray, list[tuple[int, np.ndarray]]]] = []  # (mask, [(type index, templates)])
        for t, name in enumerate(self.types):  # templates cut by the same mask share the patches' rows
            mask, mat = mats[name]
            same = [g for g in groups if g[0].shape == mask.shape and np.array_equal(g[0], mask)]
            if same:
                same[0][1].append((t, mat))
            else:
                groups.append((mask, [(t, mat)]))
        # edge-padded once, so every neighbourhood is a plain slice (the same voxels as clipping the indices)
        reach = side + 2 * cfg.shift
        lo_all = centre - h - cfg.shift
        pad_lo = np.maximum(0, -lo_all.min(0))
        pad_hi = np.maximum(0, (lo_all + reach).max(0) - np.array(binned.shape))
        padded = np.pad(binned, list(zip(pad_lo, pad_hi, strict=True)), mode="edge")
        del binned
        starts = lo_all + pad_lo
        k = len(shifts)
        n_batches = -(-len(centre) // cfg.batch)
        step = -(-len(centre) // n_batches)  # even batches of at most cfg.batch: no small last one
        for i0 in range(0, len(centre), step):
            cc = starts[i0:i0 + step]
            n_pts = len(cc)
            big = np.stack([padded[a:a + reach, b:b + reach, c:c + reach] for a, b, c in cc])
            best = res[i0:i0 + n_pts]
            for mask, members in groups:
                n = mask.shape[0]
                o = (side - n) // 2
                # every shift's normalised rows stacked (shift-major), so each template takes one matrix
                # product of k * n_pts rows: far fewer, larger products (the same sums for every element)
                rows_t = np.empty((int(mask.sum()), k * n_pts), np.float32)  # stacked rows, transposed
                for j, (dz, dy, dx) in enumerate(np.asarray(shifts) + cfg.shift + o):
                    sub = big[:, dz:dz + n, dy:dy + n, dx:dx + n]
                    _normalise_rows(sub[:, mask], out=rows_t[:, j * n_pts:(j + 1) * n_pts].T)
                for t, mat in members:
                    best[:, t] = (rows_t.T @ mat.T).max(1).reshape(k, n_pts).max(0)
        return res[inverse]

    def margins(self, volume: np.ndarray, points_xyz, voxel_size: float) -> np.ndarray:
        """``(N, n_particle_types)`` over :data:`czii_kit.catalog.PARTICLE_NAMES`: for each template type,
        its NCC minus the best other template type's (0 for types without a template, and for all
        when there is a single template)."""
        ncc = self.match(volume, points_xyz, voxel_size)
        out = np.zeros((len(ncc), len(PARTICLE_NAMES)), np.float32)
        if len(self.types) < 2:
            return out
        for t, name in enumerate(self.types):
            others = np.delete(ncc, t, axis=1).max(1)
            out[:, PARTICLE_NAMES.index(name)] = ncc[:, t] - others
        return out


__all__ = ["TEMPLATES_FILE", "DEFAULT_TYPES", "TemplateConfig", "Template", "TemplateMatcher",
           "build_templates", "save_templates", "load_templates", "templates_for", "sphere_mask",
           "rotated_boxes", "template_rows", "template_cache", "cached_rotated_boxes", "cached_template_rows"]
