"""fss_jax.eval.visualize: overlays, episode panels, clu image summaries, IoU bar chart PNG."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from fss_jax.eval import metrics, visualize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_overlay_pixels_match_numpy():
  img = np.array(
    [[[10, 20, 30], [200, 100, 0], [255, 255, 255]], [[0, 0, 0], [50, 60, 70], [1, 2, 3]]], np.uint8
  )  # [2, 3, 3]
  mask = np.array([[1, 0, 255], [0, 1, 1]], np.int32)
  color, alpha = (255, 0, 0), 0.25
  out = visualize.overlay(img, mask, color, alpha)
  want = img.copy()
  fg = np.array([[True, False, False], [False, True, True]])
  want[fg] = np.rint(0.75 * img[fg].astype(np.float32) + 0.25 * np.float32([255, 0, 0])).astype(
    np.uint8
  )
  np.testing.assert_array_equal(out, want)
  assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
  # Concrete numbers: (10, 20, 30) -> rint(7.5 + 63.75, 15, 22.5) = (71, 15, 22).
  np.testing.assert_array_equal(out[0, 0], [71, 15, 22])
  np.testing.assert_array_equal(out[0, 2], img[0, 2])  # ignore left alone
  np.testing.assert_array_equal(out[0, 1], img[0, 1])  # background
  assert not np.shares_memory(out, img)


def test_overlay_ignore_bool_and_errors():
  img = np.full((2, 2, 3), 100, np.uint8)
  mask = np.array([[1, 255], [0, 0]], np.uint8)
  out = visualize.overlay(img, mask, (0, 0, 0), 0.5, ignore_color=(200, 200, 200))
  np.testing.assert_array_equal(out[0, 0], [50, 50, 50])
  np.testing.assert_array_equal(out[0, 1], [150, 150, 150])
  np.testing.assert_array_equal(out[1], img[1])
  out_b = visualize.overlay(img, np.array([[True, False], [False, True]]), (0, 0, 0), 1.0)
  np.testing.assert_array_equal(out_b[1, 1], [0, 0, 0])
  with pytest.raises(ValueError, match="differ in size"):
    visualize.overlay(img, np.zeros((3, 2), np.uint8))
  with pytest.raises(ValueError, match="alpha"):
    visualize.overlay(img, mask, alpha=1.5)


def test_denormalize_roundtrip():
  x = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3) * 20
  norm = (x - np.float32(visualize.MEAN)) / np.float32(visualize.STD)
  np.testing.assert_array_equal(visualize.denormalize(norm), x.astype(np.uint8))


def test_outline_draws_only_the_boundary_of_a_square():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 255, (16, 16, 3), np.uint8)
  mask = np.zeros((16, 16), np.int32)
  mask[4:12, 4:12] = 1
  color = (255, 0, 0)
  out = visualize.outline(img, mask, color, thickness=1)
  ring = mask.astype(bool)
  ring[5:11, 5:11] = False  # the 1-pixel edge of the square
  np.testing.assert_array_equal(out[ring], np.tile(color, (ring.sum(), 1)))
  np.testing.assert_array_equal(out[~ring], img[~ring])  # inside and outside untouched
  thick = visualize.outline(img, mask, color, thickness=2)
  np.testing.assert_array_equal(thick[6:10, 6:10], img[6:10, 6:10])
  assert (thick[5, 5:11] == color).all()
  # a mask touching the image border is closed along the border; ignore contours are optional
  full = visualize.outline(img, np.ones((16, 16), np.uint8), color, thickness=1)
  assert (full[0] == color).all() and (full[-1] == color).all()
  np.testing.assert_array_equal(full[1:-1, 1:-1], img[1:-1, 1:-1])
  band = np.where(mask == 1, 255, 0).astype(np.uint8)
  np.testing.assert_array_equal(visualize.outline(img, band, color), img)
  grey = visualize.outline(img, band, color, ignore_color=(128, 128, 128))
  assert (grey[ring] == 128).all()


def test_episode_panel_layout():
  rng = np.random.default_rng(0)
  q = rng.integers(0, 255, (8, 8, 3), np.uint8)
  supports = [rng.integers(0, 255, (8, 8, 3), np.uint8), rng.integers(0, 255, (16, 8, 3), np.uint8)]
  smasks = [np.ones((8, 8), np.uint8), np.zeros((16, 8), np.uint8)]
  pred = np.zeros((4, 4), np.int32)
  pred[:2, :2] = 1  # top-left quarter
  target = np.full((8, 8), 255, np.uint8)
  panel = visualize.episode_panel(q, supports, smasks, pred, target, gap=4, captions=False)
  # tiles: 8 (support 1) + 4 (support 2 at height 8) + 8 (prediction) + 8 (target) + 3 gaps.
  assert panel.shape == (8, 8 + 4 + 8 + 8 + 3 * 4, 3) and panel.dtype == np.uint8
  np.testing.assert_array_equal(panel[:, 8:12], 255)  # white gap
  pred_tile = panel[:, 8 + 4 + 4 + 4 : 8 + 4 + 4 + 4 + 8]
  want = visualize.outline(
    q,
    cv2.resize(pred.astype(np.uint8), (8, 8), interpolation=cv2.INTER_NEAREST),
    visualize.PRED_COLOR,
  )
  np.testing.assert_array_equal(pred_tile, want)
  assert not np.array_equal(pred_tile[:4, :4], q[:4, :4])
  np.testing.assert_array_equal(pred_tile[4:, 4:], q[4:, 4:])
  no_target = visualize.episode_panel(q, supports, smasks, pred, None, gap=0, captions=False)
  assert no_target.shape == (8, 8 + 4 + 8, 3)


def test_episode_panel_captions_name_every_tile():
  rng = np.random.default_rng(2)
  q = rng.integers(0, 255, (48, 64, 3), np.uint8)
  supports, smasks = [q, q], [np.zeros((48, 64), np.uint8)] * 2
  pred = np.zeros((48, 64), np.int32)
  assert visualize.panel_captions(2) == ["support 1", "support 2", "prediction", "ground truth"]
  assert visualize.panel_captions(1, with_target=False) == ["support", "prediction"]
  bare = visualize.episode_panel(q, supports, smasks, pred, pred, gap=4, captions=False)
  panel = visualize.episode_panel(q, supports, smasks, pred, pred, gap=4)
  ch = visualize.caption_height(48)
  assert panel.shape == (48 + ch, bare.shape[1], 3)
  np.testing.assert_array_equal(panel[ch:], bare)  # tiles below the band
  for i, text in enumerate(visualize.panel_captions(2)):
    band = panel[:ch, i * (64 + 4) : i * (64 + 4) + 64]
    np.testing.assert_array_equal(band, visualize.caption(text, 64, ch))
    assert (band < 128).any() and (band == 255).mean() > 0.5, text  # dark text on white


def test_panels_from_batch_normalised_and_valid():
  rng = np.random.default_rng(1)
  b, k, s = 3, 2, 8
  raw = rng.integers(0, 255, (b, s, s, 3)).astype(np.float32)
  batch = {
    "query_image": (raw - np.float32(visualize.MEAN)) / np.float32(visualize.STD),
    "support_images": rng.normal(size=(b, k, s, s, 3)).astype(np.float32),
    "support_masks": rng.integers(0, 2, (b, k, s, s)).astype(np.int32),
    "query_mask": rng.integers(0, 2, (b, s, s)).astype(np.int32),
    "valid": np.array([1, 0, 1], np.int32),
  }
  logits = rng.normal(size=(b, 4, 4, 2)).astype(np.float32)
  panels = visualize.panels_from_batch(batch, logits, max_panels=4)
  assert len(panels) == 2  # episode 1 is padding
  ch = visualize.caption_height(s)
  assert all(p.shape == (ch + s, 4 * s + 3 * 4, 3) for p in panels)
  # The query tile shows the de-normalised image where nothing is predicted.
  pred = np.argmax(logits[2], -1)
  up = cv2.resize(pred.astype(np.uint8), (s, s), interpolation=cv2.INTER_NEAREST)
  tile = panels[1][ch:, 2 * (s + 4) : 2 * (s + 4) + s]
  np.testing.assert_array_equal(tile[up == 0], raw[2][up == 0].astype(np.uint8))
  assert len(visualize.panels_from_batch(batch, logits, max_panels=1)) == 1
  labels = np.argmax(logits, -1).astype(np.int32)  # make_predict_step output
  from_labels = visualize.panels_from_batch(batch, labels, max_panels=4)
  assert all(np.array_equal(a, b) for a, b in zip(from_labels, panels))


def test_iou_bar_chart_png(tmp_path):
  path = tmp_path / "res" / "results_iou.png"
  per_class = {
    "1 aeroplane": 61.5,
    "2 bicycle": 30.25,
    "3 bird": 75.0,
    "4 boat": 0.0,
    "5 bottle": 44.4,
  }
  out = visualize.iou_bar_chart(per_class, path, title="fold 0")
  assert out == path and path.is_file() and os.stat(path).st_size > 1000
  assert path.read_bytes()[:8] == PNG_MAGIC
  img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
  assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
  assert sorted(p.name for p in path.parent.iterdir()) == ["results_iou.png"]  # no temp files left
  with pytest.raises(FileExistsError, match="overwrite"):
    visualize.iou_bar_chart(per_class, path, overwrite=False)
  with pytest.raises(ValueError, match="no classes"):
    visualize.iou_bar_chart({}, tmp_path / "x.png")


def test_summary_bar_chart(tmp_path):
  summary = {
    "model": "panet",
    "dataset": "pascal5i",
    "fold": 0,
    "shot": 1,
    "num_seeds": 2,
    "miou_mean": 50.0,
    "miou_std": 1.0,
    "per_class_mean": {"1": 40.0, "2": 60.0},
    "seeds": {
      "0": {"per_class": {"1": 39.0, "2": 61.0}},
      "1": {"per_class": {"1": 41.0, "2": 59.0}},
    },
  }
  results = tmp_path / "results_pascal5i_f0_1shot.json"
  path = visualize.chart_path(results)
  assert path.name == "results_pascal5i_f0_1shot_iou.png"
  visualize.summary_bar_chart(summary, path, class_names={1: "aeroplane", 2: "bicycle"})
  assert path.read_bytes()[:8] == PNG_MAGIC and os.stat(path).st_size > 1000


def test_bar_chart_title_and_labels_fit_the_figure():
  title = "panet pascal5i fold 0 1-shot: mIoU 50.00 ± 1.00 (2 seed(s))"
  per_class = {f"{c} {n}": 40.0 + c for c, n in list(metrics.class_names("pascal5i").items())[:5]}
  fig = visualize.bar_chart_figure(per_class, title=title, errors={k: 1.0 for k in per_class})
  renderer = fig.canvas.get_renderer()
  inside = lambda box: (
    box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
  )
  texts = [t for t in fig.texts if " ".join(t.get_text().split()) == title]
  assert len(texts) == 1, [t.get_text() for t in fig.texts]  # the whole title, maybe wrapped
  assert inside(texts[0].get_window_extent(renderer))
  ax = fig.axes[0]
  labels = ax.get_xticklabels()
  assert [t.get_text() for t in labels] == list(per_class)
  boxes = [t.get_window_extent(renderer) for t in labels]
  assert all(inside(b) for b in boxes)
  assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), "class labels overlap"


def test_summary_bar_chart_names_come_from_the_summary_or_dataset():
  summary = {"dataset": "pascal5i", "per_class_mean": {"6": 1.0}}
  assert visualize.chart_class_names(summary) == {
    str(c): n for c, n in metrics.class_names("pascal").items()
  }
  assert visualize.chart_class_names({**summary, "class_names": {"6": "autobus"}}) == {
    "6": "autobus"
  }
  assert visualize.chart_class_names(summary, {6: "coach"}) == {"6": "coach"}
  assert visualize.chart_class_names({"per_class_mean": {"6": 1.0}}) == {}


def test_write_image_summaries_logging_and_tensorboard(tmp_path):
  from clu import metric_writers

  panels = [np.full((6, 10, 3), 7, np.uint8), np.zeros((6, 10, 3), np.uint8)]
  written = visualize.write_image_summaries(metric_writers.LoggingWriter(), 3, panels)
  assert sorted(written) == ["eval/episode_0", "eval/episode_1"]
  assert all(v.shape == (1, 6, 10, 3) and v.dtype == np.uint8 for v in written.values())

  logdir = tmp_path / "tb"
  writer = metric_writers.SummaryWriter(str(logdir))
  visualize.write_image_summaries(writer, 5, {"ep7": panels[0]}, prefix="val/panel")
  writer.flush()
  writer.close()
  events = list(logdir.glob("events.out.tfevents.*"))
  assert len(events) == 1 and events[0].stat().st_size > 0
  assert b"val/panel/ep7" in events[0].read_bytes()
