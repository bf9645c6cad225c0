"""Configure ultralytics (and OpenVINO) so that nothing ever touches the network.

Call :func:`configure_offline` before building, training, exporting or running a YOLO model. It

* sets ``YOLO_OFFLINE=1`` (ultralytics' ``ONLINE`` flag becomes false: no pip auto-install, no
  GitHub asset download, no update checks) and ``YOLO_AUTOINSTALL=0`` (and clears the flags
  ultralytics computed at import when it was imported before this call);
* points ultralytics at its own config folder (``$CZII_KIT_HOME/ultralytics``, default
  ``~/.cache/czii_kit/ultralytics``) unless the user set ``YOLO_CONFIG_DIR`` or ultralytics is
  already imported, and turns analytics ``sync`` and every third-party logger integration off there
  (in memory only when the settings file is the user's own);
* installs a local font as ``Arial.ttf`` / ``Arial.Unicode.ttf`` in ultralytics' config folder.
  ultralytics' ``check_font`` looks for the font in ``USER_CONFIG_DIR``, then in matplotlib's font
  list, and otherwise downloads ``{ASSETS_URL}/Arial.ttf`` from GitHub (``is_url(check=True)`` sends
  a HEAD request even when offline). We copy matplotlib's bundled DejaVuSans there, so plots work
  and the check never reaches the download, and we also wrap ``check_font`` so a missing font file
  can never fall through to the network;
* drops ultralytics' banners from its logger (:func:`silence_banners`): the "Creating new Ultralytics
  Settings" notice on first use of a settings folder, and the "Loading ... for OpenVINO inference" /
  "Using OpenVINO LATENCY mode" lines its ``AutoBackend`` logs even with ``verbose=False``;
* stops OpenVINO's model-conversion telemetry (``openvino_telemetry`` would post usage events to
  Google Analytics during ``export(format="openvino")``) by making OpenVINO use its bundled no-op
  telemetry stub.

The function is idempotent and cheap after the first call.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")
_INTEGRATIONS = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb", "hub")
_OV_MODULES = (
    "openvino.tools.ovc.main",
    "openvino.tools.ovc.convert_impl",
    "openvino.tools.ovc.telemetry_utils",
    "openvino.tools.ovc.utils",
)
_BANNERS = ("Creating new Ultralytics Settings", "Loading ", "Using OpenVINO ")
"""Starts of ultralytics log messages that are banners, not results or problems."""
_state: dict = {}


class _NoBanners(logging.Filter):
    """Drop the ultralytics log records that start with one of :data:`_BANNERS`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BANNERS)


def silence_banners() -> None:
    """Filter ultralytics' banners (:data:`_BANNERS`) out of its logger; idempotent.

    Works before ultralytics is imported (its ``set_logging`` replaces handlers, not filters), so
    the settings banner it logs at import never shows.
    """
    logger = logging.getLogger("ultralytics")
    if not any(isinstance(f, _NoBanners) for f in logger.filters):
        logger.addFilter(_NoBanners())


def czii_home() -> Path:
    """czii_kit's cache folder: ``$CZII_KIT_HOME`` or ``~/.cache/czii_kit``."""
    return Path(os.environ.get("CZII_KIT_HOME") or Path.home() / ".cache" / "czii_kit").expanduser()


def local_font() -> Path:
    """A TrueType font shipped with matplotlib (DejaVuSans), used in place of ultralytics' Arial."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    if not path.is_file():  # pragma: no cover - matplotlib always ships it
        raise FileNotFoundError(f"{path}: matplotlib's bundled font is missing")
    return path


def _install_fonts(config_dir: Path) -> None:
    src = local_font()
    config_dir.mkdir(parents=True, exist_ok=True)
    for name in FONT_NAMES:
        dest = config_dir / name
        if not dest.is_file() or dest.stat().st_size == 0:
            tmp = dest.with_name(f".{name}.tmp-{os.getpid()}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)


def _block_openvino_telemetry() -> None:
    """Make OpenVINO's converter use its no-op telemetry stub instead of ``openvino_telemetry``."""
    if "openvino_telemetry" not in sys.modules or sys.modules.get("openvino_telemetry") is None:
        # A None entry makes ``import openvino_telemetry`` raise ImportError; OpenVINO then falls
        # back to openvino.tools.ovc.telemetry_stub (its documented behaviour without the package).
        sys.modules["openvino_telemetry"] = None
        sys.modules["openvino_telemetry.backend"] = None
    loaded = [m for m in _OV_MODULES if sys.modules.get(m) is not None]
    if loaded:
        import importlib

        stub = importlib.import_module("openvino.tools.ovc.telemetry_stub")
        for name in loaded:
            mod = sys.modules[name]
            if hasattr(mod, "tm"):
                mod.tm = stub


