"""storyworld: a tiny toy world with known ground truth, the default data of the course.

A *character* (a class word and four identity attributes) stands in a *scene*, doing an *action* (a named
preset of continuous pose parameters) at a horizontal position. `render` draws it with signed-distance
shapes in pure numpy (anti-aliased, so a pose that moves a little changes the picture a little), `caption`
describes it from a template, `labels` gives the indices the recognizer predicts; `sample_clip_endpoints` and
`clip_panels` make one character move smoothly between two panels. The torch Datasets built on it are in
`sdlite.storyworld.datasets`.

Coordinates: x to the right, y downwards, both in [0, 1] of the image side; shapes are measured in pixels
only when they are drawn, so any size that is a multiple of 8 renders the same picture.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "CLASS_WORDS",
    "HAIR_COLOURS",
    "SHIRT_COLOURS",
    "TROUSERS_COLOURS",
    "HATS",
    "SCENES",
    "ACTIONS",
    "IDENTITY_ATTRIBUTES",
    "ATTRIBUTES",
    "HAIR_RGB",
    "SHIRT_RGB",
    "TROUSERS_RGB",
    "HAT_RGB",
    "SKIN_RGB",
    "SHOES_RGB",
    "SCENE_PHRASES",
    "SCENE_KEY_RGB",
    "POSE_RANGES",
    "CLIP_KINDS",
    "Canvas",
    "Character",
    "Panel",
    "sample_character",
    "action_pose",
    "sample_panel",
    "interpolate",
    "check_size",
    "render",
    "caption",
    "all_words",
    "labels",
    "sample_clip_endpoints",
    "clip_panels",
]

# ----------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------
CLASS_WORDS = ("boy", "girl", "man", "woman")
HAIR_COLOURS = ("black", "brown", "blonde", "red", "pink")
SHIRT_COLOURS = ("red", "yellow", "green", "blue", "purple", "white")
TROUSERS_COLOURS = ("black", "blue", "grey", "brown")
HATS = ("no hat", "cap", "top hat", "crown")
SCENES = ("park", "beach", "city", "snow", "night", "room")
ACTIONS = ("standing", "walking", "jumping", "sitting", "waving")
IDENTITY_ATTRIBUTES = ("hair", "shirt", "trousers", "hat")

# Every label the recognizer predicts: name -> the tuple of its values (labels() gives indices into these).
ATTRIBUTES = {
    "class_word": CLASS_WORDS,
    "hair": HAIR_COLOURS,
    "shirt": SHIRT_COLOURS,
    "trousers": TROUSERS_COLOURS,
    "hat": HATS,
    "scene": SCENES,
    "action": ACTIONS,
}

# Saturated, well separated RGB colours (identity colours never jitter).
HAIR_RGB = {"black": (22, 22, 26), "brown": (120, 62, 20), "blonde": (250, 222, 90),
             "red": (214, 38, 24), "pink": (255, 112, 205)}
SHIRT_RGB = {"red": (220, 25, 35), "yellow": (255, 215, 0), "green": (20, 160, 60),
              "blue": (30, 80, 230), "purple": (140, 40, 190), "white": (245, 245, 245)}
TROUSERS_RGB = {"black": (28, 28, 32), "blue": (25, 50, 160), "grey": (140, 140, 140),
                 "brown": (125, 75, 30)}
HAT_RGB = {"cap": (255, 130, 0), "top hat": (45, 40, 55), "crown": (250, 190, 0)}
SKIN_RGB = (242, 192, 150)
SHOES_RGB = (70, 45, 30)
_EYES = (30, 30, 40)

SCENE_PHRASES = {"park": "in the park", "beach": "on the beach", "city": "in the city",
                  "snow": "in the snow", "night": "at night", "room": "in a room"}
_HAT_PHRASES = {"no hat": "wearing no hat", "cap": "wearing a cap", "top hat": "wearing a top hat",
                "crown": "wearing a crown"}

# The large background colours of each scene (sky or wall, ground or floor, the biggest landmark): drawn by
# `_draw_scene`, and counted by the second recognizer's colour reader (`sdlite.storyworld.recognizer`).
SCENE_KEY_RGB = {
    "park": {"sky": (95, 170, 255), "grass": (70, 175, 60), "tree": (25, 110, 35)},
    "beach": {"sky": (120, 200, 255), "sea": (20, 110, 205), "sand": (240, 212, 140)},
    "city": {"sky": (205, 215, 230), "house": (110, 110, 120), "road": (75, 75, 80), "window": (250, 225, 120)},
    "snow": {"sky": (165, 180, 205), "snow": (250, 252, 255)},
    "night": {"sky": (8, 12, 45), "grass": (25, 55, 40), "moon": (245, 245, 205)},
    "room": {"wall": (236, 206, 160), "floor": (150, 95, 50)},
}

# Body proportions in units of the figure height h (feet to top of head, standing). Children are smaller
# (h) and have relatively bigger heads; girls and women have long hair and a short skirt over the trousers.
_HEIGHT = {"boy": 0.54, "girl": 0.54, "man": 0.70, "woman": 0.70}
_GROUND = 0.95  # y of the soles of the feet (image fraction)


def _check_value(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}: use one of {list(allowed)}")


# ----------------------------------------------------------------------------------------------------------
# Characters and panels
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Character:
    """Who: a class word and the identity attributes (hair, shirt, trousers, hat)."""

    class_word: str
    hair: str
    shirt: str
    trousers: str
    hat: str

    def __post_init__(self) -> None:
        _check_value("class_word", self.class_word, CLASS_WORDS)
        _check_value("hair", self.hair, HAIR_COLOURS)
        _check_value("shirt", self.shirt, SHIRT_COLOURS)
        _check_value("trousers", self.trousers, TROUSERS_COLOURS)
        _check_value("hat", self.hat, HATS)


def sample_character(rng: np.random.Generator) -> Character:
    """A uniformly random character."""
    _check_rng(rng)
    return Character(
        class_word=CLASS_WORDS[rng.integers(len(CLASS_WORDS))],
        hair=HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))],
        shirt=SHIRT_COLOURS[rng.integers(len(SHIRT_COLOURS))],
        trousers=TROUSERS_COLOURS[rng.integers(len(TROUSERS_COLOURS))],
        hat=HATS[rng.integers(len(HATS))],
    )


# Continuous pose parameters of a Panel, with their allowed ranges.
POSE_RANGES = {
    "x": (0.0, 1.0),          # horizontal centre of the figure (image fraction)
    "stride": (-1.0, 1.0),    # leg swing: + front leg forward (towards `facing`)
    "arm_left": (-0.5, 3.2),  # angle (radians) of the left arm from hanging down, outwards
    "arm_right": (-0.5, 3.2),  # same for the right arm
    "crouch": (0.0, 1.0),     # 0 straight legs, 1 seated (thighs horizontal)
    "lift": (0.0, 0.3),       # feet above the ground (image fraction): jumping
    "backdrop": (0.0, 1.0),   # where the scenery sits (tree, buildings, moon): small background variation
}

# Action presets (the centre of each action's pose distribution).
_ACTION_POSES = {
    "standing": dict(stride=0.0, arm_left=0.15, arm_right=0.15, crouch=0.0, lift=0.0),
    "walking": dict(stride=0.7, arm_left=0.5, arm_right=-0.3, crouch=0.0, lift=0.0),
    "jumping": dict(stride=0.25, arm_left=2.5, arm_right=2.5, crouch=0.35, lift=0.17),
    "sitting": dict(stride=0.0, arm_left=0.35, arm_right=0.35, crouch=1.0, lift=0.0),
    "waving": dict(stride=0.0, arm_left=0.15, arm_right=2.6, crouch=0.0, lift=0.0),
}


@dataclasses.dataclass(frozen=True)
class Panel:
    """One picture: a character in a scene doing an action, with the continuous pose that draws it.

    `action` is the *label* (the named preset); the floats are what `render` draws, so clips can interpolate
    them smoothly. `facing` is +1 (right) or -1 (left).
    """

    character: Character
    scene: str
    action: str
    x: float = 0.5
    stride: float = 0.0
    arm_left: float = 0.15
    arm_right: float = 0.15
    crouch: float = 0.0
    lift: float = 0.0
    backdrop: float = 0.5
    facing: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.character, Character):
            raise TypeError(f"character must be a Character, got {type(self.character).__name__}: "
                            "build one with Character(...) or sample_character(rng)")
        _check_value("scene", self.scene, SCENES)
        _check_value("action", self.action, ACTIONS)
        for name, (lo, hi) in POSE_RANGES.items():
            v = getattr(self, name)
            if not (lo <= v <= hi):
                raise ValueError(f"{name}={v} is outside [{lo}, {hi}]: pass a value in that range")
        if self.facing not in (-1, 1):
            raise ValueError(f"facing={self.facing}: use +1 (right) or -1 (left)")


def _check_rng(rng) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator, got {type(rng).__name__}: "
                        "use np.random.default_rng(seed)")


def action_pose(action: str, rng: np.random.Generator | None = None) -> dict:
    """The pose parameters of a named action; with `rng`, a small random variation of the preset."""
    _check_value("action", action, ACTIONS)
    pose = dict(_ACTION_POSES[action])
    if rng is not None:
        pose["stride"] += rng.uniform(-0.1, 0.1)
        pose["arm_left"] += rng.uniform(-0.15, 0.15)
        pose["arm_right"] += rng.uniform(-0.15, 0.15)
        if action == "walking" and rng.random() < 0.5:  # the other phase of the gait
            pose["stride"] = -pose["stride"]
            pose["arm_left"], pose["arm_right"] = pose["arm_right"], pose["arm_left"]
        if action == "waving" and rng.random() < 0.5:  # wave with the other hand
            pose["arm_left"], pose["arm_right"] = pose["arm_right"], pose["arm_left"]
        if action == "jumping":
            pose["lift"] += rng.uniform(-0.03, 0.03)
    return {k: float(np.clip(v, *POSE_RANGES[k])) for k, v in pose.items()}


def sample_panel(rng: np.random.Generator, character: Character | None = None, *,
                 scene: str | None = None, action: str | None = None) -> Panel:
    """A random panel (scene, action, position, pose detail) of `character` (random if None)."""
    _check_rng(rng)
    if character is None:
        character = sample_character(rng)
    if scene is None:
        scene = SCENES[rng.integers(len(SCENES))]
    if action is None:
        action = ACTIONS[rng.integers(len(ACTIONS))]
    pose = action_pose(action, rng)
    return Panel(character=character, scene=scene, action=action, x=float(rng.uniform(0.32, 0.68)),
                 backdrop=float(rng.random()), facing=int(rng.choice([-1, 1])), **pose)


def interpolate(a: Panel, b: Panel, t: float) -> Panel:
    """The panel a fraction t in [0, 1] of the way from a to b (same character, scene and facing).

    Pose floats are interpolated linearly; the action label is a's before the midpoint and b's after.
    """
    if a.character != b.character or a.scene != b.scene or a.facing != b.facing:
        raise ValueError("interpolate needs two panels of the same character, scene and facing: "
                         "build b with dataclasses.replace(a, ...)")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t={t} is outside [0, 1]")
    vals = {k: (1 - t) * getattr(a, k) + t * getattr(b, k) for k in POSE_RANGES}
    return dataclasses.replace(a, action=a.action if t < 0.5 else b.action, **vals)


# ----------------------------------------------------------------------------------------------------------
# Rendering: anti-aliased signed-distance shapes on a float canvas
# ----------------------------------------------------------------------------------------------------------
class Canvas:
    """A float32 (S, S, 3) image; each shape is evaluated only inside its bounding box."""

    def __init__(self, size: int):
        self.s = size
        self.img = np.zeros((size, size, 3), np.float32)
        self.c = (np.arange(size, dtype=np.float32) + 0.5)  # pixel centres (in pixels)

    def _box(self, x0, y0, x1, y1):
        s = self.s
        i0, i1 = max(int(math.floor(y0 * s)) - 1, 0), min(int(math.ceil(y1 * s)) + 1, s)
        j0, j1 = max(int(math.floor(x0 * s)) - 1, 0), min(int(math.ceil(x1 * s)) + 1, s)
        return i0, i1, j0, j1

    def _paint(self, i0, i1, j0, j1, d, rgb, alpha=1.0):
        # d: signed distance in pixels (negative inside); coverage ramps over one pixel at the edge.
        a = np.minimum(np.maximum(0.5 - d, 0.0), 1.0)[..., None]  # (h, w, 1)
        if alpha != 1.0:
            a = a * alpha
        region = self.img[i0:i1, j0:j1]
        region += a * (np.asarray(rgb, np.float32) - region)

    def fill_rows(self, y0, y1, rgb):
        """Horizontal band from y0 to y1 (image fractions), anti-aliased at both edges."""
        i0, i1, _, _ = self._box(0, y0, 1, y1)
        if i1 <= i0:
            return
        y = self.c[i0:i1, None]
        d = np.maximum(y0 * self.s - y, y - y1 * self.s) * np.ones((1, self.s), np.float32)
        self._paint(i0, i1, 0, self.s, d, rgb)

    def gradient_rows(self, y0, y1, rgb0, rgb1):
        i0, i1, _, _ = self._box(0, y0, 1, y1)
        t = np.clip((self.c[i0:i1] / self.s - y0) / max(y1 - y0, 1e-6), 0, 1)[:, None, None]
        self.img[i0:i1] = (1 - t) * np.asarray(rgb0, np.float32) + t * np.asarray(rgb1, np.float32)

    def circle(self, cx, cy, r, rgb, *, below=None, above=None, alpha=1.0):
        """Disc; `above`/`below` keep only the part with y < above / y > below (half-plane cuts)."""
        if r <= 0:
            return
        i0, i1, j0, j1 = self._box(cx - r, cy - r, cx + r, cy + r)
        if i1 <= i0 or j1 <= j0:
            return
        s = self.s
        y, x = self.c[i0:i1, None], self.c[None, j0:j1]
        d = np.sqrt((x - cx * s) ** 2 + (y - cy * s) ** 2) - r * s
        if above is not None:
            d = np.maximum(d, y - above * s)
        if below is not None:
            d = np.maximum(d, below * s - y)
        self._paint(i0, i1, j0, j1, d, rgb, alpha)

    def capsule(self, ax, ay, bx, by, r, rgb):
        """A thick segment from a to b with round ends (limbs)."""
        i0, i1, j0, j1 = self._box(min(ax, bx) - r, min(ay, by) - r, max(ax, bx) + r, max(ay, by) + r)
        if i1 <= i0 or j1 <= j0:
            return
        s = self.s
        y, x = self.c[i0:i1, None] / s, self.c[None, j0:j1] / s
        dx, dy = bx - ax, by - ay
        t = np.clip(((x - ax) * dx + (y - ay) * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
        d = (np.sqrt((x - ax - t * dx) ** 2 + (y - ay - t * dy) ** 2) - r) * s
        self._paint(i0, i1, j0, j1, d, rgb)

    def rect(self, x0, y0, x1, y1, rgb, r=0.0, alpha=1.0):
        """Axis-aligned box with corner radius r."""
        i0, i1, j0, j1 = self._box(x0, y0, x1, y1)
        if i1 <= i0 or j1 <= j0:
            return
        s = self.s
        y, x = self.c[i0:i1, None] / s, self.c[None, j0:j1] / s
        hw, hh = (x1 - x0) / 2, (y1 - y0) / 2
        qx = np.abs(x - (x0 + x1) / 2) - (hw - r)
        qy = np.abs(y - (y0 + y1) / 2) - (hh - r)
        d = (np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2) + np.minimum(np.maximum(qx, qy), 0) - r)
        self._paint(i0, i1, j0, j1, d * s, rgb, alpha)

    def windows(self, x0, y0, x1, y1, rgb, pitch=(0.08, 0.1), pane=(0.035, 0.045)):
        """A grid of small lit windows (hard-edged) whose top-left corners start at (x0, y0)."""
        i0, i1, j0, j1 = self._box(x0, y0, x1, y1)
        if i1 <= i0 or j1 <= j0:
            return
        s = self.s
        y, x = self.c[i0:i1, None] / s, self.c[None, j0:j1] / s
        inside = ((x - x0) % pitch[0] < pane[0]) & (x >= x0) & (x < x1 + pane[0])
        inside = inside & ((y - y0) % pitch[1] < pane[1]) & (y >= y0) & (y < y1 + pane[1])
        self.img[i0:i1, j0:j1][inside] = rgb

    def polygon(self, pts: Sequence[tuple[float, float]], rgb):
        """Convex polygon, points in clockwise order on screen (y down); distance = max over edges."""
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        i0, i1, j0, j1 = self._box(min(xs), min(ys), max(xs), max(ys))
        if i1 <= i0 or j1 <= j0:
            return
        s = self.s
        y, x = self.c[i0:i1, None] / s, self.c[None, j0:j1] / s
        d = None
        for (px, py), (qx, qy) in zip(pts, list(pts[1:]) + [pts[0]]):
            ex, ey = qx - px, qy - py
            n = math.hypot(ex, ey)
            e = ((x - px) * ey - (y - py) * ex) / n  # > 0 outside for clockwise (screen) order
            d = e if d is None else np.maximum(d, e)
        self._paint(i0, i1, j0, j1, d * s, rgb)

    def to_uint8(self) -> np.ndarray:
        return np.clip(self.img + 0.5, 0, 255).astype(np.uint8)


def _draw_scene(cv: Canvas, scene: str, backdrop: float) -> None:
    """Large, recognisable background areas: sky / wall, ground / floor, and one or two landmarks."""
    b = backdrop
    key = SCENE_KEY_RGB.get(scene, {})
    if scene == "park":
        cv.gradient_rows(0.0, 0.62, key["sky"], (170, 215, 255))
        cv.fill_rows(0.6, 1.01, key["grass"])
        tx = 0.1 + 0.8 * b
        cv.rect(tx - 0.03, 0.3, tx + 0.03, 0.64, (110, 70, 35))
        cv.circle(tx, 0.27, 0.14, key["tree"])
        cv.circle(0.88 - 0.7 * b, 0.1, 0.06, (255, 235, 80))
    elif scene == "beach":
        cv.gradient_rows(0.0, 0.52, key["sky"], (200, 235, 255))
        cv.fill_rows(0.5, 0.68, key["sea"])
        cv.fill_rows(0.66, 1.01, key["sand"])
        cv.circle(0.12 + 0.76 * b, 0.12, 0.07, (255, 240, 60))
    elif scene == "city":
        cv.fill_rows(-0.01, 1.01, key["sky"])
        widths = (0.22, 0.17, 0.25, 0.2, 0.19, 0.23)
        tops = (0.18, 0.32, 0.1, 0.26, 0.14, 0.3)
        greys = (key["house"], (150, 140, 135), (90, 95, 110), (135, 135, 145), (120, 105, 100),
                 (100, 110, 115))
        x0 = -0.25 * b
        for w, top, g in zip(widths, tops, greys):
            cv.rect(x0, top, x0 + w - 0.01, 0.75, g)
            cv.windows(x0 + 0.04, top + 0.05, x0 + w - 0.05, 0.7, key["window"])
            x0 += w
        cv.fill_rows(0.74, 1.01, key["road"])
        cv.fill_rows(0.85, 0.87, (230, 230, 230))
    elif scene == "snow":
        cv.gradient_rows(0.0, 0.6, key["sky"], (215, 222, 235))
        cv.fill_rows(0.58, 1.01, key["snow"])
        tx = 0.12 + 0.76 * b
        cv.polygon([(tx, 0.2), (tx + 0.11, 0.6), (tx - 0.11, 0.6)], (25, 95, 70))
        cv.polygon([(tx, 0.2), (tx + 0.05, 0.36), (tx - 0.05, 0.36)], key["snow"])
        for k in range(9):  # snowflakes
            fx = (0.07 + 0.113 * k + 0.5 * b) % 1.0
            fy = 0.05 + 0.5 * ((k * 0.37 + b) % 1.0)
            cv.circle(fx, fy, 0.012, (255, 255, 255))
    elif scene == "night":
        cv.gradient_rows(0.0, 0.7, key["sky"], (30, 40, 95))
        cv.fill_rows(0.68, 1.01, key["grass"])
        cv.circle(0.15 + 0.7 * b, 0.15, 0.08, key["moon"])
        for k in range(8):  # stars
            sx = (0.05 + 0.123 * k + 0.3 * b) % 1.0
            sy = 0.04 + 0.45 * ((k * 0.61 + 0.2) % 1.0)
            cv.circle(sx, sy, 0.01, (255, 255, 220))
    elif scene == "room":
        cv.fill_rows(-0.01, 0.72, key["wall"])
        cv.fill_rows(0.7, 1.01, key["floor"])
        cv.fill_rows(0.7, 0.72, (110, 65, 35))
        wx = 0.08 + 0.64 * b
        cv.rect(wx - 0.01, 0.13, wx + 0.23, 0.45, (255, 255, 255))
        cv.rect(wx + 0.01, 0.15, wx + 0.21, 0.43, (140, 205, 250))
    else:  # pragma: no cover - guarded by Panel
        raise ValueError(f"unknown scene {scene!r}")


def _draw_character(cv: Canvas, p: Panel) -> None:
    ch = p.character
    child = ch.class_word in ("boy", "girl")
    long_hair = ch.class_word in ("girl", "woman")
    h = _HEIGHT[ch.class_word]
    f = p.facing
    rh = h * (0.14 if child else 0.115)       # head radius
    leg_len = h * (0.36 if child else 0.42)   # hip to sole
    torso = h - leg_len - 2 * rh - 0.01 * h   # shoulder to hip
    hw = h * (0.17 if child else 0.16)        # torso half-width
    leg_r = h * 0.066
    arm_r = h * 0.05
    arm_len = h * (0.33 if child else 0.36)
    thigh = shin = (leg_len - leg_r) / 2

    # Legs: thigh angle from hanging down (positive towards `facing`); sitting turns thighs horizontal.
    legs = []
    for sgn in (1.0, -1.0):
        a_t = p.crouch * 1.45 + sgn * p.stride * 0.5
        a_s = sgn * p.stride * 0.35 - 0.15 * p.crouch * (1 - p.crouch) * 4 * 0.5
        knee = (f * thigh * math.sin(a_t), thigh * math.cos(a_t))
        ankle = (knee[0] + f * shin * math.sin(a_s), knee[1] + shin * math.cos(a_s))
        legs.append((knee, ankle))
    drop = max(a[1] for _, a in legs) + leg_r  # hip to the lowest sole
    hip_y = _GROUND - p.lift - drop
    hip_x = p.x
    sh_y = hip_y - torso
    head_cy = sh_y - 0.01 * h - rh

    hair = HAIR_RGB[ch.hair]
    shirt = SHIRT_RGB[ch.shirt]
    trousers = TROUSERS_RGB[ch.trousers]

    if long_hair:  # long hair hangs behind the head down to below the shoulders
        cv.rect(hip_x - rh * 1.2, head_cy - rh * 0.3, hip_x + rh * 1.2, sh_y + 0.16 * h, hair, r=rh * 0.5)

    for k, (knee, ankle) in enumerate(legs):
        off = (0.065 if k == 0 else -0.065) * h * f * (1 - 0.6 * abs(p.stride))
        hx = hip_x + off
        cv.capsule(hx, hip_y, hx + knee[0], hip_y + knee[1], leg_r, trousers)
        cv.capsule(hx + knee[0], hip_y + knee[1], hx + ankle[0], hip_y + ankle[1], leg_r, trousers)
        ax, ay = hx + ankle[0], hip_y + ankle[1]
        cv.capsule(ax, ay + leg_r * 0.3, ax + f * leg_r * 1.3, ay + leg_r * 0.3, leg_r * 0.75, SHOES_RGB)

    if long_hair:  # a short skirt (trousers colour) over the hips: the girl / woman silhouette
        cv.polygon([(hip_x - hw * 0.95, hip_y - 0.04 * h), (hip_x + hw * 0.95, hip_y - 0.04 * h),
                    (hip_x + hw * 1.35, hip_y + 0.13 * h), (hip_x - hw * 1.35, hip_y + 0.13 * h)], trousers)

    cv.rect(hip_x - hw, sh_y, hip_x + hw, hip_y + 0.02 * h, shirt, r=0.05 * h)

    for side, ang in ((-1.0, p.arm_left), (1.0, p.arm_right)):
        sx, sy = hip_x + side * (hw - arm_r * 0.8), sh_y + arm_r * 1.1
        hx, hy = sx + side * arm_len * math.sin(ang), sy + arm_len * math.cos(ang)
        cv.capsule(sx, sy, hx, hy, arm_r, shirt)
        cv.circle(hx + side * 0.2 * arm_r * math.sin(ang), hy + 0.2 * arm_r * math.cos(ang), arm_r * 1.15,
                  SKIN_RGB)

    cv.circle(hip_x, head_cy, rh, SKIN_RGB)
    # hair on top of the head (and down the sides)
    cv.circle(hip_x, head_cy - 0.06 * rh, rh * 1.1, hair, above=head_cy - 0.25 * rh)
    cv.rect(hip_x - rh * 1.1, head_cy - 0.5 * rh, hip_x - rh * 0.75, head_cy + (0.6 if long_hair else 0.1) * rh,
            hair, r=0.1 * rh)
    cv.rect(hip_x + rh * 0.75, head_cy - 0.5 * rh, hip_x + rh * 1.1, head_cy + (0.6 if long_hair else 0.1) * rh,
            hair, r=0.1 * rh)
    for ex in (-0.38, 0.38):
        cv.circle(hip_x + (ex + 0.15 * f) * rh, head_cy + 0.1 * rh, 0.12 * rh, _EYES)

    top = head_cy - rh * 1.1
    if ch.hat == "cap":
        c = HAT_RGB["cap"]
        cv.circle(hip_x, head_cy - 0.1 * rh, rh * 1.14, c, above=head_cy - 0.4 * rh)
        by = head_cy - 0.4 * rh
        x_in, x_out = hip_x + f * 0.3 * rh, hip_x + f * 1.75 * rh
        cv.rect(min(x_in, x_out), by - 0.2 * rh, max(x_in, x_out), by + 0.12 * rh, c, r=0.08 * rh)
    elif ch.hat == "top hat":
        c = HAT_RGB["top hat"]
        cv.rect(hip_x - 1.45 * rh, top + 0.05 * rh, hip_x + 1.45 * rh, top + 0.35 * rh, c, r=0.1 * rh)
        cv.rect(hip_x - 0.9 * rh, top - 1.25 * rh, hip_x + 0.9 * rh, top + 0.2 * rh, c)
        cv.rect(hip_x - 0.9 * rh, top - 0.15 * rh, hip_x + 0.9 * rh, top + 0.08 * rh, (200, 30, 40))
    elif ch.hat == "crown":
        c = HAT_RGB["crown"]
        base0, base1 = top - 0.25 * rh, top + 0.35 * rh
        cv.rect(hip_x - 1.0 * rh, base0, hip_x + 1.0 * rh, base1, c)
        for k in (-1, 0, 1):
            cx = hip_x + k * 0.68 * rh
            cv.polygon([(cx - 0.33 * rh, base0 + 0.05 * rh), (cx, base0 - 0.75 * rh),
                        (cx + 0.33 * rh, base0 + 0.05 * rh)], c)


def check_size(size) -> None:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 8 or size % 8:
        raise ValueError(f"size={size!r}: use a positive multiple of 8 (e.g. 64), "
                         "so the VAE's 8x downsampling divides it")


def render(panel: Panel, size: int = 64) -> np.ndarray:
    """Draw a panel. Returns uint8 (size, size, 3)."""
    if not isinstance(panel, Panel):
        raise TypeError(f"render needs a Panel, got {type(panel).__name__}: build one with sample_panel(rng)")
    check_size(size)
    cv = Canvas(int(size))
    _draw_scene(cv, panel.scene, panel.backdrop)
    _draw_character(cv, panel)
    return cv.to_uint8()


# ----------------------------------------------------------------------------------------------------------
# Captions and labels
# ----------------------------------------------------------------------------------------------------------
def caption(panel: Panel, rng: np.random.Generator | None = None, drop_prob: float = 0.5,
            drop: Iterable[str] | None = None) -> str:
    """Describe a panel, e.g. "a boy with red hair, a blue shirt and grey trousers, wearing a cap, walking
    in the park".

    Which identity attributes are left out: exactly `drop` if given; else each independently with
    probability `drop_prob` when `rng` is given; else none. Class word, action and scene are always said.
    """
    if not isinstance(panel, Panel):
        raise TypeError(f"caption needs a Panel, got {type(panel).__name__}")
    if drop is not None:
        drop = set(drop)
        bad = drop - set(IDENTITY_ATTRIBUTES)
        if bad:
            raise ValueError(f"cannot drop {sorted(bad)}: drop only identity attributes {IDENTITY_ATTRIBUTES}")
    elif rng is not None:
        _check_rng(rng)
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob={drop_prob} is outside [0, 1]")
        drop = {a for a in IDENTITY_ATTRIBUTES if rng.random() < drop_prob}
    else:
        drop = set()
    ch = panel.character
    parts = []
    if "hair" not in drop:
        parts.append(f"{ch.hair} hair")
    if "shirt" not in drop:
        parts.append(f"a {ch.shirt} shirt")
    if "trousers" not in drop:
        parts.append(f"{ch.trousers} trousers")
    text = f"a {ch.class_word}"
    if parts:
        text += " with " + (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])
    if "hat" not in drop:
        text += ", " + _HAT_PHRASES[ch.hat]
    return text + f", {panel.action} {SCENE_PHRASES[panel.scene]}"


def all_words() -> tuple[str, ...]:
    """Every word a caption can use (lower case, sorted; the only punctuation in captions is ',')."""
    words = {"a", "with", "and", "hair", "shirt", "trousers", "then"}
    for values in (CLASS_WORDS, HAIR_COLOURS, SHIRT_COLOURS, TROUSERS_COLOURS, ACTIONS):
        words.update(values)
    for phrase in list(SCENE_PHRASES.values()) + list(_HAT_PHRASES.values()):
        words.update(phrase.split())
    return tuple(sorted(words))


def labels(panel: Panel) -> dict[str, int]:
    """Indices into ATTRIBUTES of every label of a panel."""
    ch = panel.character
    values = {"class_word": ch.class_word, "hair": ch.hair, "shirt": ch.shirt, "trousers": ch.trousers,
              "hat": ch.hat, "scene": panel.scene, "action": panel.action}
    return {name: ATTRIBUTES[name].index(values[name]) for name in ATTRIBUTES}


# ----------------------------------------------------------------------------------------------------------
# Clips
# ----------------------------------------------------------------------------------------------------------
CLIP_KINDS = ("walk across", "sit down", "stand up", "jump", "wave", "any")


def sample_clip_endpoints(rng: np.random.Generator, character: Character | None = None,
                          kind: str | None = None) -> tuple[Panel, Panel, int]:
    """Two panels of one character in one scene, and the number of gait cycles between them.

    Kinds: walk across (x moves ~0.4 with a walk cycle), sit down / stand up, jump (standing -> in the
    air), wave (standing -> waving), any (two random actions at two random positions).
    """
    _check_rng(rng)
    if kind is None:
        kind = CLIP_KINDS[rng.integers(len(CLIP_KINDS))]
    _check_value("clip kind", kind, CLIP_KINDS)
    a = sample_panel(rng, character)
    if kind == "walk across":
        a = sample_panel(rng, a.character, scene=a.scene, action="walking")
        x0 = float(rng.uniform(0.22, 0.35))
        x1 = float(x0 + rng.uniform(0.35, 0.45))
        a = dataclasses.replace(a, x=x0 if a.facing > 0 else 1 - x0)
        b = dataclasses.replace(a, x=x1 if a.facing > 0 else 1 - x1)
        return a, b, 1
    actions = {"sit down": ("standing", "sitting"), "stand up": ("sitting", "standing"),
               "jump": ("standing", "jumping"), "wave": ("standing", "waving")}
    if kind == "any":
        act0, act1 = (ACTIONS[i] for i in rng.choice(len(ACTIONS), size=2, replace=False))
        a = dataclasses.replace(a, action=act0, **action_pose(act0, rng))
        b = dataclasses.replace(a, action=act1, x=float(rng.uniform(0.3, 0.7)), **action_pose(act1, rng))
        return a, b, 0
    act0, act1 = actions[kind]
    a = dataclasses.replace(a, action=act0, **action_pose(act0, rng))
    b = dataclasses.replace(a, action=act1, **action_pose(act1, rng))
    return a, b, 0


def clip_panels(a: Panel, b: Panel, frames: int = 16, gait_cycles: int = 0) -> list[Panel]:
    """Every frame from a to b (both included): linear pose interpolation, plus `gait_cycles` full leg/arm
    swings (a sine that vanishes at both ends, so the clip still starts at a and ends at b)."""
    if not isinstance(frames, (int, np.integer)) or frames < 2:
        raise ValueError(f"frames={frames!r}: a clip needs at least 2 frames (its two endpoints)")
    out = []
    for i in range(frames):
        t = i / (frames - 1)
        p = interpolate(a, b, t)
        if gait_cycles and 0 < i < frames - 1:
            w = math.sin(2 * math.pi * gait_cycles * t)
            p = dataclasses.replace(
                p, stride=float(np.clip(p.stride - 1.4 * w * a.stride, -1, 1)),
                arm_left=float(np.clip(p.arm_left - 0.8 * w * (a.arm_left - 0.1), *POSE_RANGES["arm_left"])),
                arm_right=float(np.clip(p.arm_right - 0.8 * w * (a.arm_right - 0.1), *POSE_RANGES["arm_right"])))
        out.append(p)
    return out


