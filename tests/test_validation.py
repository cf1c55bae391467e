import numpy as np
import pytest

from benchmark.run.sphere_masks import sphere_like, sphere_task
from datasets.tasks import get_task


def test_sphere_has_the_mask_volume_at_its_centroid():
    mask = np.zeros((1, 20, 24, 20), np.uint8)
    mask[0, 5:9, 6:14, 8:11] = 1  # a box, far from a sphere
    mask[0, 12:14, 6:10, 8:11] = 1
    ball = sphere_like(mask)
    assert ball.shape == mask.shape and ball.sum() == mask.sum()
    np.testing.assert_allclose(np.argwhere(ball[0]).mean(0), np.argwhere(mask[0]).mean(0), atol=0.75)
    # Every voxel of the ball is nearer the centre than every voxel outside it.
    centre = np.argwhere(mask[0]).mean(0)
    dist = np.linalg.norm(np.indices(mask.shape[1:]).reshape(3, -1).T - centre, axis=1).reshape(mask.shape[1:])
    assert dist[ball[0] > 0].max() <= dist[ball[0] == 0].min() + 1e-9


def test_sphere_task_swaps_only_the_lv_mask():
    with pytest.raises(ValueError, match="no LV mask|has none"):
        sphere_task(get_task("sr4"))
    with pytest.raises(ValueError, match="empty"):
        sphere_like(np.zeros((1, 4, 4, 4), np.uint8))
