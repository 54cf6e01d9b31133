"""The silhouette control image and the IoU a silhouette ControlNet is judged by: on the data set's own renders the
checker's mask is the silhouette (IoU near 1: 0.985 on
average over 200 renders), another item's silhouette scores low, and no shape scores 0."""
from __future__ import annotations

import numpy as np

from latentdiff.data.shapes import ShapesDataset, caption, render
from latentdiff.data.shapes_checker import analyze
from latentdiff.data.shapes_eval import held_out_prompts
from latentdiff.data.shapes_silhouette import held_out_specs, mask_iou, silhouette, silhouette_mask


def test_silhouette_is_the_mask_white_on_black():
    spec = ShapesDataset(4, seed=0).spec(0)
    image = np.asarray(silhouette(spec))
    assert image.shape == (64, 64, 3) and set(np.unique(image)) == {0, 255}
    assert np.array_equal(image[..., 0] == 255, silhouette_mask(spec))
    assert np.array_equal(image[..., 0], image[..., 2])


def test_checker_mask_of_a_render_lands_on_its_silhouette():
    data = ShapesDataset(40, seed=3)
    ious = [mask_iou(analyze(render(data.spec(i))).mask, silhouette_mask(data.spec(i))) for i in range(40)]
    # the checker's mask is its own estimate: a straight edge of half-covered pixels may fall just outside it
    assert np.mean(ious) > 0.95 and min(ious) > 0.75, (np.mean(ious), min(ious))
    other = [mask_iou(analyze(render(data.spec(i))).mask, silhouette_mask(data.spec(i + 1))) for i in range(39)]
    assert np.mean(other) < 0.3
    assert mask_iou(None, silhouette_mask(data.spec(0))) == 0.0


def test_held_out_specs_are_the_held_out_prompts():
    assert [caption(s) for s in held_out_specs(12)] == held_out_prompts(12)
