"""Scenes and drawing for the synthetic VID benchmark (``megavod synth``, see ``synthetic.py``).

Why temporal context matters here, by construction:

* 8 classes in 4 pairs. The two classes of a pair share everything a single frame shows in general
  (silhouette, aspect and size distribution, body colour distribution, motion) and differ only in one
  cue: a texture (stripes / dots, horizontal stripes / checker), a marking (spot at the front / at the
  rear) or a part (two ears / a tail).
* Each object's cue is hidden in 40-60% of its frames, in 1-3 contiguous spans (which may open or
  close the track, so the helpful frames are near or far). In a hidden frame the cue is physically
  absent from the pixels (amplitude 0) and one of four degradations explains why: ``blur`` (motion /
  defocus blur), ``occluder`` (bars in front of the object), ``low_contrast`` (object faded towards the
  background) or ``backlit`` (a dark silhouette, the object turned away from the light). A hidden frame
  alone therefore cannot tell the two classes of a pair apart; other frames of the same track can.
* Motion is drawn per video (static / slow / medium / fast with direction changes, per-track jitter),
  so that the motion-IoU buckets of docs/conventions.md#evaluation-protocol
  (fast <= 0.7 < medium < 0.9 <= slow) are all populated.

Everything is a pure function of a ``numpy.random.Generator``; drawing is vectorised numpy on small
per-object patches plus a few PIL primitives for the background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from megavod.data.classes import VID_CLASSES


@dataclass(frozen=True)
class ClassSpec:
    name: str
    shape: str  # ellipse | roundbox | kite | bodypart
    cue: str  # stripes | dots | hstripes | checker | mark_front | mark_rear | ears | tail
    aspect: tuple[float, float]  # width / height range, shared by the pair

    @property
    def label(self) -> int:
        return VID_CLASSES.index(self.name)


CLASS_SPECS: tuple[ClassSpec, ...] = (
    ClassSpec("zebra", "ellipse", "stripes", (1.2, 1.8)),
    ClassSpec("cattle", "ellipse", "dots", (1.2, 1.8)),
    ClassSpec("bus", "roundbox", "hstripes", (1.5, 2.2)),
    ClassSpec("car", "roundbox", "checker", (1.5, 2.2)),
    ClassSpec("airplane", "kite", "mark_front", (1.3, 1.9)),
    ClassSpec("bird", "kite", "mark_rear", (1.3, 1.9)),
    ClassSpec("bear", "bodypart", "ears", (0.9, 1.3)),
    ClassSpec("fox", "bodypart", "tail", (0.9, 1.3)),
)
HIDE_MODES: tuple[str, ...] = ("blur", "occluder", "low_contrast", "backlit")

# Video-level motion profiles: probability, speed in object sizes per frame, heading random-walk sd
# (rad/frame), probability of a sharp turn per frame, scale-oscillation amplitude, wall margin
# (object centre may go this many widths beyond the border; > 0.5 lets it leave the frame entirely).
MOTION_PROFILES: dict[str, dict[str, float]] = {
    "static": dict(p=0.17, speed=0.0015, turn=0.4, sharp=0.0, scale=0.01, margin=-0.35),
    "slow": dict(p=0.15, speed=0.005, turn=0.05, sharp=0.0, scale=0.02, margin=-0.35),
    "medium": dict(p=0.33, speed=0.018, turn=0.05, sharp=0.01, scale=0.05, margin=0.0),
    "fast": dict(p=0.35, speed=0.05, turn=0.12, sharp=0.05, scale=0.10, margin=0.7),
}
MIN_BOX_SIDE = 4  # boxes whose visible part is thinner than this (pixels, +1 convention) are not annotated


@dataclass
class Track:
    """One object over the whole video; arrays are indexed by frame, ``present`` marks its lifetime."""

    spec: ClassSpec
    color: np.ndarray  # [3] body colour in [0, 1]
    spot_color: np.ndarray  # [3] colour of a marking
    cx: np.ndarray
    cy: np.ndarray
    w: np.ndarray
    h: np.ndarray
    heading: np.ndarray  # +1 facing right, -1 facing left
    present: np.ndarray  # bool
    hidden: np.ndarray  # bool: cue hidden
    mode: np.ndarray  # int: index into HIDE_MODES, -1 when visible
    occluder: dict[int, tuple] = field(default_factory=dict)  # span start -> bar parameters
    span_start: np.ndarray | None = None  # frame where the current hidden span started, -1 if visible


@dataclass
class Scene:
    width: int
    height: int
    num_frames: int
    motion: str
    background: np.ndarray  # [H + 2m, W + 2m, 3] float32
    pan: np.ndarray  # [F, 2] integer offsets (x, y) into the background
    noise: np.ndarray  # [K, H, W, 1] float32 sensor noise bank
    tracks: list[Track]


def _composition(rng: np.random.Generator, total: int, parts: int, minimum: int) -> list[int]:
    """Split ``total`` into ``parts`` integers >= ``minimum``, uniformly over the cut points."""
    free = total - parts * minimum
    cuts = np.sort(rng.integers(0, free + 1, size=parts - 1)) if parts > 1 else np.zeros(0, int)
    edges = np.concatenate([[0], cuts, [free]])
    return [int(d) + minimum for d in np.diff(edges)]


def hidden_schedule(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Hidden flags and span starts for a track of ``length`` frames: 40-60% hidden, 1-3 spans."""
    hidden = np.zeros(length, bool)
    starts = np.full(length, -1, int)
    if length < 3:
        return hidden, starts
    n_hidden = int(np.clip(round(rng.uniform(0.4, 0.6) * length), 1, length - 1))
    n_visible = length - n_hidden
    k = int(rng.integers(1, min(3, max(1, length // 15)) + 1))
    k = max(1, min(k, n_hidden, n_visible + 1))
    hidden_parts = _composition(rng, n_hidden, k, 1)
    # Visible runs: the k-1 inner runs need >= 1 frame to separate spans; the two ends may be empty.
    inner = _composition(rng, n_visible - (k - 1), k + 1, 0)
    visible_parts = [inner[0]] + [inner[i] + 1 for i in range(1, k)] + [inner[k]]
    t = 0
    for i in range(k):
        t += visible_parts[i]
        hidden[t : t + hidden_parts[i]] = True
        starts[t : t + hidden_parts[i]] = t
        t += hidden_parts[i]
    return hidden, starts


def _simulate_motion(
    rng: np.random.Generator, profile: dict[str, float], num_frames: int, width: int, height: int,
    w0: float, h0: float,
) -> tuple[np.ndarray, ...]:
    size = math.sqrt(w0 * h0)
    speed = profile["speed"] * size * float(rng.lognormal(0.0, 0.35))
    period = rng.uniform(40, 120)
    phase = rng.uniform(0, 2 * math.pi)
    t = np.arange(num_frames)
    scale = np.exp(profile["scale"] * np.sin(2 * math.pi * t / period + phase))
    w, h = w0 * scale, h0 * scale
    turns = rng.normal(0.0, profile["turn"], num_frames)
    sharp = rng.random(num_frames) < profile["sharp"]
    turns[sharp] += rng.choice([-1.0, 1.0], int(sharp.sum())) * rng.uniform(1.0, 3.0, int(sharp.sum()))
    lo_x, hi_x = -profile["margin"] * w0, width + profile["margin"] * w0
    lo_y, hi_y = -profile["margin"] * h0, height + profile["margin"] * h0
    x, y = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    angle = rng.uniform(0, 2 * math.pi)
    cx, cy, vx = np.empty(num_frames), np.empty(num_frames), np.empty(num_frames)
    for i in range(num_frames):
        cx[i], cy[i] = x, y
        angle += turns[i]
        dx, dy = speed * math.cos(angle), speed * math.sin(angle)
        x, y = x + dx, y + dy
        # Bounce off the walls, mirroring the heading.
        if x < lo_x or x > hi_x:
            x = float(np.clip(2 * (lo_x if x < lo_x else hi_x) - x, lo_x, hi_x))
            angle = math.pi - angle
        if y < lo_y or y > hi_y:
            y = float(np.clip(2 * (lo_y if y < lo_y else hi_y) - y, lo_y, hi_y))
            angle = -angle
        vx[i] = dx
    # Facing follows the horizontal motion with hysteresis; near-static objects keep a random facing.
    heading = np.empty(num_frames)
    face = float(rng.choice([-1.0, 1.0]))
    for i in range(num_frames):
        if abs(vx[i]) > 0.3 * speed and speed > 0.01 * size:
            face = 1.0 if vx[i] > 0 else -1.0
        heading[i] = face
    return cx, cy, w, h, heading


def _random_color(rng: np.random.Generator) -> np.ndarray:
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.25, 0.8), rng.uniform(0.35, 0.85)
    rgb = np.clip(np.abs((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
    return (val * (1 - sat + sat * rgb)).astype(np.float32)


def occluder_params(rng: np.random.Generator) -> tuple[bool, int, float, np.ndarray]:
    """Fence-like bars kept for a whole hidden span: vertical?, bar count, phase, colour."""
    vertical, bars, phase = bool(rng.random() < 0.5), int(rng.integers(2, 4)), float(rng.uniform(0, 1))
    return vertical, bars, phase, _random_color(rng) * 0.6


def make_track(
    rng: np.random.Generator, spec: ClassSpec, motion: str, num_frames: int, width: int, height: int,
    start: int, end: int, hidden_modes: tuple[str, ...] = HIDE_MODES,
) -> Track:
    """A track of class ``spec`` present in frames ``start..end`` (inclusive)."""
    aspect = rng.uniform(*spec.aspect)
    size = min(width, height) * rng.uniform(0.17, 0.42)
    w0, h0 = size * math.sqrt(aspect), size / math.sqrt(aspect)
    cx, cy, w, h, heading = _simulate_motion(
        rng, MOTION_PROFILES[motion], num_frames, width, height, w0, h0
    )
    present = np.zeros(num_frames, bool)
    present[start : end + 1] = True
    hidden = np.zeros(num_frames, bool)
    span_start = np.full(num_frames, -1, int)
    hidden[start : end + 1], starts = hidden_schedule(rng, end - start + 1)
    span_start[start : end + 1] = np.where(starts >= 0, starts + start, -1)
    mode = np.full(num_frames, -1, int)
    occluder: dict[int, tuple] = {}
    for s in sorted(set(span_start[span_start >= 0].tolist())):
        m = HIDE_MODES.index(hidden_modes[int(rng.integers(len(hidden_modes)))])
        mode[span_start == s] = m
        occluder[s] = occluder_params(rng)
    spot = np.array([[1.0, 1.0, 0.95], [1.0, 0.9, 0.1], [0.1, 0.95, 1.0], [1.0, 0.2, 0.2]], np.float32)
    return Track(spec, _random_color(rng), spot[int(rng.integers(4))], cx, cy, w, h, heading,
                 present, hidden, mode, occluder, span_start)


def make_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A cluttered static background [height, width, 3] float32 in [0, 1]."""
    top, bottom = _random_color(rng), _random_color(rng)
    ramp = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    base = top * (1 - ramp) + bottom * ramp
    blotch = rng.uniform(-0.15, 0.15, (4 + int(rng.integers(4)), 5 + int(rng.integers(5)), 3))
    blotch_img = Image.fromarray(((blotch + 0.5) * 255).astype(np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    base = base + np.asarray(blotch_img, np.float32) / 255.0 - 0.5
    img = Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    area = width * height
    for _ in range(int(area / 1500) + int(rng.integers(4, 10))):
        c = tuple(int(v) for v in (_random_color(rng) * 255))
        x0, y0 = rng.uniform(-10, width), rng.uniform(-10, height)
        sw, sh = rng.uniform(4, width / 4), rng.uniform(4, height / 4)
        kind = int(rng.integers(4))
        if kind == 0:
            draw.rectangle([x0, y0, x0 + sw, y0 + sh], fill=c)
        elif kind == 1:
            draw.ellipse([x0, y0, x0 + sw, y0 + sh], fill=c)
        elif kind == 2:
            draw.line([x0, y0, x0 + rng.uniform(-1, 1) * sw * 2, y0 + rng.uniform(-1, 1) * sh * 2],
                      fill=c, width=int(rng.integers(1, 4)))
        else:
            pts = [(x0 + rng.uniform(0, sw), y0 + rng.uniform(0, sh)) for _ in range(3)]
            draw.polygon(pts, fill=c)
    out = np.asarray(img, np.float32) / 255.0
    # Textured distractor patches: the cue textures also occur in the background, so a texture alone
    # does not make an object.
    for _ in range(int(rng.integers(2, 5))):
        pw, ph = int(rng.uniform(8, width / 5)), int(rng.uniform(8, height / 5))
        x0, y0 = int(rng.integers(0, max(1, width - pw))), int(rng.integers(0, max(1, height - ph)))
        yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32)
        cue = ("stripes", "dots", "hstripes", "checker")[int(rng.integers(4))]
        pattern = _texture(cue, xx, yy, float(rng.uniform(3.5, 8)))
        out[y0 : y0 + ph, x0 : x0 + pw] = np.clip(
            _random_color(rng) * (1 + 0.4 * pattern[..., None]), 0, 1
        )
    return out


def make_scene(
    rng: np.random.Generator, num_frames: int, width: int, height: int, motion: str | None = None,
    hidden_modes: tuple[str, ...] = HIDE_MODES,
) -> Scene:
    """A video: background with camera pan, 2-5 tracks (some entering late or leaving early)."""
    if motion is None:
        names = list(MOTION_PROFILES)
        probs = np.array([MOTION_PROFILES[n]["p"] for n in names])
        motion = names[int(rng.choice(len(names), p=probs / probs.sum()))]
    margin = max(2, int(0.08 * min(width, height)))
    background = make_background(rng, width + 2 * margin, height + 2 * margin)
    start = rng.integers(0, 2 * margin + 1, size=2)
    end = start if rng.random() < 0.5 else rng.integers(0, 2 * margin + 1, size=2)
    frac = np.linspace(0, 1, num_frames)[:, None]
    pan = np.rint(start * (1 - frac) + end * frac).astype(int)
    noise_sd = rng.uniform(0.01, 0.035)
    noise = rng.normal(0, noise_sd, (3, height, width, 1)).astype(np.float32)
    tracks = []
    num_tracks = int(rng.integers(2, 4)) + int(rng.integers(0, 1 + num_frames // 60))
    for i in range(num_tracks):
        spec = CLASS_SPECS[int(rng.integers(len(CLASS_SPECS)))]
        if i == 0 or rng.random() < 0.35 or num_frames < 6:
            first, last = 0, num_frames - 1
        else:
            length = int(rng.uniform(0.3, 0.8) * num_frames)
            first = int(rng.integers(0, num_frames - length + 1))
            last = first + length - 1
        tracks.append(make_track(rng, spec, motion, num_frames, width, height, first, last, hidden_modes))
    return Scene(width, height, num_frames, motion, background, pan, noise, tracks)


def gt_box(track: Track, t: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The integer GT box (+1 convention) of ``track`` in frame ``t``, clipped; None if not annotated."""
    if not track.present[t]:
        return None
    x1 = round(track.cx[t] - track.w[t] / 2)
    y1 = round(track.cy[t] - track.h[t] / 2)
    x2 = round(track.cx[t] + track.w[t] / 2) - 1
    y2 = round(track.cy[t] + track.h[t] / 2) - 1
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, width - 1), min(y2, height - 1)
    if x2 - x1 + 1 < MIN_BOX_SIDE or y2 - y1 + 1 < MIN_BOX_SIDE:
        return None
    return int(x1), int(y1), int(x2), int(y2)


# ----------------------------------------------------------------------------------------------
# Drawing


def _texture(cue: str, x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
    """A zero-ish-mean pattern in [-1, 1] for the texture cues, in object-relative pixels."""
    a, b = 2 * math.pi * x / period, 2 * math.pi * y / period
    if cue == "stripes":
        return np.tanh(3 * np.sin(a))
    if cue == "hstripes":
        return np.tanh(3 * np.sin(b))
    if cue == "checker":
        return np.tanh(4 * np.sin(a) * np.sin(b))
    if cue == "dots":
        dx = (x % period) / period - 0.5
        dy = (y % period) / period - 0.5
        r = np.sqrt(dx * dx + dy * dy) * period
        return np.clip((0.3 * period - r) * 1.5, -0.4, 1.0)
    raise ValueError(f"unknown texture cue {cue!r}")


def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _box_blur(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    if r <= 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r + 1, r)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float32)
    n = a.shape[axis]
    hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    return (hi - lo) / (2 * r + 1)


def _object_patch(
    track: Track, t: int, xs: np.ndarray, ys: np.ndarray, amp: float
) -> tuple[np.ndarray, np.ndarray]:
    """Colour [h, w, 3] and coverage [h, w] of the object on the pixel-centre grid ``xs`` × ``ys``."""
    spec = track.spec
    cx, cy, w, h, face = track.cx[t], track.cy[t], track.w[t], track.h[t], track.heading[t]
    X = (xs[None, :] - cx) * face  # object frame, +X = facing direction
    Y = ys[:, None] - cy
    X, Y = np.broadcast_to(X, (len(ys), len(xs))), np.broadcast_to(Y, (len(ys), len(xs)))
    s = min(w, h)
    if spec.shape == "ellipse":
        sdf = (np.sqrt((2 * X / w) ** 2 + (2 * Y / h) ** 2) - 1) * s / 2
    elif spec.shape == "roundbox":
        sdf = (((2 * X / w) ** 4 + (2 * Y / h) ** 4) ** 0.25 - 1) * s / 2
    elif spec.shape == "kite":
        # Triangle: flat back at X = -w/2 (full height), tip at X = +w/2.
        half = h / 2 * (w / 2 - X) / w
        slant = (np.abs(Y) - half) / math.sqrt(1 + (h / (2 * w)) ** 2)
        sdf = np.maximum(slant, -w / 2 - X)
    else:  # bodypart: the body, the part (ears / tail) added below
        bw, bh = 0.38 * w, 0.36 * h
        sdf = (np.sqrt(((X - 0.05 * w) / bw) ** 2 + ((Y - 0.12 * h) / bh) ** 2) - 1) * min(bw, bh)
    alpha = _coverage(sdf)

    shade = (1.08 - 0.16 * (Y / h + 0.5))[..., None]
    rgb = np.broadcast_to(track.color * shade, X.shape + (3,)).copy()
    if amp > 0:
        period = float(np.clip(s / 4, 3.5, 10))
        if spec.cue in ("stripes", "dots", "hstripes", "checker"):
            rgb *= 1 + 0.45 * amp * _texture(spec.cue, X, Y, period)[..., None]
        elif spec.cue in ("mark_front", "mark_rear"):
            mx = 0.1 * w if spec.cue == "mark_front" else -0.3 * w
            spot = _coverage(np.sqrt((X - mx) ** 2 + Y**2) - 0.15 * h)[..., None] * amp
            rgb = rgb * (1 - spot) + track.spot_color * spot
        else:
            r = 0.13 * s
            if spec.cue == "ears":
                part = np.minimum(
                    np.sqrt((X - 0.05 * w + 0.2 * w) ** 2 + (Y + 0.34 * h) ** 2),
                    np.sqrt((X - 0.05 * w - 0.2 * w) ** 2 + (Y + 0.34 * h) ** 2),
                ) - r
            else:  # tail at the rear, a thin ellipse
                tw, th = 0.09 * w, 0.16 * h
                part = (np.sqrt(((X + 0.4 * w) / tw) ** 2 + ((Y - 0.0 * h) / th) ** 2) - 1) * min(tw, th)
            alpha = np.maximum(alpha, _coverage(part) * amp)
    return np.clip(rgb, 0, 1), alpha


def draw_track(frame: np.ndarray, track: Track, t: int) -> None:
    """Composite ``track`` at frame ``t`` onto ``frame`` ([H, W, 3] float32) in place."""
    height, width = frame.shape[:2]
    mode = HIDE_MODES[track.mode[t]] if track.hidden[t] else None
    w, h = track.w[t], track.h[t]
    blur_r = int(max(1, round(0.08 * min(w, h)))) if mode == "blur" else 0
    pad = 2 + 3 * blur_r
    x0 = max(int(math.floor(track.cx[t] - w / 2)) - pad, 0)
    x1 = min(int(math.ceil(track.cx[t] + w / 2)) + pad, width)
    y0 = max(int(math.floor(track.cy[t] - h / 2)) - pad, 0)
    y1 = min(int(math.ceil(track.cy[t] + h / 2)) + pad, height)
    if x1 <= x0 or y1 <= y0:
        return
    xs = np.arange(x0, x1, dtype=np.float32) + 0.5
    ys = np.arange(y0, y1, dtype=np.float32) + 0.5
    rgb, alpha = _object_patch(track, t, xs, ys, amp=0.0 if mode else 1.0)
    region = frame[y0:y1, x0:x1]
    if mode == "low_contrast":
        under = region.reshape(-1, 3).mean(axis=0)
        rgb = rgb * 0.3 + under * 0.7
    elif mode == "backlit":
        rgb = rgb * 0.25 + 0.02
    elif mode == "blur":
        premul = np.concatenate([rgb * alpha[..., None], alpha[..., None]], axis=-1)
        # Motion blur: longer along the dominant motion axis, then a round blur on both axes.
        dx = abs(track.cx[min(t + 1, len(track.cx) - 1)] - track.cx[max(t - 1, 0)])
        dy = abs(track.cy[min(t + 1, len(track.cy) - 1)] - track.cy[max(t - 1, 0)])
        extra = blur_r
        for _ in range(2):
            premul = _box_blur(premul, blur_r + (extra if dx >= dy else 0), axis=1)
            premul = _box_blur(premul, blur_r + (extra if dy > dx else 0), axis=0)
        alpha = premul[..., 3]
        rgb = premul[..., :3] / np.maximum(alpha, 1e-4)[..., None]
    a = alpha[..., None]
    region[...] = region * (1 - a) + rgb * a
    if mode == "occluder":
        _draw_occluder(frame, track, t)


def _draw_occluder(frame: np.ndarray, track: Track, t: int) -> None:
    vertical, bars, phase, color = track.occluder[int(track.span_start[t])]
    height, width = frame.shape[:2]
    w, h = track.w[t], track.h[t]
    cx, cy = track.cx[t], track.cy[t]
    extent, other = (w, h) if vertical else (h, w)
    centre, other_centre = (cx, cy) if vertical else (cy, cx)
    pitch = extent / bars
    bar = 0.55 * pitch  # bars cover ~55% of the object along the fence
    for i in range(bars):
        a = centre - extent / 2 + (i + phase) * pitch - bar / 2
        lo, hi = int(round(a)), int(round(a + bar))
        olo, ohi = int(round(other_centre - 0.8 * other)), int(round(other_centre + 0.8 * other))
        if vertical:
            frame[max(olo, 0) : max(min(ohi, height), 0), max(lo, 0) : max(min(hi, width), 0)] = color
        else:
            frame[max(lo, 0) : max(min(hi, height), 0), max(olo, 0) : max(min(ohi, width), 0)] = color


def render_frame(scene: Scene, t: int) -> np.ndarray:
    """Frame ``t`` of ``scene`` as uint8 [H, W, 3]."""
    px, py = scene.pan[t]
    frame = scene.background[py : py + scene.height, px : px + scene.width].copy()
    for track in scene.tracks:
        if track.present[t]:
            draw_track(frame, track, t)
    frame += scene.noise[t % len(scene.noise)]
    return (np.clip(frame, 0, 1) * 255 + 0.5).astype(np.uint8)


def flat_clip(frames: int, width: int = 160, height: int = 120) -> list[np.ndarray]:
    """Frames with large uniform areas, where many anchors and proposals score exactly alike
    (docs/conventions.md#ties): a grey background between 16-pixel black letterbox bars, a red and a green
    flat rectangle moving. HxWx3 uint8."""
    clip = []
    for t in range(frames):
        frame = np.full((height, width, 3), 90, np.uint8)
        frame[:, :16] = 0
        frame[:, -16:] = 0
        frame[30:60, 40 + t:80 + t] = (200, 40, 40)
        frame[70:100, 90:130 - t // 3] = (40, 200, 60)
        clip.append(frame)
    return clip
