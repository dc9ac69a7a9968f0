"""Synthetic AP knee radiographs: the offline default dataset and the test fixture (a demo, not medical data).

Anatomy is drawn from implicit shapes (signed distances) in an anatomical frame: u points to the
lateral side, v downwards, the joint line is at v = 0 and the femoral condyles span about 0.6
units, some 40 % of the shorter image side. Rotation, zoom, shift and mirroring are therefore only a
change of coordinates, and the trabecular texture is band-passed noise (FFT), so rendering is fully
vectorised.

The label acts through a single per-image bone mineral density (BMD) that sets bone brightness,
cortical thickness and trabecular density and thickness. Every nuisance parameter (size, aspect,
colour mode, exposure, pose, noise level, JPEG quality) is drawn before the BMD, from a generator
state that does not depend on the label, so no nuisance can act as a shortcut to the class.
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from kneexray import DEFAULT_CLASSES
from kneexray.atomic import atomic_path, copy_into_zip, stable_zip_entry
from kneexray.errors import InputError

log = logging.getLogger(__name__)

INNER_ZIP = "Knee-X-ray.zip"
INNER_ROOT = "Knee-X-ray"
PREFIXES = {"normal": "N", "osteopenia": "OP", "osteoporosis": "OS"}  # as published; other classes: "<name>_"


def bmd_centre(label: str, classes: Sequence[str]) -> float:
    """The class's centre on the BMD axis: the classes evenly spaced from 0.9 (the first, densest)
    down to 0.1 (the last), so normal / osteopenia / osteoporosis sit at 0.9, 0.5, 0.1."""
    if label not in classes:
        raise InputError(f"label must be one of {', '.join(classes)}, got {label!r}")
    return 0.9 - 0.8 * list(classes).index(label) / (len(classes) - 1)


@dataclass(frozen=True)
class _Nuisance:
    """Everything about one image except its class: patient build, positioning, exposure, file format."""

    width: int
    height: int
    rgb: bool
    # patient
    bone_size: float
    tissue: float  # soft-tissue half width at the joint
    tissue_taper: float  # how much wider the thigh is than the calf
    tissue_offset: float  # bones are not centred in the soft tissue
    joint_gap: float  # extra joint space width
    femur_tilt: float  # radians; femur and tibia tilt apart in varus / valgus knees
    tibia_tilt: float
    # positioning
    angle: float  # radians
    zoom: float
    shift: tuple[float, float]
    mirror: bool
    collimation: tuple[float, float, float, float] | None  # left, right, top, bottom insets, fractions of the side
    # exposure and detector
    photons: float  # photon count per pixel at full transmission: sets the quantum noise
    heel: float  # exposure gradient across the field (anode heel effect)
    heel_direction: float  # radians
    fog: float  # grey level of the unattenuated background
    shutter: float  # grey level of the collimated-off border
    window: float  # attenuation mapped to white; lower = brighter, more saturated bone
    gamma: float
    read_noise: float  # Gaussian detector noise, in grey levels of [0, 1]


def _draw_nuisance(rng: np.random.Generator, size: int) -> _Nuisance:
    width, height = (round(size * s) for s in rng.uniform(0.8, 1.25, size=2))
    insets = rng.uniform(0.02, 0.12, size=4)
    collimated = rng.random() < 0.5
    return _Nuisance(
        width=width,
        height=height,
        rgb=bool(rng.random() < 0.5),
        bone_size=float(rng.uniform(0.9, 1.1)),
        tissue=float(rng.uniform(0.45, 0.65)),
        tissue_taper=float(rng.uniform(0.0, 0.15)),
        tissue_offset=float(rng.uniform(-0.08, 0.08)),
        joint_gap=float(rng.uniform(-0.015, 0.02)),
        femur_tilt=math.radians(rng.uniform(-4, 4)),
        tibia_tilt=math.radians(rng.uniform(-4, 4)),
        angle=math.radians(rng.uniform(-10, 10)),
        zoom=float(rng.uniform(0.8, 1.25)),
        shift=(float(rng.uniform(-0.18, 0.18)), float(rng.uniform(-0.2, 0.2))),
        mirror=bool(rng.random() < 0.5),
        collimation=(float(insets[0]), float(insets[1]), float(insets[2]), float(insets[3])) if collimated else None,
        photons=float(np.exp(rng.uniform(np.log(300), np.log(3000)))),
        heel=float(rng.uniform(0.0, 0.2)),
        heel_direction=float(rng.uniform(-math.pi, math.pi)),
        fog=float(rng.uniform(0.02, 0.08)),
        shutter=float(rng.uniform(0.55, 0.95)),
        window=float(rng.uniform(2.15, 2.45)),
        gamma=float(rng.uniform(0.92, 1.08)),
        read_noise=float(rng.uniform(0.005, 0.025)),
    )


def _draw_bmd(rng: np.random.Generator, centre: float, difficulty: float) -> float:
    # Linear in difficulty: classes several standard deviations apart at 0, the same distribution at 1.
    centre = 0.5 + (centre - 0.5) * (1.0 - difficulty)
    spread = 0.03 + 0.08 * difficulty
    return float(np.clip(rng.normal(centre, spread), 0.0, 1.0))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Union of two shapes with a fillet of radius about k (polynomial smooth minimum)."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * k / 4


def _ellipse(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    # Approximate signed distance; exact enough for the few-pixel edges drawn here.
    return (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * min(a, b)


def _rotate(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    cos, sin = math.cos(angle), math.sin(angle)
    return cos * u + sin * v, cos * v - sin * u


def _femur(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    half_width = 0.15 + 0.15 * _sigmoid((v + 0.40) / 0.06)  # shaft flaring into the metaphysis
    shaft = np.maximum(np.abs(u) - half_width, v + 0.16)
    medial = _ellipse(u + 0.155, v + 0.125, 0.165, 0.13)  # the medial condyle reaches lower
    lateral = _ellipse(u - 0.16, v + 0.14, 0.15, 0.115)
    bone = _smin(shaft, np.minimum(medial, lateral), 0.06)
    notch = _ellipse(u, v + 0.02, 0.05, 0.085)  # intercondylar notch
    return np.maximum(bone, -notch)


def _tibia(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    half_width = 0.14 + 0.19 * _sigmoid(-(v - 0.25) / 0.08)  # plateau tapering to the shaft
    au = np.abs(u)
    # Slightly concave compartments with the tibial spines rising into the notch.
    top = 0.05 + 0.012 * np.exp(-(((au - 0.17) / 0.09) ** 2)) - 0.045 * np.exp(-(((au - 0.03) / 0.022) ** 2))
    return -_smin(half_width - au, v - top, 0.07)


def _fibula(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # The head sits just below the plateau, half hidden behind the lateral tibial condyle.
    head = _ellipse(u - 0.3, v - 0.2, 0.07, 0.06)
    shaft = np.maximum(np.abs(u - 0.29 + 0.05 * (v - 0.2)) - 0.033, 0.2 - v)
    return _smin(head, shaft, 0.06)


def _band_noise(
    spectrum: np.ndarray,
    radius: np.ndarray,
    phi: np.ndarray,
    *,
    freq: float,
    direction: float | None,
    shape: tuple[int, int],
) -> np.ndarray:
    """Unit-variance noise passed through a radial band around `freq`, optionally oriented."""
    response = np.exp(-0.5 * ((radius - freq) / (0.35 * freq)) ** 2)
    if direction is not None:
        response *= np.cos(phi - direction) ** 6  # keeps frequencies across the wanted line direction
    field = np.fft.irfft2(spectrum * response, s=shape)
    return field / (field.std() + 1e-12)


def _trabeculae(rng: np.random.Generator, nu: _Nuisance, scale: float, bmd: float) -> np.ndarray:
    """Trabecular network in [0, 1]: thin bright lines along the zero crossings of band-passed noise.

    Primary trabeculae run along the bone axis and secondary ones across it; low BMD thins both,
    loses the secondary ones first and cuts gaps into the network, as osteoporosis does.
    """
    shape = (nu.height, nu.width)
    spectrum = np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32))
    fy = np.fft.fftfreq(nu.height).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(nu.width).astype(np.float32)[None, :]
    radius, phi = np.hypot(fx, fy), np.arctan2(fy, fx)
    freq = min(0.35, 1.0 / (0.045 * scale))  # about 22 trabeculae per anatomical unit, below Nyquist
    # Lines along the bone axis vary across it: their frequencies point along the rotated u axis.
    primary = _band_noise(spectrum, radius, phi, freq=freq, direction=nu.angle, shape=shape)
    secondary = _band_noise(spectrum, radius, phi, freq=freq, direction=nu.angle + math.pi / 2, shape=shape)
    gaps = _band_noise(spectrum, radius, phi, freq=freq / 4, direction=None, shape=shape)
    width = 0.12 + 0.3 * bmd
    lines = np.maximum(np.exp(-((primary / width) ** 2)), bmd * np.exp(-((secondary / (0.8 * width)) ** 2)))
    return lines * _sigmoid((gaps + 2.5 * bmd - 0.6) / 0.25)


def _check_params(size: int, difficulty: float) -> None:
    if size < 32:
        raise InputError(f"size must be >= 32, got {size}")
    if not 0 <= difficulty <= 1:  # also rejects NaN
        raise InputError(f"difficulty must be in [0, 1], got {difficulty}")


def render_knee(
    rng: np.random.Generator,
    label: str,
    *,
    classes: Sequence[str] = DEFAULT_CLASSES,
    size: int = 256,
    difficulty: float = 0.5,
) -> Image.Image:
    """One synthetic AP knee radiograph of class `label` (of `classes`, densest first), mode "L" or
    "RGB", sides 0.8-1.25 x `size`."""
    centre = bmd_centre(label, classes)
    _check_params(size, difficulty)
    nu = _draw_nuisance(rng, size)
    bmd = _draw_bmd(rng, centre, difficulty)

    # Pixel centres -> anatomical (u, v): undo shift, rotation and zoom, then mirror.
    half = min(nu.width, nu.height) / 2
    scale = 1.35 * half * nu.zoom  # pixels per anatomical unit
    x = (np.arange(nu.width, dtype=np.float32) + 0.5 - nu.width / 2) / half
    y = (np.arange(nu.height, dtype=np.float32) + 0.5 - nu.height / 2) / half
    x, y = x[None, :], y[:, None]
    u, v = _rotate((x - nu.shift[0]) * half / scale, (y - nu.shift[1]) * half / scale, nu.angle)
    if nu.mirror:
        u = -u
    edge = 1.2 / scale  # a little over one pixel of edge blur

    # Soft tissue: an elliptical cross-section, a little wider at the knee and widening up the thigh.
    radius = nu.tissue + 0.06 * np.exp(-((v / 0.35) ** 2)) - nu.tissue_taper * np.clip(v, -1, 1)
    attenuation = 0.55 * np.sqrt(np.clip(1 - ((u - nu.tissue_offset) / radius) ** 2, 0, 1))

    trabeculae = _trabeculae(rng, nu, scale, bmd)
    matrix = 0.3 + 0.7 * bmd  # even osteoporotic bone stays clearly visible
    cortex_width = 0.01 + 0.03 * bmd
    # The cortex is thick along the shafts and thin at the joint surfaces.
    cortex_width = cortex_width * (0.35 + 0.65 * np.clip(np.abs(v) / 0.55, 0, 1))
    # Spongy bone fills the bone ends; the shafts are hollow tubes around the medullary canal.
    spongy = 0.35 + (0.25 + 0.4 * trabeculae) * _sigmoid((0.5 - np.abs(v)) / 0.08)
    bone_size = nu.bone_size
    uf, vf = _rotate(u / bone_size, v / bone_size, nu.femur_tilt)
    ut, vt = _rotate(u / bone_size, (v - nu.joint_gap) / bone_size, nu.tibia_tilt)
    for sdf, weight in ((_femur(uf, vf), 1.0), (_tibia(ut, vt), 1.0), (_fibula(ut, vt), 0.8)):
        sdf = sdf * bone_size  # back to anatomical units
        depth = np.maximum(-sdf, 0)
        inside = _sigmoid(-sdf / edge)
        thickness = 1 - np.exp(-depth / 0.06)  # projected path length through a rounded bone
        cortex = inside * np.exp(-depth / cortex_width)
        attenuation += weight * (matrix * inside * thickness * spongy + (0.5 + 0.5 * bmd) * cortex)
    # The patella lies in front of the femur: a faint extra shadow.
    patella = _ellipse(uf - 0.01, vf + 0.2, 0.15, 0.18) * bone_size
    attenuation += 0.25 * matrix * _sigmoid(-patella / edge) * (1 - np.exp(-np.maximum(-patella, 0) / 0.05))

    # Image formation: quantum noise on the transmitted photons, log transform, window and gamma.
    heel_x, heel_y = math.cos(nu.heel_direction), math.sin(nu.heel_direction)
    exposure = nu.photons * (1 + nu.heel * (heel_x * x + heel_y * y) / 1.5)
    counts = rng.poisson(exposure * np.exp(-attenuation))
    signal = -np.log(np.maximum(counts, 0.5) / exposure)
    grey = nu.fog + (1 - nu.fog) * np.clip(signal / nu.window, 0, 1) ** nu.gamma
    if nu.collimation:  # collimator blades leave an unexposed, uniformly bright border
        left, right, top, bottom = nu.collimation
        cols = np.arange(nu.width, dtype=np.float32)[None, :] + 0.5
        rows = np.arange(nu.height, dtype=np.float32)[:, None] + 0.5
        field = (
            _sigmoid(3 * (cols - left * nu.width))
            * _sigmoid(3 * ((1 - right) * nu.width - cols))
            * _sigmoid(3 * (rows - top * nu.height))
            * _sigmoid(3 * ((1 - bottom) * nu.height - rows))
        )
        grey = field * grey + (1 - field) * nu.shutter
    grey += rng.normal(0, nu.read_noise, size=grey.shape)
    pixels = np.round(np.clip(grey, 0, 1) * 255).astype(np.uint8)
    image = Image.fromarray(pixels)  # 2-D uint8: mode "L"
    return image.convert("RGB") if nu.rgb else image


def phantom_labels(n_images: int, class_fractions: Mapping[str, float], seed: int) -> list[str]:
    """Exactly apportioned labels (largest remainder), in an order shuffled by `seed`. The classes
    are the keys of `class_fractions`, in their order."""
    classes = list(class_fractions)
    if len(classes) < 2:
        raise InputError(f"class_fractions must name at least 2 classes, got {classes}")
    fractions = [float(class_fractions[c]) for c in classes]
    if any(not f > 0 for f in fractions):  # also rejects NaN
        raise InputError(f"class_fractions must all be > 0, got {class_fractions}")
    if abs(sum(fractions) - 1) > 1e-6:
        raise InputError(f"class_fractions must sum to 1, they sum to {sum(fractions):g}")
    if n_images < 0:
        raise InputError(f"n_images must be >= 0, got {n_images}")
    quotas = [n_images * f for f in fractions]
    counts = [math.floor(q) for q in quotas]
    # Ties go to the class listed first.
    by_remainder = sorted(range(len(classes)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: n_images - sum(counts)]:
        counts[i] += 1
    labels = np.repeat(np.array(classes), counts)
    return [str(label) for label in np.random.default_rng(seed).permutation(labels)]


def write_phantom_archive(
    path: str | os.PathLike,
    *,
    n_images: int,
    class_fractions: Mapping[str, float],
    size: int,
    difficulty: float,
    seed: int,
    progress: bool = False,
) -> dict[str, int]:
    """Write a phantom dataset packed like the published one and return the image count per class.

    Layout: an outer ZIP holding only "Knee-X-ray.zip", which holds "Knee-X-ray/<class>/<prefix><n>.jpg".
    The bytes depend only on the arguments (fixed timestamps, sorted entries, per-image seeds).
    Images are rendered in archive order and streamed to disk, so memory does not grow with n_images.
    """
    classes = list(class_fractions)
    if n_images < len(classes):
        raise InputError(f"n_images must be >= {len(classes)} (one per class), got {n_images}")
    _check_params(size, difficulty)
    labels = phantom_labels(n_images, class_fractions, seed)
    # image `index` is number k of its class; the archive lists the classes in order, then k
    order = [index for label in classes for index in range(n_images) if labels[index] == label]

    counts = dict.fromkeys(classes, 0)
    with atomic_path(path) as tmp:
        inner_path = tmp.with_name(tmp.name + ".inner")
        try:
            with zipfile.ZipFile(inner_path, "w") as inner:
                for index in tqdm(order, desc="phantom", unit="img", disable=not progress):
                    label = labels[index]
                    rng = np.random.default_rng([seed, index])
                    quality = int(rng.integers(60, 96))  # drawn before anything label-dependent, like all nuisances
                    image = render_knee(rng, label, classes=classes, size=size, difficulty=difficulty)
                    buffer = io.BytesIO()
                    image.save(buffer, format="JPEG", quality=quality)
                    counts[label] += 1
                    name = f"{INNER_ROOT}/{label}/{PREFIXES.get(label, label + '_')}{counts[label]}.jpg"
                    inner.writestr(stable_zip_entry(name), buffer.getvalue())
            with zipfile.ZipFile(tmp, "w") as archive:
                copy_into_zip(archive, INNER_ZIP, inner_path)
        finally:
            inner_path.unlink(missing_ok=True)
    log.info("wrote %d phantom images to %s: %s", n_images, path, counts)
    return counts
