"""Analytic 3D sample phantom: a metal cylinder with pores, precipitates, a temperature-driven phase and
copper fiducial spheres.

The phantom is a set of analytic features (ellipsoids and vertical elliptic cylinders, each optionally
rotated about z). Attenuation is *additive by nesting*: every inclusion lies fully inside the single
matrix cylinder and no two inclusions overlap, so

    mu(p) = mu_matrix * [p in matrix] + sum_i (mu_i - mu_matrix) * [p in inclusion i]

and a line integral is the exactly weighted sum of analytic chord lengths (:meth:`Phantom.line_integrals`).
The same holds for the refractive decrement ``delta`` (:meth:`Phantom.delta_integrals`). A phantom
without a matrix feature is an object in vacuum (weights ``mu_i``).

Frames and units follow the project contract (``beamline_sample``): micrometres, z vertical = rotation
axis, origin on the axis at the sample centre. Attenuation in 1/mm, line integrals dimensionless.

Material values (at 25 keV)
---------------------------
Mass attenuation coefficients are log-log interpolated between the NIST XCOM / Hubbell-Seltzer tabulated
values at 20 and 30 keV (cm^2/g at 25 keV: Mg 1.46, Al 1.86, Si 2.39, Fe 13.7, Cu 18.1; no absorption
edge lies between 20 and 30 keV for these elements) and mixed by mass fraction:

=============  ==========================  ========  =========  =========  ============
key            material                    rho g/cc  mu 1/mm    delta      SEM contrast
=============  ==========================  ========  =========  =========  ============
matrix         AlSi10Mg (alpha-Al + Si)    2.67      0.511      8.6e-7     0.40
pore           gas pore                    0         0          0          0.04
precipitate    beta-Al5FeSi intermetallic  3.35      1.65       1.07e-6    0.70
phase          Si precipitates             2.33      0.557      7.7e-7     0.28
fiducial       Cu microsphere              8.96      16.2       2.7e-6     0.95
vacuum         outside the sample          0         0          0          0.06
=============  ==========================  ========  =========  =========  ============

``delta`` is computed from the electron density, ``delta = r_e lambda^2 n_e / (2 pi)``
(:func:`refractive_decrement`). The SEM contrast is a backscatter-like yield scaled to [0, 1]: it follows
the mean atomic number, not the density, so the ordering differs from X-rays: Si (Z=14, rho 2.33)
attenuates X-rays slightly *more* than the Al matrix but is imaged *darker* in the SEM (as Si particles
commonly appear in backscatter micrographs of polished Al-Si alloys: Z differs by one, and relief and
channelling dominate). A 48 um Cu fiducial transmits exp(-16.2 * 0.048) = 46 %, far from photon starvation.

Temperature
-----------
The layout is drawn once per seed at the *largest* sizes (900 K) with margins, so features never overlap
and stay inside the matrix at every temperature; temperature only scales sizes:

* pores grow linearly above :data:`PORE_GROWTH_ONSET_K` (hydrogen pore growth in additively
  manufactured AlSi10Mg), radius factor ``1 + PORE_GROWTH_PER_K * (T - 400 K)``, 2x at 900 K;
* Si ``phase`` particles exist only above :data:`PHASE_ONSET_K` and grow as
  ``sqrt((T - 550 K) / 350 K)`` of their final radius (diffusion-limited growth);
* sizes are clamped at :data:`MAX_MODEL_TEMPERATURE_K` (the alloy would melt above it anyway).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "KINDS",
    "MATERIALS",
    "MAX_MODEL_TEMPERATURE_K",
    "PHASE_ONSET_K",
    "PORE_GROWTH_ONSET_K",
    "PORE_GROWTH_PER_K",
    "SHAPES",
    "Feature",
    "Material",
    "Phantom",
    "make_phantom",
    "phase_radius_fraction",
    "pore_growth_factor",
    "refractive_decrement",
]

# Classical electron radius (m), Avogadro's number (1/mol), hc (keV * m).
_R_E_M = 2.8179403262e-15
_N_A = 6.02214076e23
_HC_KEV_M = 1.23984198e-9

PORE_GROWTH_ONSET_K = 400.0
PORE_GROWTH_PER_K = 0.002  # relative radius growth per kelvin above the onset
PHASE_ONSET_K = 550.0
MAX_MODEL_TEMPERATURE_K = 900.0

KINDS = ("matrix", "pore", "precipitate", "phase", "fiducial")
SHAPES = ("ellipsoid", "cylinder")
_MATERIAL_CODES = ("vacuum", "matrix", "pore", "precipitate", "phase", "fiducial")


def refractive_decrement(*, density_g_cm3: float, z_over_a: float, energy_keV: float) -> float:
    """X-ray refractive index decrement ``delta = r_e * lambda^2 * n_e / (2 pi)`` far from edges.

    Parameters
    ----------
    density_g_cm3
        Mass density (g/cm^3).
    z_over_a
        Mass-fraction-weighted ratio of atomic number to atomic mass (mol/g).
    energy_keV
        Photon energy (keV).
    """
    if energy_keV <= 0:
        raise ValueError(f"energy_keV must be positive, got {energy_keV}")
    wavelength_m = _HC_KEV_M / energy_keV
    electrons_per_m3 = density_g_cm3 * 1e6 * _N_A * z_over_a
    return float(_R_E_M * wavelength_m**2 * electrons_per_m3 / (2.0 * math.pi))


@dataclass(frozen=True)
class Material:
    """A material's response to each probe.

    Attributes
    ----------
    name
        Human-readable material name.
    mu_per_mm
        Linear X-ray attenuation coefficient at 25 keV (1/mm).
    delta
        Refractive index decrement at 25 keV (dimensionless).
    sem_contrast
        Backscatter-like SEM signal, in [0, 1].
    """

    name: str
    mu_per_mm: float
    delta: float
    sem_contrast: float


_E_REF_KEV = 25.0
MATERIALS: Mapping[str, Material] = MappingProxyType(
    {
        "vacuum": Material("vacuum / embedding", 0.0, 0.0, 0.06),
        # AlSi10Mg: 89.7 Al, 10 Si, 0.3 Mg wt%; mu/rho = 0.897*1.86 + 0.10*2.39 + 0.003*1.46 = 1.913 cm^2/g.
        "matrix": Material(
            "AlSi10Mg", 0.511, refractive_decrement(density_g_cm3=2.67, z_over_a=0.4836, energy_keV=_E_REF_KEV), 0.40
        ),
        "pore": Material("gas pore", 0.0, 0.0, 0.04),
        # beta-Al5FeSi: 61.7 Al, 25.5 Fe, 12.8 Si wt%; mu/rho = 4.94 cm^2/g.
        "precipitate": Material(
            "beta-Al5FeSi", 1.65, refractive_decrement(density_g_cm3=3.35, z_over_a=0.4798, energy_keV=_E_REF_KEV), 0.70
        ),
        # Si: mu/rho = 2.39 cm^2/g.
        "phase": Material(
            "Si", 0.557, refractive_decrement(density_g_cm3=2.33, z_over_a=0.4984, energy_keV=_E_REF_KEV), 0.28
        ),
        # Cu: mu/rho = 18.1 cm^2/g.
        "fiducial": Material(
            "Cu", 16.2, refractive_decrement(density_g_cm3=8.96, z_over_a=0.4563, energy_keV=_E_REF_KEV), 0.95
        ),
    }
)


@dataclass(frozen=True)
class Feature:
    """One analytic feature in the sample frame.

    Attributes
    ----------
    kind
        One of :data:`KINDS`.
    material
        Key of :data:`MATERIALS`.
    center_um
        Centre ``(x, y, z)`` in ``beamline_sample`` (um).
    semi_axes_um
        ``(a, b, c)`` (um): ``a`` along the feature's rotated x axis, ``b`` along its rotated y axis, ``c``
        vertical (for a cylinder, ``c`` is its half height).
    rotation_deg
        Counter-clockwise rotation about +z of the ``(a, b)`` axes (deg).
    shape
        ``"ellipsoid"`` or ``"cylinder"`` (vertical axis, elliptic cross-section).
    """

    kind: str
    material: str
    center_um: tuple[float, float, float]
    semi_axes_um: tuple[float, float, float]
    rotation_deg: float = 0.0
    shape: str = "ellipsoid"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.material not in MATERIALS:
            raise ValueError(f"material must be one of {tuple(MATERIALS)}, got {self.material!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        center = tuple(float(v) for v in self.center_um)
        axes = tuple(float(v) for v in self.semi_axes_um)
        if len(center) != 3 or not all(math.isfinite(v) for v in center):
            raise ValueError(f"center_um must be 3 finite numbers, got {self.center_um!r}")
        if len(axes) != 3 or not all(math.isfinite(v) and v > 0 for v in axes):
            raise ValueError(f"semi_axes_um must be 3 positive numbers, got {self.semi_axes_um!r}")
        if not math.isfinite(self.rotation_deg):
            raise ValueError(f"rotation_deg must be finite, got {self.rotation_deg!r}")
        object.__setattr__(self, "center_um", center)
        object.__setattr__(self, "semi_axes_um", axes)

    @property
    def bounding_radius_um(self) -> float:
        """Radius of a sphere about the centre that contains the feature (um)."""
        a, b, c = self.semi_axes_um
        if self.shape == "cylinder":
            return math.hypot(max(a, b), c)
        return max(a, b, c)

    def contains(self, points_um: ArrayLike) -> NDArray[np.bool_]:
        """Whether points ``(..., 3)`` (um, sample frame) lie inside (boundary included); shape ``(...)``."""
        p = np.asarray(points_um, dtype=np.float64)
        return _inside(self, p[..., 0], p[..., 1], p[..., 2])


def _inside(feature: Feature, x: NDArray, y: NDArray, z: NDArray) -> NDArray[np.bool_]:
    cx, cy, cz = feature.center_um
    a, b, c = feature.semi_axes_um
    cos, sin = math.cos(math.radians(feature.rotation_deg)), math.sin(math.radians(feature.rotation_deg))
    dx, dy = x - cx, y - cy
    # Express the offset in the feature's own axes (rotate by -rotation_deg).
    xl = (cos * dx + sin * dy) / a
    yl = (-sin * dx + cos * dy) / b
    zl = (z - cz) / c
    if feature.shape == "cylinder":
        return (xl * xl + yl * yl <= 1.0) & (np.abs(zl) <= 1.0)
    return xl * xl + yl * yl + zl * zl <= 1.0


def _as_points(points_um: ArrayLike, name: str = "points_um") -> NDArray[np.float64]:
    p = np.asarray(points_um, dtype=np.float64)
    if p.ndim == 0 or p.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (..., 3) as (x, y, z) in um, got shape {p.shape}")
    return p


@dataclass(frozen=True)
class Phantom:
    """A sample at one temperature: analytic features, additive by nesting (see the module docstring).

    Attributes
    ----------
    features
        The matrix (at most one, first in evaluation order) and non-overlapping inclusions inside it.
    temperature_K
        Temperature the feature sizes correspond to (K).
    """

    features: tuple[Feature, ...]
    temperature_K: float
    _weights: dict = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        features = tuple(self.features)
        object.__setattr__(self, "features", features)
        if not all(isinstance(f, Feature) for f in features):
            raise ValueError("features must all be Feature instances")
        if not math.isfinite(self.temperature_K) or self.temperature_K <= 0:
            raise ValueError(f"temperature_K must be a positive finite number, got {self.temperature_K}")
        matrices = [f for f in features if f.kind == "matrix"]
        if len(matrices) > 1:
            raise ValueError(f"features may hold at most one matrix feature, got {len(matrices)}")
        host_mu = MATERIALS[matrices[0].material].mu_per_mm if matrices else 0.0
        host_delta = MATERIALS[matrices[0].material].delta if matrices else 0.0
        host_sem = MATERIALS[matrices[0].material].sem_contrast if matrices else MATERIALS["vacuum"].sem_contrast
        mu, delta, sem = [], [], []
        for f in features:
            m = MATERIALS[f.material]
            if f.kind == "matrix":
                mu.append(m.mu_per_mm)
                delta.append(m.delta)
                sem.append(m.sem_contrast - MATERIALS["vacuum"].sem_contrast)
            else:
                mu.append(m.mu_per_mm - host_mu)
                delta.append(m.delta - host_delta)
                sem.append(m.sem_contrast - host_sem)
        object.__setattr__(
            self,
            "_weights",
            {"mu": np.array(mu), "delta": np.array(delta), "sem": np.array(sem)},
        )
        self._check_nesting(matrices[0] if matrices else None)

    def _check_nesting(self, matrix: Feature | None) -> None:
        """The additive model is only exact if inclusions are inside the matrix and disjoint."""
        inclusions = [f for f in self.features if f.kind != "matrix"]
        if matrix is not None:
            circular = matrix.semi_axes_um[0] == matrix.semi_axes_um[1]
            if matrix.shape != "cylinder" or matrix.rotation_deg % 360.0 != 0 or not circular:
                # Containment below is checked for a circular vertical cylinder only.
                raise ValueError("the matrix feature must be an unrotated circular vertical cylinder")
            mx, my, mz = matrix.center_um
            radius, _, half_height = matrix.semi_axes_um
            for f in inclusions:
                a, b, c = f.semi_axes_um
                rho = math.hypot(f.center_um[0] - mx, f.center_um[1] - my)
                if rho + max(a, b) > radius or abs(f.center_um[2] - mz) + c > half_height:
                    raise ValueError(f"inclusion {f} is not fully inside the matrix cylinder")
        if len(inclusions) > 1:
            centers = np.array([f.center_um for f in inclusions])
            radii = np.array([f.bounding_radius_um for f in inclusions])
            dist = np.linalg.norm(centers[:, None, :] - centers[None, :, :], axis=-1)
            clash = dist < radii[:, None] + radii[None, :]
            np.fill_diagonal(clash, False)
            for i, j in zip(*np.nonzero(np.triu(clash)), strict=True):
                if _may_overlap(inclusions[i], inclusions[j]):
                    raise ValueError(f"inclusions overlap: {inclusions[i]} and {inclusions[j]}")

    # -- point evaluation ---------------------------------------------------------------------
    def _field_at(self, points_um: ArrayLike, key: str, base: float) -> NDArray[np.float32]:
        p = _as_points(points_um)
        out = np.full(p.shape[:-1], base, dtype=np.float64)
        if p.size == 0:
            return out.astype(np.float32)
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        lo, hi = p.reshape(-1, 3).min(axis=0), p.reshape(-1, 3).max(axis=0)
        for f, w in zip(self.features, self._weights[key], strict=True):
            # Skip features whose bounding box misses the points' bounding box (e.g. a section plane).
            r, c = f.bounding_radius_um, np.array(f.center_um)
            if w == 0.0 or np.any(c + r < lo) or np.any(c - r > hi):
                continue
            out += w * _inside(f, x, y, z)
        return out.astype(np.float32)

    def attenuation_at(self, points_um: ArrayLike) -> NDArray[np.float32]:
        """Linear attenuation ``mu`` (1/mm) at points ``(..., 3)`` (um); returns shape ``(...)``, float32."""
        return self._field_at(points_um, "mu", 0.0)

    def delta_at(self, points_um: ArrayLike) -> NDArray[np.float32]:
        """Refractive decrement ``delta`` at points ``(..., 3)`` (um); returns shape ``(...)``, float32."""
        return self._field_at(points_um, "delta", 0.0)

    def sem_contrast_at(self, points_um: ArrayLike) -> NDArray[np.float32]:
        """Backscatter-like SEM signal in [0, 1] at points ``(..., 3)`` (um); shape ``(...)``, float32."""
        out = self._field_at(points_um, "sem", MATERIALS["vacuum"].sem_contrast)
        return np.clip(out, 0.0, 1.0, out=out)

    def material_at(self, points_um: ArrayLike) -> NDArray[np.int8]:
        """Integer material code at points ``(..., 3)`` (um); shape ``(...)``, int8.

        Codes index :data:`MATERIAL_CODES`: 0 vacuum, 1 matrix, 2 pore, 3 precipitate, 4 phase, 5 fiducial.
        (Codes are by feature *kind*; ``Feature.material`` names the :data:`MATERIALS` entry.)
        """
        p = _as_points(points_um)
        out = np.zeros(p.shape[:-1], dtype=np.int8)
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        # The matrix first, inclusions after: later (nested) features overwrite the host.
        for f in sorted(self.features, key=lambda f: f.kind != "matrix"):
            out[_inside(f, x, y, z)] = _MATERIAL_CODES.index(f.kind)
        return out

    # -- voxels -------------------------------------------------------------------------------
    def voxelize(
        self,
        *,
        shape_zyx: tuple[int, int, int],
        voxel_size_um: float,
        z_offset_um: float = 0.0,
        supersample: int = 2,
        quantity: str = "mu",
    ) -> NDArray[np.float32]:
        """Voxel-averaged attenuation on the reconstruction grid.

        Parameters
        ----------
        shape_zyx
            ``(nz, ny, nx)``. Voxel ``[k, iy, ix]`` is centred at ``x = (ix - (nx-1)/2) * v``,
            ``y = (iy - (ny-1)/2) * v``, ``z = (k - (nz-1)/2) * v + z_offset_um``.
        voxel_size_um
            Voxel edge ``v`` (um).
        z_offset_um
            Height of the volume centre in the sample frame (um).
        supersample
            Sub-samples per voxel edge; each voxel is the mean of ``supersample**3`` point values.
        quantity
            ``"mu"`` (1/mm, default) or ``"delta"``.

        Returns
        -------
        ndarray, shape (nz, ny, nx), float32
        """
        shape = tuple(int(n) for n in shape_zyx)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape_zyx must be 3 positive integers, got {shape_zyx!r}")
        if not voxel_size_um > 0:
            raise ValueError(f"voxel_size_um must be positive, got {voxel_size_um}")
        if int(supersample) != supersample or supersample < 1:
            raise ValueError(f"supersample must be a positive integer, got {supersample}")
        if quantity not in ("mu", "delta"):
            raise ValueError(f"quantity must be 'mu' or 'delta', got {quantity!r}")
        s = int(supersample)
        nz, ny, nx = shape
        v = float(voxel_size_um)
        sub = ((np.arange(s) + 0.5) / s - 0.5) * v
        xs = ((np.arange(nx)[:, None] - (nx - 1) / 2) * v + sub[None, :]).ravel()
        ys = ((np.arange(ny)[:, None] - (ny - 1) / 2) * v + sub[None, :]).ravel()
        zc = (np.arange(nz) - (nz - 1) / 2) * v + z_offset_um
        out = np.zeros(shape, dtype=np.float32)
        weights = self._weights[quantity]
        for k in range(nz):
            zs = zc[k] + sub
            slab = np.zeros((s, ny * s, nx * s), dtype=np.float64)
            for f, w in zip(self.features, weights, strict=True):
                if w == 0.0:
                    continue
                # Only evaluate inside the feature's bounding box (features are small against the grid).
                r = f.bounding_radius_um
                cx, cy, cz = f.center_um
                if zs[-1] < cz - r or zs[0] > cz + r:
                    continue
                ix0, ix1 = np.searchsorted(xs, [cx - r, cx + r])
                iy0, iy1 = np.searchsorted(ys, [cy - r, cy + r])
                iz0, iz1 = np.searchsorted(zs, [cz - r, cz + r])
                if ix0 >= ix1 or iy0 >= iy1 or iz0 >= iz1:
                    continue
                zz, yy, xx = np.meshgrid(zs[iz0:iz1], ys[iy0:iy1], xs[ix0:ix1], indexing="ij")
                slab[iz0:iz1, iy0:iy1, ix0:ix1] += w * _inside(f, xx, yy, zz)
            out[k] = slab.reshape(s, ny, s, nx, s).mean(axis=(0, 2, 4))
        return out

    # -- projections ----------------------------------------------------------------------------
    def _projected(self, key: str, angle_deg: float, u_um: ArrayLike, z_um: ArrayLike) -> NDArray[np.float64]:
        """Sum of ``weight * chord length (um)`` over features for lab rays; shape ``(len(z), len(u))``."""
        if not math.isfinite(angle_deg):
            raise ValueError(f"angle_deg must be finite, got {angle_deg}")
        u = np.asarray(u_um, dtype=np.float64).ravel()
        z = np.asarray(z_um, dtype=np.float64).ravel()
        out = np.zeros((z.size, u.size), dtype=np.float64)
        theta = math.radians(angle_deg)
        # Sample-frame ray for detector coordinate u: o(u) + t d, o = u (cos, -sin), d = (sin, cos).
        d = np.array([math.sin(theta), math.cos(theta)])
        o_dir = np.array([math.cos(theta), -math.sin(theta)])
        for f, w in zip(self.features, self._weights[key], strict=True):
            if w == 0.0:
                continue
            chord = _chord_lengths_um(f, d, o_dir, u, z)
            if chord is not None:
                iz, iu, c = chord
                out[iz, iu] += w * c
        return out

    def line_integrals(self, *, angle_deg: float, u_um: ArrayLike, z_um: ArrayLike) -> NDArray[np.float32]:
        """Exact ``integral mu dt`` (dimensionless) along lab rays with the sample at ``angle_deg``.

        The ray for detector coordinate ``u`` (um from the rotation axis) at sample height ``z`` (um) is
        ``x = u cos(theta) + t sin(theta), y = -u sin(theta) + t cos(theta)`` in the sample frame (the
        project's sinogram convention). Computed from analytic chord lengths, not voxels.

        Parameters
        ----------
        angle_deg
            Rotation stage angle (deg).
        u_um, z_um
            1-D arrays of detector coordinates and sample heights (um).

        Returns
        -------
        ndarray, shape (len(z_um), len(u_um)), float32
        """
        # Weights are in 1/mm and chords in um.
        return (self._projected("mu", angle_deg, u_um, z_um) * 1e-3).astype(np.float32)

    def delta_integrals(self, *, angle_deg: float, u_um: ArrayLike, z_um: ArrayLike) -> NDArray[np.float64]:
        """``integral delta dt`` (um) along the same rays as :meth:`line_integrals`.

        The projected phase of the exit wave is ``-2 pi / lambda * delta_integrals``.

        Returns
        -------
        ndarray, shape (len(z_um), len(u_um)), float64 (phases need the precision)
        """
        return self._projected("delta", angle_deg, u_um, z_um)

    # -- bookkeeping ----------------------------------------------------------------------------
    def features_of_kind(self, kind: str) -> tuple[Feature, ...]:
        """The features of one kind (one of :data:`KINDS`), in phantom order."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return tuple(f for f in self.features if f.kind == kind)

    def fiducial_centers_um(self) -> NDArray[np.float64]:
        """Centres of the fiducial spheres, shape ``(n, 3)`` as ``(x, y, z)`` (um), float64."""
        centers = [f.center_um for f in self.features_of_kind("fiducial")]
        return np.array(centers, dtype=np.float64).reshape(-1, 3)


MATERIAL_CODES: tuple[str, ...] = _MATERIAL_CODES


def _chord_lengths_um(
    f: Feature, d: NDArray, o_dir: NDArray, u: NDArray, z: NDArray
) -> tuple[NDArray, NDArray, NDArray] | None:
    """Chord lengths of the rays ``o_dir * u + t d`` (at heights z) through feature ``f``.

    At height z the feature's cross-section is an ellipse with semi-axes ``(a s, b s)``, where
    ``s^2 = 1 - ((z - cz)/c)^2`` for an ellipsoid and ``1`` inside a cylinder's height. In the ellipse's
    unit-circle coordinates the ray is ``Q0 + t E0`` and the chord is
    ``2 sqrt(|E0|^2 s^2 - (E0 x Q0)^2) / |E0|^2`` (from the quadratic's discriminant).

    Returns ``(iz, iu, chord)`` index grids and chords for the rows/columns the feature can touch, or None.
    """
    cx, cy, cz = f.center_um
    a, b, c = f.semi_axes_um
    dz = z - cz
    rows = np.nonzero(np.abs(dz) <= c)[0]
    if rows.size == 0:
        return None
    # Columns whose ray passes within the bounding circle of the cross-section.
    u0 = cx * o_dir[0] + cy * o_dir[1]  # the u of the ray through the feature centre
    r_xy = max(a, b)
    cols = np.nonzero(np.abs(u - u0) <= r_xy)[0]
    if cols.size == 0:
        return None
    phi = math.radians(f.rotation_deg)
    cos, sin = math.cos(phi), math.sin(phi)
    e0 = np.array([(cos * d[0] + sin * d[1]) / a, (-sin * d[0] + cos * d[1]) / b])
    uu = u[cols]
    ox, oy = o_dir[0] * uu - cx, o_dir[1] * uu - cy
    qx = (cos * ox + sin * oy) / a
    qy = (-sin * ox + cos * oy) / b
    cross = e0[0] * qy - e0[1] * qx  # shape (ncols,)
    a0 = float(e0 @ e0)
    if f.shape == "cylinder":
        s2 = np.ones(rows.size)
    else:
        s2 = 1.0 - (dz[rows] / c) ** 2
    disc = a0 * s2[:, None] - cross[None, :] ** 2
    chord = 2.0 * np.sqrt(np.maximum(disc, 0.0)) / a0
    return rows[:, None], cols[None, :], chord


def _may_overlap(f: Feature, g: Feature) -> bool:
    """Whether two features whose bounding spheres intersect actually overlap (sampled test).

    Surface points of each feature (576 per ellipsoid) are tested against the other, plus the bigger one's
    centre; a touching contact thinner than the sampling can slip through, so :func:`make_phantom` keeps
    bounding spheres apart instead and never relies on this test.
    """
    small, big = (f, g) if f.bounding_radius_um <= g.bounding_radius_um else (g, f)
    pts = _surface_points(small, 24)
    if big.contains(pts).any() or small.contains(np.array(big.center_um)).any():
        return True
    pts_big = _surface_points(big, 24)
    return bool(small.contains(pts_big).any())


@functools.lru_cache(maxsize=None)
def _unit_sphere_points(n: int) -> NDArray[np.float64]:
    # Fibonacci sphere: near-uniform directions.
    i = np.arange(n * n) + 0.5
    polar = np.arccos(1 - 2 * i / (n * n))
    azim = np.pi * (1 + 5**0.5) * i
    return np.stack([np.sin(polar) * np.cos(azim), np.sin(polar) * np.sin(azim), np.cos(polar)], axis=-1)


def _surface_points(f: Feature, n: int) -> NDArray[np.float64]:
    a, b, c = f.semi_axes_um
    if f.shape == "cylinder":
        t = np.linspace(0, 2 * np.pi, 4 * n, endpoint=False)
        h = np.linspace(-1, 1, n)
        tt, hh = np.meshgrid(t, h)
        local = np.stack([a * np.cos(tt).ravel(), b * np.sin(tt).ravel(), c * hh.ravel()], axis=-1)
    else:
        local = _unit_sphere_points(n) * np.array([a, b, c])
    phi = math.radians(f.rotation_deg)
    rot = np.array([[math.cos(phi), -math.sin(phi), 0], [math.sin(phi), math.cos(phi), 0], [0, 0, 1]])
    return local @ rot.T + np.array(f.center_um)


# -- temperature model ---------------------------------------------------------------------------
def pore_growth_factor(temperature_K: float) -> float:
    """Pore radius relative to room temperature: 1 below 400 K, linear above, clamped at 900 K."""
    t = min(float(temperature_K), MAX_MODEL_TEMPERATURE_K)
    return 1.0 + PORE_GROWTH_PER_K * max(0.0, t - PORE_GROWTH_ONSET_K)


def phase_radius_fraction(temperature_K: float) -> float:
    """Phase particle radius as a fraction of its 900 K radius: 0 at or below 550 K, sqrt growth above."""
    t = min(float(temperature_K), MAX_MODEL_TEMPERATURE_K)
    if t <= PHASE_ONSET_K:
        return 0.0
    return math.sqrt((t - PHASE_ONSET_K) / (MAX_MODEL_TEMPERATURE_K - PHASE_ONSET_K))


# -- layout -----------------------------------------------------------------------------------------
_N_FIDUCIALS = 7
_N_PRECIPITATES = 16
_N_PORES = 20
_N_PHASE = 14
_MARGIN_UM = 4.0  # gap kept between bounding spheres, and between them and the matrix surface
_FIDUCIAL_MAX_RADIUS_UM = 280.0  # fiducials stay inside the microscope field of view


@dataclass(frozen=True)
class _Site:
    kind: str
    center_um: tuple[float, float, float]
    semi_axes_um: tuple[float, float, float]  # at room temperature (pores) or at 900 K (phase)
    rotation_deg: float
    shape: str


@functools.lru_cache(maxsize=32)
def _layout(seed: int, diameter_um: float, height_um: float, section_z_um: float) -> tuple[_Site, ...]:
    """Draw every feature once, at its largest (900 K) size, rejecting any that would touch another."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 20240917]))
    radius, half_h = diameter_um / 2.0, height_um / 2.0
    sites: list[_Site] = []
    placed_c: list[NDArray] = []
    placed_r: list[float] = []

    def free(center: NDArray, r_max: float) -> bool:
        if math.hypot(center[0], center[1]) + r_max + _MARGIN_UM > radius:
            return False
        if abs(center[2]) + r_max + _MARGIN_UM > half_h:
            return False
        if placed_c:
            dist = np.linalg.norm(np.array(placed_c) - center, axis=1)
            if np.any(dist < np.array(placed_r) + r_max + _MARGIN_UM):
                return False
        return True

    def add(site: _Site, r_max: float) -> None:
        sites.append(site)
        placed_c.append(np.array(site.center_um))
        placed_r.append(r_max)

    # Fiducials: on the section plane, within 280 um of the axis, pairwise distances all distinct so the
    # layout has no symmetry and correspondences are unambiguous.
    fid_limit = min(_FIDUCIAL_MAX_RADIUS_UM, radius - _MARGIN_UM)
    for _ in range(2000):
        trial_c: list[NDArray] = []
        trial_r: list[float] = []
        for _i in range(_N_FIDUCIALS):
            for _attempt in range(500):
                r = float(rng.uniform(16.0, 24.0))
                rho = float(np.sqrt(rng.uniform((0.25 * fid_limit) ** 2, (fid_limit - r) ** 2)))
                ang = float(rng.uniform(0, 2 * np.pi))
                c = np.array([rho * np.cos(ang), rho * np.sin(ang), section_z_um])
                if all(np.linalg.norm(c - q) > r + rq + 60.0 for q, rq in zip(trial_c, trial_r, strict=True)):
                    trial_c.append(c)
                    trial_r.append(r)
                    break
        if len(trial_c) < _N_FIDUCIALS:
            continue
        pts = np.array(trial_c)
        dists = np.sort(np.linalg.norm(pts[:, None] - pts[None], axis=-1)[np.triu_indices(_N_FIDUCIALS, 1)])
        if np.min(np.diff(dists)) > 3.0:
            break
    else:
        raise ValueError(f"diameter_um={diameter_um} is too small to place {_N_FIDUCIALS} fiducials")
    for c, r in zip(trial_c, trial_r, strict=True):
        if not free(c, r):
            raise ValueError(
                f"section_z_um={section_z_um} leaves no room for fiducials of radius {r:.1f} um inside "
                f"the matrix (height_um={height_um})"
            )
        add(_Site("fiducial", tuple(c), (r, r, r), 0.0, "ellipsoid"), r)

    def place(kind: str, n: int, draw) -> None:
        for i in range(n):
            for _attempt in range(5000):
                axes, rotation, shape, r_max = draw()
                rho = float(np.sqrt(rng.uniform(0, (radius - r_max - _MARGIN_UM) ** 2)))
                ang = float(rng.uniform(0, 2 * np.pi))
                # A third of every population sits on the section plane, so the microscope sees it too.
                if i % 3 == 0:
                    z = section_z_um + float(rng.uniform(-0.4, 0.4)) * axes[2]
                else:
                    z = float(rng.uniform(-half_h + r_max + _MARGIN_UM, half_h - r_max - _MARGIN_UM))
                c = np.array([rho * np.cos(ang), rho * np.sin(ang), z])
                if free(c, r_max):
                    add(_Site(kind, tuple(c), axes, rotation, shape), r_max)
                    break
            else:
                raise ValueError(f"no room left for {kind} features (diameter_um={diameter_um}, height_um={height_um})")

    def draw_precipitate():
        if rng.uniform() < 0.6:  # beta-Al5FeSi platelets
            axes = (float(rng.uniform(18, 30)), float(rng.uniform(5, 9)), float(rng.uniform(10, 16)))
            return axes, float(rng.uniform(0, 180)), "ellipsoid", max(axes)
        axes = (float(rng.uniform(6, 9)),) * 2 + (float(rng.uniform(14, 24)),)  # needles along z
        axes = (axes[0], axes[0] * float(rng.uniform(0.7, 1.0)), axes[2])
        return axes, float(rng.uniform(0, 180)), "cylinder", math.hypot(max(axes[:2]), axes[2])

    growth_max = pore_growth_factor(MAX_MODEL_TEMPERATURE_K)

    def draw_pore():
        r0 = float(rng.uniform(5, 12))
        axes = (r0, r0 * float(rng.uniform(0.8, 1.0)), r0 * float(rng.uniform(0.7, 1.0)))
        return axes, float(rng.uniform(0, 180)), "ellipsoid", r0 * growth_max

    def draw_phase():
        r = float(rng.uniform(12, 22))
        return (r, r, r), 0.0, "ellipsoid", r

    place("precipitate", _N_PRECIPITATES, draw_precipitate)
    place("pore", _N_PORES, draw_pore)
    place("phase", _N_PHASE, draw_phase)
    return tuple(sites)


def make_phantom(
    *,
    seed: int = 7,
    temperature_K: float = 293.15,
    diameter_um: float = 800.0,
    height_um: float = 240.0,
    section_z_um: float = 0.0,
) -> Phantom:
    """The simulated AlSi10Mg sample at one temperature.

    A vertical matrix cylinder centred on the origin; 7 Cu fiducial spheres (radius 16-24 um) centred on
    the plane ``z = section_z_um`` within 280 um of the axis in an asymmetric layout; 16 Fe-rich
    intermetallic precipitates (platelets and vertical needles); 20 pores that grow above 400 K; 14 Si
    phase particles that exist only above 550 K. A third of each inclusion population is centred near
    the section plane. The layout depends only on ``seed``, ``diameter_um``, ``height_um`` and
    ``section_z_um``; inclusions never overlap and stay inside the matrix at any temperature.

    Parameters
    ----------
    seed
        Layout seed.
    temperature_K
        Sample temperature (K); sizes are clamped at 900 K.
    diameter_um, height_um
        Matrix cylinder size (um).
    section_z_um
        Height of the plane that the microscope will image (um, sample frame).

    Returns
    -------
    Phantom
        Features ordered: matrix, fiducials, precipitates, pores, phase (if any).
    """
    if not math.isfinite(temperature_K) or temperature_K <= 0:
        raise ValueError(f"temperature_K must be a positive finite number, got {temperature_K}")
    if not (math.isfinite(diameter_um) and diameter_um >= 400.0):
        raise ValueError(f"diameter_um must be at least 400 um, got {diameter_um}")
    if not (math.isfinite(height_um) and height_um >= 120.0):
        raise ValueError(f"height_um must be at least 120 um, got {height_um}")
    if not (math.isfinite(section_z_um) and abs(section_z_um) <= height_um / 2 - 24.0 - _MARGIN_UM):
        raise ValueError(
            f"section_z_um must lie within +-{height_um / 2 - 24.0 - _MARGIN_UM} um of the sample centre "
            f"so the fiducials fit inside the matrix, got {section_z_um}"
        )
    sites = _layout(int(seed), float(diameter_um), float(height_um), float(section_z_um))
    growth = pore_growth_factor(temperature_K)
    phase_fraction = phase_radius_fraction(temperature_K)
    features = [
        Feature("matrix", "matrix", (0.0, 0.0, 0.0), (diameter_um / 2, diameter_um / 2, height_um / 2), 0.0, "cylinder")
    ]
    for kind in ("fiducial", "precipitate", "pore", "phase"):
        for s in (s for s in sites if s.kind == kind):
            if kind == "pore":
                axes = tuple(a * growth for a in s.semi_axes_um)
            elif kind == "phase":
                if phase_fraction == 0.0:
                    continue
                axes = tuple(a * phase_fraction for a in s.semi_axes_um)
            else:
                axes = s.semi_axes_um
            features.append(Feature(kind, kind, s.center_um, axes, s.rotation_deg, s.shape))
    return Phantom(features=tuple(features), temperature_K=float(temperature_K))