def _patch_check_font(fallback: Path) -> None:
    """Wrap ultralytics' ``check_font`` so it never downloads: unknown fonts map to ``fallback``."""
    import ultralytics.utils.checks as checks

    original = getattr(checks.check_font, "_czii_original", checks.check_font)
    user_dir = Path(__import__("ultralytics.utils", fromlist=["USER_CONFIG_DIR"]).USER_CONFIG_DIR)

    def check_font(font="Arial.ttf"):
        name = Path(str(font)).name
        if (user_dir / name).is_file():
            return original(font)  # found locally: no network
        if Path(str(font)).is_file():
            return Path(str(font))
        return fallback

    check_font._czii_original = original
    checks.check_font = check_font
    for modname in ("ultralytics.data.utils", "ultralytics.utils.plotting"):
        mod = sys.modules.get(modname)
        if mod is None:
            try:
                mod = __import__(modname, fromlist=["check_font"])
            except ImportError:  # pragma: no cover
                continue
        if hasattr(mod, "check_font"):
            mod.check_font = check_font


def configure_offline(config_dir: str | Path | None = None) -> Path:
    """Make ultralytics/OpenVINO offline; return ultralytics' config folder (holding the fonts).

    Parameters
    ----------
    config_dir : path-like, optional
        Parent folder for ultralytics' settings (``YOLO_CONFIG_DIR``); default
        ``czii_home()/ultralytics``. Ignored when ultralytics is already imported or the user set
        ``YOLO_CONFIG_DIR``.
    """
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    owned = False
    if "ultralytics" not in sys.modules and not os.environ.get("YOLO_CONFIG_DIR"):
        target = Path(config_dir) if config_dir else czii_home() / "ultralytics"
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError:  # read-only home (some notebook hosts): use the temp folder
            import tempfile

            target = Path(tempfile.gettempdir()) / "czii_kit_ultralytics"
            target.mkdir(parents=True, exist_ok=True)
        os.environ["YOLO_CONFIG_DIR"] = str(target)
        owned = True
    elif config_dir is None and os.environ.get("YOLO_CONFIG_DIR", "").startswith(str(czii_home())):
        owned = True
    _block_openvino_telemetry()
    silence_banners()

    import ultralytics.utils as uu

    # when ultralytics was imported before us, its import-time ONLINE/AUTOINSTALL flags are stale
    for name, mod in list(sys.modules.items()):
        if name.startswith("ultralytics") and mod is not None:
            if getattr(mod, "ONLINE", None) is True:
                mod.ONLINE = False
            if getattr(mod, "AUTOINSTALL", None) is True:
                mod.AUTOINSTALL = False
    cfg = Path(uu.USER_CONFIG_DIR)
    if _state.get("done") == cfg:
        return cfg
    _install_fonts(cfg)
    off = {k: False for k in _INTEGRATIONS if k in uu.SETTINGS}
    if owned:
        uu.SETTINGS.update(off)  # our own settings file: persist
    else:
        dict.update(uu.SETTINGS, off)  # the user's settings file: change this process only
    try:
        from ultralytics.utils import events

        events.events.enabled = False
    except (ImportError, AttributeError):  # pragma: no cover - older/newer ultralytics
        pass
    _patch_check_font(cfg / FONT_NAMES[0])
    _state["done"] = cfg
    return cfg
