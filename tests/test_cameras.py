"""The rig of DESIGN section 3, checked against its definition."""

import math

import pytest
import torch

from mvdpp_core import cameras


def test_rig_order_and_positions():
    views = cameras.rig_views()
    assert len(views) == 32
    assert [v.elevation_deg for v in views[::8]] == [-30, 0, 30, 60]
    assert [v.azimuth_deg for v in views[:8]] == [45.0 * a for a in range(8)]
    assert views[cameras.view_index(2, 3)] == cameras.RigView(135.0, 30.0)
    c2w = cameras.rig_c2w(torch.float64)
    centers = c2w[:, :3, 3]
    torch.testing.assert_close(centers.norm(dim=-1), torch.full((32,), 1.5, dtype=torch.float64))
    # azimuth 0, elevation 0 sits on +X; azimuth 90 on +Y (right-handed, +Z up).
    torch.testing.assert_close(centers[cameras.view_index(1, 0)], torch.tensor([1.5, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(
        centers[cameras.view_index(1, 2)], torch.tensor([0, 1.5, 0], dtype=torch.float64), atol=1e-12, rtol=0
    )
    assert centers[cameras.view_index(3, 0), 2] == pytest.approx(1.5 * math.sin(math.radians(60)))


def test_rotations_are_proper_and_look_at_origin():
    c2w = cameras.rig_c2w(torch.float64)
    R = c2w[:, :3, :3]
    torch.testing.assert_close(R.transpose(1, 2) @ R, torch.eye(3, dtype=torch.float64).expand(32, 3, 3))
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(32, dtype=torch.float64))
    K = cameras.intrinsics(64)
    pix, depth = cameras.project(torch.zeros(1, 3, dtype=torch.float64), c2w, K)
    torch.testing.assert_close(pix[:, 0], torch.full((32, 2), 32.0, dtype=torch.float64))
    torch.testing.assert_close(depth[:, 0], torch.full((32,), 1.5, dtype=torch.float64))


def test_image_up_is_world_up_and_fov_is_60_degrees():
    c2w = cameras.rig_c2w(torch.float64)
    K = cameras.intrinsics(100)
    up = torch.tensor([[0.0, 0.0, 0.2]], dtype=torch.float64)
    pix, _ = cameras.project(up, c2w, K)
    assert (pix[:, 0, 1] < 50).all(), "+Z must project above the image centre (y down)"
    torch.testing.assert_close(pix[:, 0, 0], torch.full((32,), 50.0, dtype=torch.float64))
    # A point at 30 deg off-axis to the camera's right lands on the right image border.
    cam = cameras.view_index(1, 0)
    right = c2w[cam, :3, 0]
    forward = c2w[cam, :3, 2]
    p = c2w[cam, :3, 3] + forward + math.tan(math.radians(30)) * right
    pix, _ = cameras.project(p[None], c2w[cam : cam + 1], K)
    assert pix[0, 0, 0].item() == pytest.approx(100.0)


def test_pixel_rays_hit_projected_points():
    c2w = cameras.rig_c2w(torch.float64)[:3]
    K = cameras.intrinsics(8)
    origins, dirs = cameras.pixel_rays(c2w, K, 8, 8)
    points = origins + 2.0 * dirs  # v h w 3
    pix, _ = cameras.project(points[0].reshape(-1, 3), c2w[:1], K)
    ys, xs = torch.meshgrid(torch.arange(8) + 0.5, torch.arange(8) + 0.5, indexing="ij")
    torch.testing.assert_close(pix[0], torch.stack((xs, ys), -1).reshape(-1, 2).double())


def test_opengl_conversion_flips_y_and_z():
    c2w = cameras.rig_c2w(torch.float64)
    gl = c2w @ cameras.OPENCV_TO_OPENGL
    # OpenGL cameras look down -z: -z axis equals OpenCV forward.
    torch.testing.assert_close(-gl[:, :3, 2], c2w[:, :3, 2])


def test_condition_camera_sampling_ranges():
    g = torch.Generator().manual_seed(0)
    cams = [c for _ in range(50) for c in cameras.sample_condition_cameras(10, g)]
    assert all(c.azimuth_deg in cameras.AZIMUTHS_DEG for c in cams)
    assert all(-10 <= c.elevation_deg <= 45 and 1.5 <= c.distance <= 2.2 for c in cams)
    elevations, distances = [c.elevation_deg for c in cams], [c.distance for c in cams]
    assert min(elevations) < -9 and max(elevations) > 44, "the draws fill DESIGN's range, not a part of it"
    assert min(distances) < 1.52 and max(distances) > 2.18
    assert all(c.azimuth_deg == 0.0 for c in cams[::10]), "the first condition view defines azimuth 0"
    assert len({c.azimuth_deg for c in cams}) == 8
    with pytest.raises(ValueError, match="condition views"):
        cameras.sample_condition_cameras(11)
    with pytest.raises(ValueError, match=r"n=0 condition views; allowed 1..10"):
        cameras.sample_condition_cameras(0)


def test_a_camera_at_a_pole_and_an_empty_image_are_refused():
    """At |elevation| = 90 deg "up = +Z" leaves the roll undefined; just below it the frame is
    still a rotation. An image needs both sides positive."""
    with pytest.raises(ValueError, match=r"elevation 90.0 deg is at a pole.*use \|elevation\| < 90"):
        cameras.spherical_c2w(torch.tensor([0.0, 45.0]), torch.tensor([0.0, -90.0]))
    R = cameras.spherical_c2w(torch.tensor([45.0]), torch.tensor([89.0]))[0, :3, :3]
    torch.testing.assert_close(R.T @ R, torch.eye(3, dtype=torch.float64))
    assert torch.linalg.det(R).item() == pytest.approx(1.0)
    for width, height in ((0, 64), (64, 0), (-8, -8)):
        with pytest.raises(ValueError, match=f"image size {width}x{height} must be positive"):
            cameras.intrinsics(width, height)


def test_resized_intrinsics_scale_projected_pixels():
    """A point projects to pixel coordinates scaled by the resize factor of each axis."""
    from mvdpp_core.cameras import intrinsics, project, resized_intrinsics, rig_c2w

    c2w, K = rig_c2w(torch.float64), intrinsics(256, 192).double()
    points = torch.tensor([[0.1, -0.2, 0.05], [0.3, 0.2, -0.1]], dtype=torch.float64)
    uv, _ = project(points, c2w, K)
    uv_small, _ = project(points, c2w, resized_intrinsics(K, (256, 192), (64, 96)))
    torch.testing.assert_close(uv_small, uv * torch.tensor([64 / 256, 96 / 192], dtype=torch.float64))


def test_mirrored_view_order_reflects_the_rig_across_the_azimuth_0_plane():
    """Slot order[i] is camera i reflected across the plane y = 0 (azimuth 0 on +X, up +Z), and
    it sees the reflected world as camera i's image flipped left-right."""
    order = cameras.mirrored_view_order()
    assert sorted(order) == list(range(32)) and [order[i] for i in order] == list(range(32))
    assert order[cameras.view_index(2, 1)] == cameras.view_index(2, 7)  # 45 deg -> 315 deg, same elevation
    c2w = cameras.rig_c2w(torch.float64)
    S = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    flip_x = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))  # camera x (image right) reversed
    torch.testing.assert_close(c2w[order, :3, 3], c2w[:, :3, 3] @ S)
    torch.testing.assert_close(c2w[order, :3, :3], S @ c2w[:, :3, :3] @ flip_x)
    points = torch.rand(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5
    K = cameras.intrinsics(64)
    pix, depth = cameras.project(points, c2w, K)
    pix_m, depth_m = cameras.project(points @ S, c2w[order], K)
    torch.testing.assert_close(pix_m[..., 0], 64 - pix[..., 0], atol=1e-5, rtol=0)  # project divides in float32
    torch.testing.assert_close(pix_m[..., 1], pix[..., 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(depth_m, depth, atol=1e-5, rtol=0)


def test_rotated_view_order_turns_the_rig_about_the_vertical_axis():
    """Slot i takes the view of slot order[i], whose camera turned by shift x 45 deg about +Z is
    camera i: views generated in the frame of a view at rig azimuth ``shift``, moved into the
    first view's frame."""
    for shift in range(8):
        order = cameras.rotated_view_order(shift)
        assert sorted(order) == list(range(32))
        back = cameras.rotated_view_order(-shift)
        assert [order[back[i]] for i in range(32)] == list(range(32)), "turning back is the identity"
        angle = torch.tensor(shift * math.pi / 4, dtype=torch.float64)
        c, s = torch.cos(angle), torch.sin(angle)
        R = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
        c2w = cameras.rig_c2w(torch.float64)
        torch.testing.assert_close(c2w[:, :3, 3], c2w[order, :3, 3] @ R.T)
        torch.testing.assert_close(c2w[:, :3, :3], R @ c2w[order, :3, :3])
    assert cameras.rotated_view_order(1)[cameras.view_index(2, 3)] == cameras.view_index(2, 2)
