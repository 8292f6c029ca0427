"""Metrics (data_protocol.md §10): hand-computed mIoU / FB-IoU and the reference scoring path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fss_jax.eval import evaluate as evaluate_lib
from fss_jax.eval import metrics


def test_intersection_and_union_hand_example():
  pred = np.array([[0, 1, 1], [1, 0, 0]])
  target = np.array([[0, 1, 255], [0, 0, 1]])
  i, u, t = metrics.intersection_and_union(pred, target, 2)
  # valid pixels: (0,0) p0 t0, (0,1) p1 t1, (1,0) p1 t0, (1,1) p0 t0, (1,2) p0 t1
  np.testing.assert_array_equal(i, [2, 1])  # bg: (0,0),(1,1); fg: (0,1)
  np.testing.assert_array_equal(u, [3 + 3 - 2, 2 + 2 - 1])
  np.testing.assert_array_equal(t, [3, 2])


def test_class_iou_hand_example():
  acc = metrics.ClassIoU([1, 2, 3], {1: "aeroplane"})
  # episode A (class 1): I_fg 3, U_fg 4; I_bg 10, U_bg 12
  # episode B (class 1): I_fg 1, U_fg 4; I_bg 5, U_bg 6
  # episode C (class 2): I_fg 0, U_fg 5; I_bg 7, U_bg 9
  # episode D (padding, valid 0) must be ignored
  inter = np.array([[10, 3], [5, 1], [7, 0], [100, 100]])
  union = np.array([[12, 4], [6, 4], [9, 5], [100, 100]])
  acc.add(inter, union, np.array([1, 1, 2, 3]), valid=np.array([1, 1, 1, 0]))
  r = acc.result()
  # class 1: 4/8 = 0.5; class 2: 0/5 = 0; class 3 never seen -> 0; n = 3
  assert r["per_class"] == {"1": pytest.approx(50.0), "2": pytest.approx(0.0), "3": 0.0}
  assert r["miou"] == pytest.approx(50.0 / 3)
  # FB: bg 22/27, fg 4/13
  assert r["fb_iou"] == pytest.approx(100 * (22 / 27 + 4 / 13) / 2)
  assert r["fg_iou"] == pytest.approx(100 * 4 / 13)
  assert r["episodes"] == 3
  table = acc.table()
  assert "aeroplane" in table and "50.00" in table
  with pytest.raises(ValueError, match="episode class 7 is not one of the evaluated classes"):
    acc.add(inter[:1], union[:1], np.array([7]))


def test_summarize_mean_std():
  s = evaluate_lib.summarize(
    {
      1: {"miou": 40.0, "fb_iou": 60.0, "per_class": {"1": 30.0}},
      2: {"miou": 50.0, "fb_iou": 70.0, "per_class": {"1": 50.0}},
    }
  )
  assert s["miou_mean"] == 45.0 and s["miou_std"] == 5.0 and s["miou_max"] == 50.0
  assert s["fb_iou_mean"] == 65.0 and s["per_class_mean"] == {"1": 40.0}


def _torch_reference(logits, label, score):
  """The references' scoring: F.interpolate(align_corners=True) + intersectionAndUnion."""
  import torch
  import torch.nn.functional as F

  h, w = label.shape
  if score == "pad_square":
    side = max(h, w)
    tgt = np.full((side, side), 255, label.dtype)
    tgt[:h, :w] = label
    size = (side, side)
  else:
    tgt, size = label, (h, w)
  x = torch.tensor(np.transpose(logits, (2, 0, 1))[None])
  out = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
  pred = out.argmax(1)[0].numpy()
  return metrics.intersection_and_union(pred, tgt, logits.shape[-1])


@pytest.mark.parametrize("score", ["pad_square", "original"])
def test_episode_counts_match_reference_scoring(score):
  pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  sizes = [(20, 13), (9, 24), (24, 24), (1, 5)]
  hb = wb = 24
  b = len(sizes)
  logits = rng.standard_normal((b, 7, 7, 2)).astype(np.float32)
  label = np.full((b, hb, wb), 255, np.int32)
  for i, (h, w) in enumerate(sizes):
    lab = rng.integers(0, 2, (h, w))
    lab[rng.random((h, w)) < 0.1] = 255
    label[i, :h, :w] = lab
  out = jax.jit(lambda l, y, s: metrics.episode_counts(l, y, s, score=score))(
    logits, label, np.asarray(sizes, np.int32)
  )
  for i, (h, w) in enumerate(sizes):
    ri, ru, rt = _torch_reference(logits[i], label[i, :h, :w], score)
    np.testing.assert_array_equal(np.asarray(out["intersection"][i]), ri)
    np.testing.assert_array_equal(np.asarray(out["union"][i]), ru)
    np.testing.assert_array_equal(np.asarray(out["target"][i]), rt)


def test_align_corners_matrix_matches_torch():
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F

  x = np.random.default_rng(1).standard_normal((1, 1, 11, 1)).astype(np.float32)
  for out in (1, 5, 11, 30):
    m = metrics.align_corners_matrix(jnp.asarray([out]), 11, 32)[0, :out]
    ours = np.asarray(m) @ x[0, 0, :, 0]
    ref = F.interpolate(torch.tensor(x), size=(out, 1), mode="bilinear", align_corners=True)
    np.testing.assert_allclose(ours, ref.numpy()[0, 0, :, 0], rtol=1e-6, atol=1e-6)


def test_all_foreground_baseline_counts():
  # target areas: episode 0 has 30 bg / 10 fg valid pixels, episode 1 has 5 / 15.
  inter, union = evaluate_lib.all_foreground_counts(np.array([[30, 10], [5, 15]]))
  np.testing.assert_array_equal(inter, [[0, 10], [0, 15]])
  np.testing.assert_array_equal(union, [[30, 40], [5, 20]])
  acc = metrics.ClassIoU([1])
  acc.add(inter, union, np.array([1, 1]))
  assert acc.result()["miou"] == pytest.approx(100 * 25 / 60)  # fg fraction of the valid pixels
  # The same numbers as scoring an all-foreground prediction with intersection_and_union.
  target = np.array([0] * 30 + [1] * 10)
  i, u, _ = metrics.intersection_and_union(np.ones_like(target), target, 2)
  np.testing.assert_array_equal(i, inter[0])
  np.testing.assert_array_equal(u, union[0])


def test_class_names_of_the_datasets():
  voc = metrics.class_names("pascal")
  assert len(voc) == 20 and voc[1] == "aeroplane" and voc[15] == "person" and voc[20] == "tvmonitor"
  coco = metrics.class_names("coco20i")
  assert (
    len(coco) == 80
    and coco[1] == "person"
    and coco[10] == "traffic light"
    and coco[80] == "toothbrush"
  )
  assert metrics.class_names("my_custom_set") == {}  # unknown dataset: bare ids


def test_class_iou_table_names_every_class():
  acc = metrics.ClassIoU([6, 7, 8], metrics.class_names("pascal5i"))
  acc.add(np.array([[5, 1]]), np.array([[6, 2]]), np.array([7]))
  rows = acc.table().splitlines()
  assert [r.split()[:2] for r in rows[1:4]] == [["6", "bus"], ["7", "car"], ["8", "cat"]]
  # ids read back from a results JSON are strings; the names still show
  long = metrics.ClassIoU([36, 37], {"36": "baseball glove", "37": "skateboard"})
  table = long.table()
  assert "baseball glove" in table and "skateboard" in table
  assert len({len(r) for r in table.splitlines()[:3]}) == 1  # the name column is aligned
