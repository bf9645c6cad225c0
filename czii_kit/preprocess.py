"""Per-tomogram intensity normalisation and 2.5D slice stacking (pure numpy/scipy).

A 2.5D image for slice ``z`` has one channel per entry of ``offsets``: channel ``c`` is slice
``z + offsets[c]`` (or the mean of a slab of ``slab`` slices centred there), clamped at the volume
edges. Intensities are mapped through a robust per-tomogram window ``[vmin, vmax]`` (percentiles
computed on a strided subsample, so any scale or offset of the input works) to uint8 ``0..255`` or
float32 ``0..1``. Arrays are ``[z, y, x]``; images come out ``(ny, nx, channels)``.
Noisy tomograms (raw WBP reconstructions) can be low-passed first, as smooth as the denoised
tomograms the models are trained on, and over-smoothed ones sharpened (:func:`settle_smoothing`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from czii_kit.config import StrictConfig
from czii_kit.errors import DataError


@dataclass(frozen=True)
class PreprocessConfig(StrictConfig):
    """How slices become images; recorded in datasets and beside weights so inference matches training.

    Attributes
    ----------
    offsets : tuple of int
        z offsets of the channels (``(-2, 0, 2)``: slices z-2, z, z+2).
    slab : int
        Slices averaged per channel (odd; 1 = single slice).
    lo, hi : float
        Percentiles (0-100) mapped to 0 and 255.
    sample_step : int
        Stride of the subsample used for the percentiles (along each axis).
    denoise_sigma : float
        Gaussian sigma in pixels applied to each channel image (0 = off).
    dtype : str
        ``"uint8"`` (0..255) or ``"float32"`` (0..1).
    invert : bool
        Flip contrast (particles are dark in cryo-ET; ``False`` keeps the data as is).
    """

    offsets: tuple[int, ...] = (-2, 0, 2)
    slab: int = 1
    lo: float = 0.5
    hi: float = 99.5
    sample_step: int = 4
    denoise_sigma: float = 0.0
    dtype: str = "uint8"
    invert: bool = False

    def __post_init__(self):
        if len(self.offsets) < 1:
            raise ValueError("offsets must name at least one slice")
        if self.slab < 1 or self.slab % 2 == 0:
            raise ValueError(f"slab must be a positive odd number, got {self.slab}")
        if not 0 <= self.lo < self.hi <= 100:
            raise ValueError(f"need 0 <= lo < hi <= 100, got lo={self.lo}, hi={self.hi}")
        if self.dtype not in ("uint8", "float32"):
            raise ValueError(f"dtype must be 'uint8' or 'float32', got {self.dtype!r}")
        if self.sample_step < 1:
            raise ValueError("sample_step must be >= 1")
        object.__setattr__(self, "offsets", tuple(int(o) for o in self.offsets))



@dataclass
class Window:
    """Intensity window: values ``<= vmin`` -> 0, ``>= vmax`` -> 1 (or 255)."""

    vmin: float
    vmax: float
    invert: bool = False
    extra: dict = field(default_factory=dict)

    def _affine(self) -> tuple[float, float]:
        """``(s, o)``: the window maps ``x`` to ``x * s + o`` (clipped to 0..1)."""
        s = 1.0 / (self.vmax - self.vmin)
        o = -self.vmin * s
        return (-s, 1.0 - o) if self.invert else (s, o)

    def uint8_into(self, x: np.ndarray, out: np.ndarray, work: np.ndarray) -> np.ndarray:
        """The window's uint8 mapping, ``round(255 * clip(x * s + o, 0, 1))`` (:meth:`apply`'s), written into
        ``work`` (uint8, ``x``'s shape), ``out`` (float32, ``x``'s shape; a view may do) holding the float32
        rounding on the way: no temporary arrays."""
        s, o = self._affine()
        np.multiply(x, np.float32(255.0 * s), out=out)
        out += np.float32(255.0 * o + 0.5)
        np.clip(out, 0.5, 255.5, out=out)
        np.copyto(work, out, casting="unsafe")
        return work

    def apply(self, x: np.ndarray, dtype: str = "uint8", in_place: bool = False) -> np.ndarray:
        """Map ``x`` (any shape) through the window to uint8 0..255 (rounded) or float32 0..1.

        ``in_place=True`` (float32 only) writes the result over ``x`` itself when it is a float32
        array (no second copy of a whole volume); the values are the same.
        """
        if dtype == "uint8":  # round(255 * clip(x * s + o, 0, 1)) in one fused pass
            x = np.asarray(x, dtype=np.float32)
            return self.uint8_into(x, np.empty(x.shape, np.float32), np.empty(x.shape, np.uint8))
        s, o = self._affine()
        if in_place and isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.writeable:
            y = np.multiply(x, np.float32(s), out=x)
        else:
            y = np.asarray(x, dtype=np.float32) * np.float32(s)
        y += np.float32(o)
        np.clip(y, 0.0, 1.0, out=y)
        return y


def robust_window(volume: np.ndarray, lo: float = 0.5, hi: float = 99.5, step: int = 4,
                  invert: bool = False, source=None) -> Window:
    """Percentile window of a ``[z, y, x]`` volume from a strided subsample.

    Parameters
    ----------
    volume : ndarray ``(nz, ny, nx)``
        Any real intensity scale or offset.
    lo, hi : float
        Percentiles (0-100).
    step : int
        Subsample stride along every axis (``4`` reads 1/64 of the voxels).
    source : path-like, optional
        Named in the error when the volume is constant or not finite.

    Raises
    ------
    DataError
        If the subsample holds NaN/inf or has no contrast.
    """
    v = np.asarray(volume)
    if v.ndim != 3:
        raise ValueError(f"volume must be 3D [z, y, x], got shape {v.shape}")
    sub = np.asarray(v[:: max(1, step // 2), ::step, ::step], dtype=np.float32).ravel()
    if sub.size == 0:
        raise DataError(source, "empty volume")
    if not np.isfinite(sub).all():
        raise DataError(source, "volume contains NaN or infinite values")
    vmin, vmax = (float(t) for t in np.percentile(sub, [lo, hi]))
    if not vmax > vmin:
        vmin, vmax = float(sub.min()), float(sub.max())
        if not vmax > vmin:
            raise DataError(source, f"volume has no contrast (all values {vmin:g})")
    return Window(vmin, vmax, invert)


BRIGHT_SKEW = 0.5
"""Contrast skew above which :func:`window_for` (polarity ``"auto"``) treats dense matter as bright."""


def contrast_skew(volume: np.ndarray, step: int = 2, sigma: float = 1.0) -> float:
    """Skewness of the smoothed central half (in z) of a ``[z, y, x]`` volume, sampled every ``step`` voxels.

    Dense matter (protein, membranes, gold) is dark in cryo-ET, so the skew is negative: -0.3 to -35
    on the simulator's denoised tomograms, -0.03 to -12 on its noisier WBP ones. A volume whose dense
    matter is bright (a density map, or data written with the opposite sign) has it positive.
    """
    from scipy.ndimage import gaussian_filter

    v = np.asarray(volume)
    nz = v.shape[0]
    sub = np.asarray(v[nz // 4 : max(nz // 4 + 1, 3 * nz // 4) : step, ::step, ::step], dtype=np.float32)
    x = gaussian_filter(sub, sigma).ravel().astype(np.float64)
    x -= x.mean()
    x2 = x * x
    var = float(np.mean(x2))
    x2 *= x  # the cube by two products (x ** 3 goes through pow, several times slower)
    return float(np.mean(x2) / var**1.5) if var > 0 else 0.0


def window_for(volume: np.ndarray, config: PreprocessConfig = PreprocessConfig(), polarity: str = "auto",
               source=None, skew: float | None = None) -> tuple[Window, float | None]:
    """The intensity window of ``volume`` with its contrast polarity settled; returns ``(window, skew)``.

    ``polarity``: ``"dark"`` keeps the data as is (particles dark, as the models are trained),
    ``"bright"`` inverts it, ``"auto"`` inverts only when :func:`contrast_skew` exceeds
    :data:`BRIGHT_SKEW` (clear evidence of bright dense matter; a warning names ``source``; ``skew``
    is ``None`` for the other polarities). ``config.invert`` is applied on top. ``skew``: the volume's
    :func:`contrast_skew`, when the caller has measured it already (``"auto"`` only).
    """
    if polarity not in ("auto", "dark", "bright"):
        raise ValueError(f"polarity must be 'auto', 'dark' or 'bright', got {polarity!r}")
    if polarity != "auto":
        skew = None
    elif skew is None:
        skew = contrast_skew(volume)
    looks_bright = skew is not None and skew > BRIGHT_SKEW
    if looks_bright:
        import warnings

        warnings.warn(f"{source}: dense matter looks bright (contrast skew {skew:+.2f} > {BRIGHT_SKEW}); "
                      "inverting the contrast (polarity='dark' keeps it as is)", stacklevel=2)
    flip = polarity == "bright" or looks_bright
    window = robust_window(volume, config.lo, config.hi, config.sample_step, config.invert != flip, source=source)
    return window, skew


SMOOTH_TARGET = 0.85
"""Neighbour correlation that :func:`smoothing_sigma` low-passes a noisy tomogram up to.

