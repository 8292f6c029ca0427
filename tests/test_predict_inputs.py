"""fss_jax.predict on unreadable, oversized and lossy input files: one line, exit 2.

The command-line cases stop while reading the inputs, before the model is built and
its weights are read, so the checkpoint here is only what `locate_checkpoint` looks
at (``variables/`` + ``metadata.json``); no model runs.
"""

from __future__ import annotations

import json
import re
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

from fss_jax import predict

BOMB_SIDE = 15000  # 225 megapixels: above --max-pixels 50 and PIL's own 179 MP error


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("inputs")
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (80, 100, 3), np.uint8)
  mask = np.zeros((80, 100), np.uint8)
  mask[20:60, 30:70] = 255
  cv2.imwrite(str(root / "support.jpg"), image)
  cv2.imwrite(str(root / "support_mask.png"), mask)
  cv2.imwrite(str(root / "support_mask.jpg"), mask)
  cv2.imwrite(str(root / "query.jpg"), image)
  (root / "empty.jpg").write_bytes(b"")
  (root / "text.jpg").write_text("this is not a jpeg\n")
  jpeg = cv2.imencode(".jpg", image)[1].tobytes()
  (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
  png = cv2.imencode(".png", image)[1].tobytes()
  (root / "truncated.png").write_bytes(png[: len(png) // 2])
  # Decompression bombs: 15000 x 15000, a few tens of KB on disk.
  Image.new("1", (BOMB_SIDE, BOMB_SIDE)).save(root / "bomb_1bit.png")
  bomb = Image.new("P", (BOMB_SIDE, BOMB_SIDE))
  bomb.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
  bomb.save(root / "bomb_palette.png")
  ckpt = root / "ckpt"
  (ckpt / "variables").mkdir(parents=True)
  (ckpt / "metadata.json").write_text(json.dumps({"model": "panet", "fields": {}}))
  return root


def _cli(files, capfd, *, query="query.jpg", mask="support_mask.png", extra=()):
  """predict.main with one support and one query -> (exit code, stderr at the fd level)."""
  argv = [
    "--checkpoint",
    str(files / "ckpt"),
    "--size",
    "64",
    "--resize",
    "pad",
    "--support",
    f"{files / 'support.jpg'}:{files / mask}",
    "--query",
    str(files / query),
    "--out",
    str(files / "out"),
    *extra,
  ]
  rc = predict.main(argv)
  return rc, capfd.readouterr().err


@pytest.mark.parametrize(
  "name,says",
  [
    ("empty.jpg", r"is empty \(0 bytes\)"),
    ("text.jpg", r"is not a readable image \(a text file starting with 'this is not a jpeg'\)"),
    ("truncated.jpg", r"is not a readable image \(a truncated or corrupt JPEG file"),
    ("truncated.png", r"is not a readable image \(a truncated or corrupt PNG file"),
    (
      "bomb_palette.png",
      r"is 15000x15000 = 225 megapixels, above --max-pixels 50; downscale "
      r"it or raise --max-pixels",
    ),
  ],
)
def test_bad_query_is_one_line(files, capfd, name, says):
  rc, err = _cli(files, capfd, query=name)
  assert rc == 2
  assert err.count("\n") == 1 and "Traceback" not in err, err
  assert err.startswith(f"error: query image {files / name} ")
  assert re.search(says, err), err
  assert not (files / "out").exists()


@pytest.mark.parametrize(
  "name,says",
  [
    ("empty.jpg", "is empty (0 bytes)"),
    ("text.jpg", "is not a readable image (a text file"),
    ("truncated.png", "is not a readable image (a truncated or corrupt PNG file"),
    (
      "bomb_1bit.png",
      "is 15000x15000 = 225 megapixels, above --max-pixels 50; downscale it or raise --max-pixels",
    ),
  ],
)
def test_bad_support_mask_is_one_line(files, capfd, name, says):
  rc, err = _cli(files, capfd, mask=name)
  assert rc == 2
  assert err.count("\n") == 1 and "Traceback" not in err, err
  assert err.startswith(f"error: support mask {files / name} {says}"), err


def test_max_pixels_flag(files, capfd):
  # 100 x 80 = 0.008 megapixels: refused under 0.005, read under 0.01 (and with no limit).
  rc, err = _cli(files, capfd, extra=["--max-pixels", "0.005"])
  assert rc == 2 and err == (
    f"error: support image {files / 'support.jpg'} is 100x80 = 0.008 "
    f"megapixels, above --max-pixels 0.005; downscale it or raise "
    f"--max-pixels\n"
  )
  for limit in (0.01, 0, None):
    assert predict.read_image(files / "query.jpg", max_megapixels=limit).shape == (80, 100, 3)
    assert predict.read_mask(files / "support_mask.png", max_megapixels=limit).shape == (80, 100)
  with pytest.raises(predict.PredictInputError, match=r"mask .* is 100x80 .* above --max-pixels"):
    predict.read_mask(files / "support_mask.png", max_megapixels=0.005)


def test_pil_limit_never_applies(files, monkeypatch):
  """PIL's decompression-bomb warning / error never shows: --max-pixels is the only limit,
  and PIL's own setting is left as it was."""
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 100 x 80 > 2 x 3000: PIL's error
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert predict.read_mask(files / "support_mask.png").shape == (80, 100)
    assert predict.read_image(files / "support_mask.png").shape == (80, 100, 3)
  assert Image.MAX_IMAGE_PIXELS == 3000


def test_jpeg_mask_warns(files, capsys):
  mask = predict.read_mask(files / "support_mask.jpg", what="support mask")
  assert mask.shape == (80, 100) and mask[40, 50] == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(
    f"warning: support mask {files / 'support_mask.jpg'} is a JPEG (lossy)"
  ), err
  assert "save masks as PNG" in err
  got = []
  predict.read_mask(files / "support_mask.png", warn=got.append)
  assert got == []  # a PNG mask: no warning
  predict.read_mask(files / "support_mask.jpg", warn=got.append)
  assert len(got) == 1 and "JPEG" in got[0]
