"""Height of a sectioned plane in a volume, against the analytic phantom's truth."""

import numpy as np
import pytest

from corrflow.processing import transforms
from corrflow.processing.section_height import estimate_section_height, micrograph_on_slice_grid, rank_correlation
from corrflow.simulators import MicroscopeModel, make_phantom, microscope_image

VOXEL_UM = 8.0


def _scene(section_z_um: float, seed: int = 0):
    phantom = make_phantom(seed=3, section_z_um=section_z_um)
    volume = phantom.voxelize(shape_zyx=(16, 96, 96), voxel_size_um=VOXEL_UM, z_offset_um=section_z_um)
    z_um = (np.arange(16) - 7.5) * VOXEL_UM + section_z_um
    truth = transforms.similarity(scale=1.02, rotation_deg=11.0, translation_um=(30.0, -15.0, section_z_um))
    model = MicroscopeModel(shape_px=(200, 200), pixel_size_um=3.0, sample_from_microscope=truth, seed=seed)
    image = microscope_image(phantom, model, stage_x_um=0.0, stage_y_um=0.0, rng=np.random.default_rng(seed))
    registered = micrograph_on_slice_grid(
        image, sample_from_microscope=truth, micrograph_pixel_size_um=3.0, stage_x_um=0.0, stage_y_um=0.0,
        slice_shape=volume.shape[1:], voxel_size_um=VOXEL_UM, slice_z_um=section_z_um,
    )
    return volume, z_um, registered


@pytest.mark.parametrize("section_z_um", [20.0, 13.0])
def test_height_of_the_section_is_found_to_a_fraction_of_a_voxel(section_z_um):
    volume, z_um, registered = _scene(section_z_um)
    window = slice(4, 12)  # +-4 voxels around the middle
    estimate = estimate_section_height(registered, volume[window], z_um[window])
    assert abs(estimate.z_um - section_z_um) < 0.25 * VOXEL_UM, estimate.z_um


def test_rank_correlation_ignores_monotone_contrast_changes():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 40))
    mask = np.ones(a.shape, bool)
    assert rank_correlation(a, np.exp(3 * a), mask=mask) == pytest.approx(1.0)
    assert rank_correlation(a, -(a**3), mask=mask) == pytest.approx(-1.0)
    assert abs(rank_correlation(a, rng.normal(size=a.shape), mask=mask)) < 0.1


def test_bad_inputs_are_rejected_with_the_reason():
    volume, z_um, registered = _scene(20.0)
    with pytest.raises(ValueError, match=">= 3 slices"):
        estimate_section_height(registered, volume[:2], z_um[:2])
    with pytest.raises(ValueError, match="slices must be"):
        estimate_section_height(registered[:10], volume[:5], z_um[:5])
    with pytest.raises(ValueError, match="does not overlap"):
        estimate_section_height(np.full_like(registered, np.nan), volume[:5], z_um[:5])