The simulator's denoised tomograms, which the models are trained on, have 0.86-0.96 (median about
0.92); its raw WBP tomograms 0.09-0.23. Chosen on the WBP tomograms of the 5 validation runs
(weighted F4 0.711 unsmoothed, 0.886 at 0.8, 0.890 at 0.85, 0.884 at 0.9)."""

SMOOTH_SIGMAS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0)
"""Gaussian sigmas (voxels) :func:`smoothing_sigma` tries, smallest first."""


def central_block(volume: np.ndarray, size: tuple[int, int, int] = (64, 256, 256)) -> np.ndarray:
    """The central ``size`` block of a ``[z, y, x]`` volume (whole axes where shorter), as float32."""
    sl = tuple(slice(max(0, (n - m) // 2), max(0, (n - m) // 2) + m) for n, m in zip(volume.shape, size, strict=True))
    return np.asarray(volume[sl], dtype=np.float32)


def neighbour_correlation(volume: np.ndarray) -> float:
    """Correlation of x-neighbouring voxels in the central block of a ``[z, y, x]`` volume.

    A measure of smoothness that ignores scale and offset: near 0 for white noise (raw WBP
    reconstructions: ramp-filtered, about 0.1-0.2), near 1 for low-passed or denoised data. Along x
    (in the tilt plane's x-y slices), so the missing wedge, which elongates along z, does not enter.
    """
    v = central_block(volume).astype(np.float64)
    if v.shape[2] < 2:
        raise ValueError(f"volume of shape {np.shape(volume)} has fewer than 2 voxels along x")
    v -= v.mean()
    var = float(np.mean(v**2))
    if var == 0:
        return 1.0
    return float(np.mean(v[:, :, 1:] * v[:, :, :-1]) / var)


def smoothing_sigma(volume: np.ndarray, target: float = SMOOTH_TARGET, sigmas=SMOOTH_SIGMAS,
                    correlation: float | None = None) -> float:
    """Smallest Gaussian sigma (voxels) that brings :func:`neighbour_correlation` up to ``target``.

    0 when ``volume [z, y, x]`` is already that smooth (denoised tomograms); the largest of ``sigmas``
    when none reaches it. Measured on the central block, filtered once per sigma. ``correlation``:
    the unfiltered block's, when the caller has it already.
    """
    from scipy.ndimage import gaussian_filter

    block = central_block(volume)
    if (neighbour_correlation(block) if correlation is None else correlation) >= target:
        return 0.0
    for s in sigmas:
        if neighbour_correlation(gaussian_filter(block, s)) >= target:
            return float(s)
    return float(sigmas[-1])


SHARPEN_LIMIT = 0.96
"""Neighbour correlation above which ``smooth="auto"`` sharpens a tomogram (:func:`sharpen`): beyond
every denoised tomogram the shipped model was trained or tuned on (0.86-0.954) and every other
simulated set of docs/pipeline.md (at most 0.956). A stronger denoiser than the simulator's defaults
(Gaussian sigma 2-3 voxels instead of 1.1-1.9) gives 0.963-0.980."""

SHARPEN_AMOUNT = 4.0
"""Unsharp-mask amount :func:`sharpen` uses under ``smooth="auto"``: chosen on 5 over-smoothed
validation runs (weighted F4 0.867 unsharpened, 0.901 / 0.907 / 0.916 / 0.913 at 1 / 2 / 4 / 8;
docs/pipeline.md, "Over-smoothed tomograms")."""

SHARPEN_SIGMA = 2.0
"""Gaussian sigma (voxels) of the blurred copy :func:`sharpen` subtracts."""


def sharpen(volume: np.ndarray, amount: float = SHARPEN_AMOUNT, sigma: float = SHARPEN_SIGMA) -> np.ndarray:
    """Unsharp mask of ``volume [z, y, x]``: ``v + amount * (v - G_sigma(v))`` (3D Gaussian), float32.

    Restores some of the fine contrast (apo-ferritin's shell) that a strong denoiser smooths away.
    """
    from scipy.ndimage import gaussian_filter

    if not (amount >= 0 and sigma > 0):
        raise ValueError(f"sharpen needs amount >= 0 and sigma > 0, got {amount!r} and {sigma!r}")
    vol = np.asarray(volume, dtype=np.float32)
    out = gaussian_filter(vol, sigma, output=np.float32)
    out -= vol  # -(v - G v)
    out *= np.float32(-amount)
    out += vol
    return out


def sharpening_amount(volume: np.ndarray, limit: float = SHARPEN_LIMIT) -> float:
    """:data:`SHARPEN_AMOUNT` when ``volume [z, y, x]`` is smoother than ``limit`` (x-neighbour
    correlation of the central block), else 0."""
    return SHARPEN_AMOUNT if neighbour_correlation(central_block(volume)) > limit else 0.0


def auto_smoothing(volume: np.ndarray) -> tuple[float, float]:
    """``(sigma, amount)`` that ``smooth="auto"`` applies to ``volume [z, y, x]``: the low-pass sigma of
    a noisy tomogram (:func:`smoothing_sigma`) or the unsharp-mask amount of an over-smoothed one
    (:func:`sharpening_amount`); at most one is non-zero. Measured on the central block."""
    block = central_block(volume)
    c = neighbour_correlation(block)  # once: both decisions read it
    sigma = smoothing_sigma(block, correlation=c)
    return sigma, (SHARPEN_AMOUNT if sigma == 0 and c > SHARPEN_LIMIT else 0.0)


def parse_smooth(smooth: str | float) -> str | float:
    """``"auto"`` or a sigma >= 0 in voxels (numbers as text accepted; ``"off"`` = 0); ValueError otherwise."""
    if isinstance(smooth, str):
        if smooth in ("auto", "off"):
            return "auto" if smooth == "auto" else 0.0
        try:
            smooth = float(smooth)
        except ValueError:
            raise ValueError(f"smooth must be 'auto', 'off' or a sigma in voxels, got {smooth!r}") from None
    if isinstance(smooth, bool) or not isinstance(smooth, (int, float, np.number)):
        raise ValueError(f"smooth must be 'auto', 'off' or a sigma in voxels, got {smooth!r}")
    if not np.isfinite(smooth) or smooth < 0:
        raise ValueError(f"smooth sigma must be a finite number >= 0, got {smooth!r}")
    return float(smooth)


def settle_smoothing(volume: np.ndarray, smooth: str | float = "auto", source=None,
                     warn: bool = True, in_place: bool = False) -> tuple[np.ndarray, float]:
    """``volume [z, y, x]`` low-passed (or sharpened) as ``smooth`` asks; returns ``(volume, sigma)``.

    ``smooth``: ``"auto"`` brings the smoothness into the range of the denoised tomograms the models
    are trained on: a noisy tomogram is low-passed with :func:`smoothing_sigma`, an over-smoothed one
    (x-neighbour correlation above :data:`SHARPEN_LIMIT`) is sharpened (:func:`sharpen`; sigma
    returned as 0), anything between is returned as is; a warning names ``source`` when it acts. A
    number is the Gaussian sigma in voxels (0 or ``"off"`` = never filter, nor sharpen; see
    :func:`parse_smooth`). A filtered volume is float32. ``in_place=True``: a float32 ``volume`` is
    low-passed where it lies (the same values; no second volume at the peak), so the caller must not
    need the unfiltered one.
    """
    from scipy.ndimage import gaussian_filter

    smooth = parse_smooth(smooth)
    if smooth == "auto":
        sigma, amount = auto_smoothing(volume)
        if amount > 0:
            if warn:
                import warnings

                warnings.warn(f"{source}: over-smoothed tomogram (neighbour correlation "
                              f"{neighbour_correlation(volume):.3f} > {SHARPEN_LIMIT}, smoother than the denoised "
                              f"tomograms the shipped model is trained on); sharpened (unsharp mask, amount "
                              f"{amount:g}, sigma {SHARPEN_SIGMA:g} voxels) before detection; smooth=0 (--smooth "
                              "off) turns it off", stacklevel=2)
            return sharpen(volume, amount), 0.0
        if sigma > 0 and warn:
            import warnings

            warnings.warn(f"{source}: noisy tomogram (neighbour correlation "
                          f"{neighbour_correlation(volume):.2f} < {SMOOTH_TARGET}); Gaussian low-pass of "
                          f"sigma {sigma:g} voxels before detection, as the shipped model expects (it is trained "
                          "on denoised tomograms); smooth=0 (--smooth off) turns it off, e.g. for a model "
                          "trained on such noisy tomograms", stacklevel=2)
    else:
        sigma = smooth
    if sigma == 0:
        return volume, 0.0
    if in_place and isinstance(volume, np.ndarray) and volume.dtype == np.float32 and volume.flags.writeable:
        return gaussian_filter(volume, sigma, output=volume), sigma  # line by line through a buffer: same values
    return gaussian_filter(np.asarray(volume, dtype=np.float32), sigma, output=np.float32), sigma


FLATTEN_SIGMA = 24.0
"""Gaussian sigma (voxels, about 240 Å) of the background :func:`lateral_background` estimates: wider
than the largest particles (ribosome radius 15 voxels), so they stay out of it."""

FLATTEN_MODES = ("auto", "on", "off")

UNEVEN_LIMIT = 0.1
"""Lateral background unevenness (:func:`unevenness`) above which ``flatten="auto"`` flattens a
tomogram. Our simulated tomograms: 0.001-0.054; a lateral ramp of 0.3 x the intensity range across
x (plus half that across y) gives 0.09 and costs the shipped model 0.005 F4, one of 1 x gives 0.18
and costs 0.22 (docs/pipeline.md, "Uneven background")."""


def block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """``volume [z, y, x]`` binned ``factor`` x by block mean, float32 (trailing voxels that fill no block dropped).

    Binned voxel ``i`` covers voxels ``factor*i .. factor*i + factor - 1``, so it sits at
    ``factor*i + (factor - 1) / 2`` of the original grid. Float32, bit for bit numpy's
    ``reshape(z, f, y, f, x, f).mean((1, 3, 5))`` (the same sums in the same order: each row's ``f``
    x-neighbours, then those row sums in ``(z, y)`` order), but as whole-slab additions a few
    z-slices at a time, about 7x faster than numpy's reduction over three short axes.
    """
    if factor == 1:
        return np.asarray(volume, np.float32)
    f = factor
    z, y, x = (s // f * f for s in volume.shape)
    v = np.asarray(volume[:z, :y, :x], np.float32)
    if f >= 8 or x < 2 * f:  # numpy sums 8 or more neighbours in blocks, and reorders a single x: its own reduction
        return v.reshape(z // f, f, y // f, f, x // f, f).mean((1, 3, 5))
    out = np.empty((z // f, y // f, x // f), np.float32)
    step = f * max(1, 8 // f)  # z-slices per slab: its row sums stay in cache
    rows = np.empty((step, y, x // f), np.float32)
    for z0 in range(0, z, step):
        sl = v[z0:z0 + step]
        r = rows[:len(sl)]
        np.add(sl[..., 0::f], sl[..., 1::f], out=r)
        for c in range(2, f):
            r += sl[..., c::f]
        o = out[z0 // f:z0 // f + len(sl) // f]
        np.add(r[0::f, 0::f], np.float32(0.0), out=o)  # numpy's sum starts at +0.0 (so -0.0 blocks give +0.0)
        for k in range(1, f * f):
            o += r[k // f::f, k % f::f]
    return np.true_divide(out, np.intp(f ** 3), out=out, casting="unsafe")  # as numpy's mean: sum / count


def coarse_background(volume: np.ndarray, sigma: float = FLATTEN_SIGMA, binning: int = 4) -> np.ndarray:
    """Slowly varying lateral background of ``volume [z, y, x]``, on a grid ``binning`` times coarser.

    The volume mean-binned by ``binning``, Gaussian low-passed (``sigma`` voxels), minus its mean
    over each z-slice: what varies across y and x on scales far above a particle (uneven ice or
    illumination), not the specimen's profile along z. :func:`lateral_background` brings it to full size.
    """
    from scipy.ndimage import gaussian_filter

    vol = np.asarray(volume)
    b = binning if min(vol.shape) >= binning else 1
    small = block_mean(vol, b)
    small = gaussian_filter(small, sigma / b, mode="nearest", output=np.float32)
    small -= small.mean(axis=(1, 2), keepdims=True)
    return small


def lateral_background(volume: np.ndarray, sigma: float = FLATTEN_SIGMA, binning: int = 4,
                       coarse: np.ndarray | None = None) -> np.ndarray:
    """:func:`coarse_background` (or ``coarse``, its result) linearly upsampled to ``volume``'s shape (float32)."""
    from scipy.ndimage import zoom

    small = coarse_background(volume, sigma, binning) if coarse is None else coarse
    factors = [n / m for n, m in zip(volume.shape, small.shape, strict=True)]
    return zoom(small, factors, order=1, mode="nearest", grid_mode=True, output=np.float32)


def unevenness(volume: np.ndarray, coarse: np.ndarray | None = None, step: int = 4) -> float:
    """Standard deviation of the lateral background (:func:`coarse_background`, or ``coarse``) relative
    to the robust intensity range (0.5-99.5 percentiles) of ``volume``: 0 for an even tomogram,
    independent of scale and offset."""
    coarse = coarse_background(volume) if coarse is None else coarse
    lo, hi = np.percentile(np.asarray(volume[::step, ::step, ::step], dtype=np.float64), [0.5, 99.5])
    return float(coarse.std() / (hi - lo)) if hi > lo else 0.0


def settle_flatten(volume: np.ndarray, flatten: str = "auto", source=None,
                   warn: bool = True) -> tuple[np.ndarray, float]:
    """``volume`` with its lateral background removed when ``flatten`` asks; returns ``(volume, unevenness)``.

    ``flatten``: ``"auto"`` subtracts :func:`lateral_background` only when :func:`unevenness` is
    above :data:`UNEVEN_LIMIT` (a warning names ``source``), ``"on"`` always, ``"off"`` never
    (unevenness then reported as 0).
    """
    if flatten not in FLATTEN_MODES:
        raise ValueError(f"flatten must be one of {FLATTEN_MODES}, got {flatten!r}")
    if flatten == "off":
        return volume, 0.0
    coarse = coarse_background(volume)
    u = unevenness(volume, coarse)
    if flatten == "auto" and u <= UNEVEN_LIMIT:
        return volume, u
    if warn and flatten == "auto":
        import warnings

        warnings.warn(f"{source}: uneven background (lateral unevenness {u:.2f} > {UNEVEN_LIMIT}); its slow "
                      "variation across y and x is subtracted before detection (flatten='off' keeps it)",
                      stacklevel=2)
    out = np.asarray(volume, dtype=np.float32) - lateral_background(volume, coarse=coarse)
    return out, u


TILT_AXES = ("auto", "y", "x")

TILT_AXIS_LIMIT = 4.0
"""Missing-wedge ratio (:func:`wedge_ratio`) above which ``tilt_axis="auto"`` takes the tilt axis to
lie along x. Tilt about y (the models' training data): 0.01-0.05 on every simulated tomogram;
the same tomograms with y and x swapped: 38-42; a filled wedge: about 1."""


def wedge_ratio(volume: np.ndarray, size: tuple[int, int, int] = (64, 256, 256), half_angle: float = 15.0) -> float:
    """Where the missing wedge lies: Fourier power near the kz axis along kx over that along ky.

    On the central ``size`` block of ``volume [z, y, x]``, mean power at 0.04-0.2 cycles/voxel within
    ``half_angle`` degrees of the kz axis in the kx-kz plane (with |ky| > |kz|), over the same with
    x and y exchanged. Tilting about y leaves the first empty (ratio well below 1), tilting about x
    the second (well above 1); a wedge filled in (e.g. by IsoNet) gives about 1, and so does a
    volume too small to tell (fewer than 200 Fourier samples in either region).
    """
    b = central_block(volume, size).astype(np.float64)
    b -= b.mean()
    nx = b.shape[2]
    # half the spectrum of a real block (rfftn): each kx column but the first (and an even size's last)
    # stands for itself and its mirror at -kx, which has the same power and |kx|; broadcast frequency
    # grids rather than full meshgrids (about a fifth of the memory and time of the full spectrum)
    power = np.abs(np.fft.rfftn(b)) ** 2
    kz = np.abs(np.fft.fftfreq(b.shape[0]))[:, None, None]
    ky = np.abs(np.fft.fftfreq(b.shape[1]))[None, :, None]
    kx = np.fft.rfftfreq(nx)[None, None, :]
    weight = np.full(kx.shape, 2.0)
    weight[..., 0] = 1.0
    if nx % 2 == 0:
        weight[..., -1] = 1.0
    k = np.sqrt(kz**2 + ky**2 + kx**2)
    band = (k > 0.04) & (k < 0.2)
    t = np.tan(np.radians(half_angle))

    def mean_count(region):
        w = np.broadcast_to(weight, region.shape)[region]
        return float((power[region] * w).sum() / max(w.sum(), 1.0)), float(w.sum())

    along_x, n_x = mean_count(band & (kx < t * kz) & (ky > kz))
    along_y, n_y = mean_count(band & (ky < t * kz) & (kx > kz))
    if min(n_x, n_y) < 200 or not along_y > 0:
        return 1.0
    return float(along_x / along_y)


def tilt_axis_of(ratio: float) -> str:
    """``"x"`` when a :func:`wedge_ratio` says the tilt axis lies along x (above :data:`TILT_AXIS_LIMIT`), else ``"y"``."""
    return "x" if ratio > TILT_AXIS_LIMIT else "y"


def settle_tilt_axis(volume: np.ndarray, tilt_axis: str = "auto", source=None, warn: bool = True,
                     ratio: float | None = None) -> bool:
    """Whether to turn slices a quarter (x and y exchanged) for a detector trained with the tilt axis along y.

    ``tilt_axis``: ``"y"`` never, ``"x"`` always, ``"auto"`` when :func:`wedge_ratio` is above
    :data:`TILT_AXIS_LIMIT` (a warning names ``source``). ``ratio``: the volume's wedge ratio, when the
    caller has measured it already.
    """
    if tilt_axis not in TILT_AXES:
        raise ValueError(f"tilt_axis must be one of {TILT_AXES}, got {tilt_axis!r}")
    if tilt_axis != "auto":
        return tilt_axis == "x"
    ratio = wedge_ratio(volume) if ratio is None else ratio
    turn = tilt_axis_of(ratio) == "x"
    if turn and warn:
        import warnings

        warnings.warn(f"{source}: the missing wedge shows a tilt axis along x (wedge ratio {ratio:.1f} > "
                      f"{TILT_AXIS_LIMIT:g}); slices are given to the detector with x and y exchanged, as it "
                      "was trained with the tilt axis along y (tilt_axis='y' turns this off)", stacklevel=2)
    return turn


RESAMPLE_TOLERANCE = 0.05
"""Relative voxel-size difference from the model's above which :func:`resample_to` resamples
(smaller ones are within the training's scale jitter; the real data's 10.012444 Å against a nominal
10 Å is 0.1 %)."""


def resampled_shape(shape: Sequence[int], voxel_size: float, target: float,
                    tolerance: float = RESAMPLE_TOLERANCE) -> tuple[int, ...]:
    """The shape :func:`resample_to` gives a volume of ``shape`` (unchanged within ``tolerance``)."""
    if not (voxel_size > 0 and target > 0):
        raise ValueError(f"voxel sizes must be > 0, got {voxel_size!r} and {target!r}")
    if abs(voxel_size / target - 1) <= tolerance:
        return tuple(int(n) for n in shape)
    step = target / voxel_size
    return tuple(int(np.floor((n - 1) / step + 1e-9)) + 1 for n in shape)


def resample_to(volume: np.ndarray, voxel_size: float, target: float, tolerance: float = RESAMPLE_TOLERANCE,
                source=None, warn: bool = True, target_of: str = "the model's",
                purpose: str = "before detection") -> tuple[np.ndarray, float]:
    """``volume [z, y, x]`` at ``voxel_size`` Å resampled to ``target`` Å voxels; returns ``(volume, voxel_size)``.

    Within ``tolerance`` (relative) the volume is returned as is, with its own voxel size. Otherwise
    output voxel ``j`` (each axis) is the linear interpolation of the input at index
    ``j * target / voxel_size``, so voxel 0 stays at 0 Å and voxel centres stay at ``index * voxel
    size`` (:mod:`czii_kit.coords`); a finer input is Gaussian-blurred first against aliasing. The
    output (float32) has ``floor((n - 1) * voxel_size / target) + 1`` voxels per axis. A warning
    names ``source``, whose voxel size ``target`` is (``target_of``) and what for (``purpose``).
    """
    from scipy.ndimage import affine_transform, gaussian_filter

    shape = resampled_shape(volume.shape, voxel_size, target, tolerance)
    if abs(voxel_size / target - 1) <= tolerance:
        return volume, float(voxel_size)
    step = target / voxel_size  # input voxels per output voxel
    if min(shape) < 2:
        raise DataError(source, f"volume {tuple(volume.shape)} at {voxel_size:g} A is too small to resample to {target:g} A")
    if warn:
        import warnings

        warnings.warn(f"{source}: voxel size {voxel_size:g} Å, {target_of} is {target:g} Å: resampled "
                      f"{tuple(volume.shape)} -> {shape} voxels {purpose}", stacklevel=2)
    vol = np.asarray(volume, dtype=np.float32)
    if step > 1:
        vol = gaussian_filter(vol, 0.5 * np.sqrt(step**2 - 1), output=np.float32)
    out = affine_transform(vol, np.full(3, step), output_shape=shape, order=1, mode="nearest", output=np.float32)
    return out, float(target)


def _channel(volume: np.ndarray, z: int, slab: int) -> np.ndarray:
    nz = volume.shape[0]
    if slab == 1:
        return volume[min(max(z, 0), nz - 1)]
    half = slab // 2
    idx = np.clip(np.arange(z - half, z + half + 1), 0, nz - 1)
    return volume[idx].mean(axis=0, dtype=np.float32)


def channel_source(z: int, offset: int, nz: int, config: PreprocessConfig = PreprocessConfig()) -> int:
    """The slice a channel of slice ``z``'s image is made from: ``z + offset``, clamped to ``0..nz-1`` for
    single slices (a slab clamps each of its slices instead: :func:`channel_image`)."""
    return min(max(z + offset, 0), nz - 1) if config.slab == 1 else z + offset


def channel_image(volume: np.ndarray, zc: int, window: Window, config: PreprocessConfig = PreprocessConfig()
                  ) -> np.ndarray:
    """One channel of a 2.5D image: slice ``zc`` (slab-averaged, clamped to ``0..nz-1``), optionally
    Gaussian-smoothed, mapped through ``window``: ``(ny, nx)`` uint8 (or float32 0..1)."""
    img = _channel(volume, zc, config.slab)
    if config.denoise_sigma > 0:
        from scipy.ndimage import gaussian_filter

        img = gaussian_filter(np.asarray(img, dtype=np.float32), config.denoise_sigma)
    return window.apply(img, config.dtype)


INPUT_SCALE = np.float32(1.0 / 255.0)
"""The network reads uint8 images scaled to 0..1: ``image * INPUT_SCALE`` (float32)."""


def channel_input(volume: np.ndarray, zc: int, window: Window, config: PreprocessConfig, out: np.ndarray,
                  work: np.ndarray) -> np.ndarray:
    """One channel of the network's input: :func:`channel_image` rounded to uint8 (:func:`to_uint8`) and scaled
    to 0..1 (:data:`INPUT_SCALE`), written into ``out`` (float32 ``(ny, nx)``; a view may do), the same
    values bit for bit. ``work``: a uint8 ``(ny, nx)`` scratch array. Single slices of a float32 volume made
    uint8 images (no slab, no denoising) take no temporary arrays, so a detector's inputs are made without
    fresh memory for each slice."""
    if config.slab == 1 and config.denoise_sigma <= 0 and config.dtype == "uint8" and volume.dtype == np.float32:
        window.uint8_into(_channel(volume, zc, 1), out, work)
    else:
        np.copyto(work, to_uint8(channel_image(volume, zc, window, config)))
    return np.multiply(work, INPUT_SCALE, out=out)


def stack_slice(volume: np.ndarray, z: int, window: Window, config: PreprocessConfig = PreprocessConfig(),
                cache: dict | None = None) -> np.ndarray:
    """The 2.5D image of slice ``z``: ``(ny, nx, len(offsets))`` uint8 (or float32 0..1).

    Channel ``c`` is slice ``z + offsets[c]`` (:func:`channel_image`). ``cache`` (a dict) keeps channel
    images by source slice so consecutive calls reuse them (see :func:`iter_stacks`).
    """
    nz = volume.shape[0]
    if not 0 <= z < nz:
        raise IndexError(f"slice {z} outside 0..{nz - 1}")
    chans = []
    for off in config.offsets:
        zc = channel_source(z, off, nz, config)
        img = cache.get(zc) if cache is not None else None
        if img is None:
            img = channel_image(volume, zc, window, config)
            if cache is not None:
                cache[zc] = img
        chans.append(img)
    return np.stack(chans, axis=-1)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """2.5D images as the detector reads them, in training and inference alike: uint8 as they are, float32
    0..1 (``PreprocessConfig.dtype`` ``"float32"``) rounded to 0..255."""
    return images if images.dtype == np.uint8 else (images * 255.0 + 0.5).astype(np.uint8)


def slice_indices(nz: int, z_stride: int = 1, z_start: int | None = None) -> np.ndarray:
    """Slices visited with stride ``z_stride``, centred in the volume (``0..nz-1``)."""
    if z_stride < 1:
        raise ValueError(f"z_stride must be >= 1, got {z_stride}")
    if z_start is None:
        z_start = ((nz - 1) % z_stride) // 2
    return np.arange(z_start, nz, z_stride)


def iter_stacks(volume: np.ndarray, window: Window, config: PreprocessConfig = PreprocessConfig(),
                z_indices: Sequence[int] | None = None, batch: int = 16
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(z_batch (B,), images (B, ny, nx, C))`` for the requested slices, ``batch`` at a time.

    Only one batch of preprocessed images exists at any time.
    """
    z_all = np.arange(volume.shape[0]) if z_indices is None else np.asarray(z_indices, dtype=int)
    cache: dict = {}
    lo = min(config.offsets) - config.slab // 2
    for i in range(0, len(z_all), batch):
        zs = z_all[i : i + batch]
        for k in [k for k in cache if k < int(zs.min()) + lo]:  # channels no later slice needs
            del cache[k]
        yield zs, np.stack([stack_slice(volume, int(z), window, config, cache) for z in zs])
