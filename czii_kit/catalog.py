"""The particle catalog: the single source of truth for the six particle types.

Radii are in Ångström; ``weight`` is the competition metric weight (beta-amylase is allowed in a
submission but weighs 0); ``class_id`` is the YOLO class index; ``copick_label`` and ``color`` follow
the competition's copick configuration; ``map_file`` names the density map in the shared reference
data (``density_maps/``).
"""

from __future__ import annotations

from dataclasses import dataclass

from czii_kit.errors import UnknownParticleError


@dataclass(frozen=True)
class Particle:
    """One particle type."""

    name: str
    radius: float  # Å
    weight: float  # competition metric weight
    difficulty: str  # "easy", "hard" or "not scored"
    pdb_id: str
    copick_label: int
    color: tuple[int, int, int]  # RGB 0-255
    map_file: str  # density map file name in density_maps/
    class_id: int  # YOLO class index

    @property
    def scored(self) -> bool:
        """True when the particle counts towards the competition score."""
        return self.weight > 0

    @property
    def hex_color(self) -> str:
        """Colour as ``#rrggbb`` for matplotlib."""
        return "#{:02x}{:02x}{:02x}".format(*self.color)


PARTICLES: tuple[Particle, ...] = (
    Particle("apo-ferritin", 60.0, 1.0, "easy", "4V1W", 1, (0, 117, 220), "8cpv.mrc", 0),
    Particle("beta-amylase", 65.0, 0.0, "not scored", "1FA2", 2, (153, 63, 0), "1fa2.mrc", 1),
    Particle("beta-galactosidase", 90.0, 2.0, "hard", "6X1Q", 3, (76, 0, 92), "6drv.mrc", 2),
    Particle("ribosome", 150.0, 1.0, "easy", "6EK0", 4, (0, 92, 49), "6qzp.mrc", 3),
    Particle("thyroglobulin", 130.0, 2.0, "hard", "6SCJ", 5, (43, 206, 72), "7n4y.mrc", 4),
    Particle("virus-like-particle", 135.0, 1.0, "easy", "6N4V", 6, (255, 204, 153), "6n4v.mrc", 5),
)
"""All six types, ordered by class id."""

PARTICLE_NAMES: tuple[str, ...] = tuple(p.name for p in PARTICLES)
SCORED_PARTICLES: tuple[str, ...] = tuple(p.name for p in PARTICLES if p.scored)
DISTRACTOR_MAP_FILE = "8vaf.mrc"
"""Density map of an unrelated small protein, used as a distractor by the simulator."""

_BY_NAME = {p.name: p for p in PARTICLES}
_BY_CLASS = {p.class_id: p for p in PARTICLES}


def get_particle(name_or_class: str | int) -> Particle:
    """Return the :class:`Particle` for a name (``"ribosome"``) or a YOLO class id (``3``).

    Raises
    ------
    UnknownParticleError
        If the name or id is not in the catalog.
    """
    if isinstance(name_or_class, str):
        try:
            return _BY_NAME[name_or_class]
        except KeyError:
            raise UnknownParticleError(
                f"unknown particle type {name_or_class!r}; known types: {', '.join(PARTICLE_NAMES)}"
            ) from None
    try:
        return _BY_CLASS[int(name_or_class)]
    except (KeyError, ValueError, TypeError):
        raise UnknownParticleError(f"unknown particle class id {name_or_class!r}") from None


def radii() -> dict[str, float]:
    """Particle radius in Å by name."""
    return {p.name: p.radius for p in PARTICLES}


def weights() -> dict[str, float]:
    """Metric weight by name (sums to 7)."""
    return {p.name: p.weight for p in PARTICLES}


def class_names() -> dict[int, str]:
    """YOLO class id -> name, as ultralytics' ``data.yaml`` wants it."""
    return {p.class_id: p.name for p in PARTICLES}
