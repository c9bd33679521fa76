"""The twin probe (train.procedural.twins): its walk stays inside the generator's prior and its
scores read the tolerance the right way round."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from train.procedural import twins
from train.procedural.objects import Split, object_seed, sample_parts, upright


def test_a_tolerance_no_other_object_meets_keeps_only_the_truth():
    report = twins.find_twins(2, tolerance=80.0, steps=60, keep=4)
    assert report["twin_iou"] == pytest.approx(1.0)
    assert report["majority_iou"] == pytest.approx(1.0)
    assert report["elevation_sd"] == 0.0


def test_with_no_tolerance_the_twins_are_other_objects():
    """PSNR is never below 0 dB on [0, 1] images: every object of the prior counts as a twin,
    so the walk leaves the truth and its rig masks stop matching."""
    loose = twins.find_twins(2, tolerance=0.0, steps=150, keep=4)
    assert loose["accepted"] > 0.5
    assert loose["twin_iou"] < 0.8


def test_moves_stay_inside_the_prior():
    rng = np.random.default_rng(0)
    state = twins.State(tuple(sample_parts(object_seed(Split.HELDOUT, 1))), 20.0, 1.8)
    for _ in range(400):
        state = twins.propose(state, rng, scale=3.0) or state
        first, *others = state.parts
        assert np.all((np.asarray(first.stretch) >= 0.55) & (np.asarray(first.stretch) <= 1.0))
        for part in others:
            s = np.asarray(part.stretch)
            assert max(s.max(), 0.45) <= min(s.min() / 0.55, 0.9) + 1e-9  # some size in [0.45, 0.9] allows it
            assert 0.25 <= np.linalg.norm(part.offset) <= 0.55
        assert -10 <= state.elevation <= 45 and 1.5 <= state.distance <= 2.2


def test_known_camera_and_upright_modes_keep_what_they_fix():
    rng = np.random.default_rng(1)
    start = twins.State(upright(tuple(sample_parts(object_seed(Split.HELDOUT, 3)))), 20.0, 1.8)
    state = start
    for _ in range(200):
        state = twins.propose(state, rng, scale=3.0, camera_known=True, vertical_only=True) or state
    assert (state.elevation, state.distance) == (start.elevation, start.distance)
    assert any(a.rotation != b.rotation for a, b in zip(state.parts, start.parts, strict=True))
    for part in state.parts:  # each part's own axis that was vertical stays vertical
        up = Rotation.from_quat(part.rotation).as_matrix() @ np.array([0.0, 0.0, 1.0])
        assert up == pytest.approx([0.0, 0.0, 1.0], abs=1e-9)


@pytest.mark.parametrize("argv, message", [(["--tolerance", "-3"], "--tolerance -3.0; give a PSNR in dB, 0 or more"),
                                            (["--steps", "0"], "--steps 0; give at least 1")])
def test_bad_arguments_name_the_value(argv, message, capsys):
    with pytest.raises(SystemExit):
        twins.parse_args(argv)
    assert message in capsys.readouterr().err
