"""Our augmentation ops against the OFFICIAL transform code (data_protocol.md §8, §9).

The fixtures in tests/fixtures/augment/ were made by ``make_fixtures.py`` there, which
runs the official modules (SCCAN's ``util/transform*.py`` = BAM's / PAHNet's / Sym-Net's,
HDMNet's, PANet's ``dataloaders/transforms.py``, SSP's ``dataset/transform.py``) on small
synthetic images with recorded random draws. Here the same draws are replayed through
our ops (`Replay` stands in for the numpy Generator), and each output must match: images
within one intensity level (0..255 scale), labels exactly. The last part checks that our
draws follow the official distributions, with the official rule stated in each test.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import pathlib

import cv2
import numpy as np
import pytest

from fss_jax.data import transforms as T

FIX = pathlib.Path(__file__).resolve().parent / "fixtures" / "augment"
STD = np.float32(T.STD)


@functools.cache
def _fixture(name: str) -> tuple[dict, dict]:
  """{case: {array name: array}} and the case metadata of ``<name>.npz``."""
  with np.load(FIX / f"{name}.npz") as z:
    meta = json.loads(str(z["meta"]))
    cases = {c: {} for c in meta["cases"]}
    for key in z.files:
      if key != "meta":
        case, arr = key.split(".", 1)
        cases[case][arr] = z[key]
  return cases, meta["cases"]


def _cases(name):
  return sorted(_fixture(name)[1])


class Replay:
  """Stands in for ``np.random.Generator``, returning the official draws in order.

  ``random()`` replays a ``random.random()``; ``integers(lo, hi)`` replays a
  ``random.randint(lo, hi - 1)`` (the same inclusive range; asserted, so an op that
  drew from another range, or in another order, fails here).

  The official ``SemData`` runs the whole chain on the query, then on each support;
  our grain ops run one op over the whole episode, then the next. Each (image, op)
  gets the same numbers either way; only the interleaving of the one stream differs,
  so the official draws are replayed sorted by op, then image (stable), ``order``
  overriding.
  """

  def __init__(self, a: dict, order=None):
    calls = list(zip(a["draw_kind"], a["draw_lo"], a["draw_hi"], a["draw_value"]))
    if order is None:
      order = np.lexsort((np.arange(len(calls)), a["draw_group"], a["draw_op"]))
    self.calls = [calls[i] for i in order]
    self.i = 0

  def _next(self, kind):
    assert self.i < len(self.calls), "our op drew more numbers than the official one"
    k, lo, hi, v = self.calls[self.i]
    self.i += 1
    assert k == kind, f"draw {self.i - 1}: official {k}, ours {kind}"
    return int(lo), int(hi), v

  def random(self):
    return float(self._next("random")[2])

  def integers(self, low, high):
    lo, hi, v = self._next("randint")
    assert (int(low), int(high) - 1) == (lo, hi), (
      f"ours integers({low}, {high}), official randint({lo}, {hi})"
    )
    return int(v)

  def done(self):
    assert self.i == len(self.calls), (
      f"ours drew {self.i} numbers, the official code {len(self.calls)}"
    )


def _assert_image(ours, ref, what="image", scale=None):
  """Shapes equal and max |ours - ref| <= 1 intensity level (``scale``: the per-channel
  std of normalised images, back to 0..255)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs official {ref.shape}"
  d = np.abs(ours - ref) * (1.0 if scale is None else scale)
  assert d.max() <= 1.0, f"{what}: max |ours - official| = {d.max():.3f} levels"


def _assert_label(ours, ref, what="label"):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs official {ref.shape}"
  bad = np.count_nonzero(ours.astype(np.int64) != ref.astype(np.int64))
  assert bad == 0, f"{what}: {bad} pixels differ from the official label"


def _query(a, *, base=True):
  ep = {"query_image": a["image"].astype(np.float32), "query_mask": a["label"]}
  if base:
    ep["query_base_label"] = a["label2"]
  return ep


def _check_query(out, a, *, base=True, normalised=False):
  _assert_image(out["query_image"], a["out_image"], scale=STD if normalised else None)
  _assert_label(out["query_mask"], a["out_label"])
  if base:
    _assert_label(out["query_base_label"], a["out_label2"], "base label")


# -- single ops: SCCAN / BAM / PAHNet / Sym-Net util/transform_tri.py ----------------------------------


def _sccan_op(meta):
  """Our op for a fixture case, with the official train scripts' arguments."""
  kind = meta["kind"]
  if kind == "RandScale":
    return T.RandScale(scale=tuple(meta["scale"]))
  if kind == "RandRotate":  # RandRotate([-10, 10], padding=mean, ignore_label=255), p = 0.5
    return T.RandRotate(angle=tuple(meta["angle"]), p=meta["p"])
  if kind == "RandomGaussianBlur":  # RandomGaussianBlur(): radius (= kernel size) 5, p = 0.5 fixed
    return T.RandomGaussianBlur()
  if kind == "RandomHorizontalFlip":
    return T.RandomHorizontalFlip()
  if kind == "Crop":  # Crop([s, s], crop_type='rand', padding=mean, ignore_label=255)
    return T.RandomCrop(size=(meta["size"], meta["size"]))
  raise KeyError(kind)


def _run_sccan_case(case, op=None):
  cases, metas = _fixture("sccan_ops")
  a = cases[case]
  op = op or _sccan_op(metas[case])
  rng = Replay(a)
  out = op.random_map(_query(a), rng)
  rng.done()
  _check_query(out, a)


@pytest.mark.parametrize("case", _cases("sccan_ops"))
def test_single_ops_match_official(case):
  _run_sccan_case(case)


def test_draw_then_apply_is_random_map():
  cases, metas = _fixture("sccan_ops")
  a = cases["rotate_pos"]
  op = _sccan_op(metas["rotate_pos"])
  params = op.draw(Replay(a), [a["label"]])
  assert params["angle"] == pytest.approx(-10 + 20 * 0.9)
  image, (label, label2) = op.apply(
    a["image"].astype(np.float32), [a["label"], a["label2"]], params
  )
  _assert_image(image, a["out_image"])
  _assert_label(label, a["out_label"])
  _assert_label(label2, a["out_label2"])
  crop = T.RandomCrop(size=(33, 33))
  r = Replay(cases["crop_retry"])
  assert crop.draw(r, [cases["crop_retry"]["label"]]) == {"top": 25, "left": 26}  # third pair kept
  r.done()


@pytest.mark.parametrize("case", _cases("sccan_test_resize"))
def test_test_resize_matches_official(case):
  """§9.1 ``Resize`` (aspect, each side floored to a multiple of 8, zero / 255 canvas)."""
  cases, metas = _fixture("sccan_test_resize")
  a = cases[case]
  out = T.AspectResizePad(size=metas[case]["size"]).map(_query(a))
  _check_query(out, a)
  assert out["query_image"].dtype == np.float32 and out["query_mask"].dtype == np.uint8


@pytest.mark.parametrize("case", _cases("hdmnet_squash"))
def test_squash_matches_hdmnet(case):
  cases, metas = _fixture("hdmnet_squash")
  a = cases[case]
  s = metas[case]["size"]
  out = T.SquashResize(size=tuple(s) if isinstance(s, list) else (s, s)).map(_query(a))
  _check_query(out, a)


# -- whole training chains -------------------------------------------------------------------------------


def _episode(a, shots):
  ep = _query(a)
  ep["support_images"] = [a[f"s{k}_image"].astype(np.float32) for k in range(shots)]
  ep["support_masks"] = [a[f"s{k}_label"] for k in range(shots)]
  return ep


@pytest.mark.parametrize(
  "name,case", [(n, c) for n in ("sccan_chain", "hdmnet_chain") for c in _cases(n)]
)
def test_family_chains_match_official(name, case):
  """BAM/HDMNet ``SemData``: query (image, label, base label) through the tri chain, then
  each support through the pair chain, one ``random`` stream; SCCAN = crop, HDMNet =
  squash; ``ToTensor`` + ``Normalize`` last."""
  cases, metas = _fixture(name)
  a, m = cases[case], metas[case]
  ops = T.train_ops(
    m["size"],
    scale=tuple(m["scale"]),
    rotate=tuple(m["rotate"]),
    blur=m["blur"],
    resize=m["resize"],
  )
  rng = Replay(a)
  out = T.apply_ops(_episode(a, m["shots"]), ops, rng)
  rng.done()
  _check_query(out, a, normalised=True)
  for k in range(m["shots"]):
    _assert_image(out["support_images"][k], a[f"s{k}_out_image"], f"support {k}", scale=STD)
    _assert_label(out["support_masks"][k], a[f"s{k}_out_label"], f"support {k} mask")


def _recipe_ops(size, recipe, c=None):
  """train_ops with PANet's / SSP's settings (from the config ``c`` when given)."""
  if c is None:
    return T.train_ops(size, scale=(1.0, 1.0), rotate=(0.0, 0.0), blur=0.0, resize=recipe)
  d = c.data
  return T.train_ops(size, scale=d.scale, rotate=d.rotate, blur=d.blur, resize=d.train_resize)


# SSP's crop draws x (left) before y (top); ours top before left: replay in that order.
_SSP_ORDER = [1, 0, 2]


def _check_recipe(recipe, case, ops):
  cases, metas = _fixture(f"{recipe}_chain")
  a = cases[case]
  ep = {"query_image": a["image"].astype(np.float32), "query_mask": a["label"]}
  order = _SSP_ORDER if recipe == "ssp" else None
  rng = Replay(a, order)
  pre = T.apply_ops(ep, ops[:-2], rng)  # before Normalize, ToArrays
  rng.done()
  _assert_image(pre["query_image"], a["pre_image"], "image before normalisation")
  _assert_label(pre["query_mask"], a["out_label"])
  rng = Replay(a, order)
  out = T.apply_ops(ep, ops, rng)
  _assert_image(out["query_image"], a["out_image"], "normalised image", scale=STD)
  _assert_label(out["query_mask"], a["out_label_tensor"])


@pytest.mark.parametrize(
  "recipe,case", [(r, c) for r in ("panet", "ssp") for c in _cases(f"{r}_chain")]
)
def test_panet_and_ssp_recipes_match_official(recipe, case):
  """PANet: ``Compose([Resize(size), RandomMirror()])`` on PIL images, then
  ``ToTensorNormalize``; SSP: ``crop(img, mask, size)``, ``hflip``, ``normalize``."""
  size = _fixture(f"{recipe}_chain")[1][case]["size"]
  _check_recipe(recipe, case, _recipe_ops(tuple(size) if isinstance(size, list) else size, recipe))


@pytest.mark.parametrize("method", ["panet", "ssp"])
def test_configured_recipes_match_official(method):
  """The chain configs/<method>.py trains with (its scale / rotate / blur / resize at the
  fixtures' size) against the official one."""
  c = importlib.import_module(f"configs.{method}").get_config()
  assert c.data.train_resize == method, c.data.train_resize
  for case in _cases(f"{method}_chain"):
    size = _fixture(f"{method}_chain")[1][case]["size"]
    _check_recipe(
      method, case, _recipe_ops(tuple(size) if isinstance(size, list) else size, method, c)
    )


# -- the fixtures catch wrong ops -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _NearestExactScale(T.RandScale):
  def apply(self, image, labels, params):
    s = params["scale"]
    return (
      cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR),
      [cv2.resize(l, None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST_EXACT) for l in labels],
    )


@dataclasses.dataclass(frozen=True)
class _CornerCentreRotate(T.RandRotate):
  def apply(self, image, labels, params):
    h, w = labels[0].shape
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), params["angle"], 1)
    return (
      cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=self.border),
      [cv2.warpAffine(l, m, (w, h), flags=cv2.INTER_NEAREST, borderValue=255) for l in labels],
    )


@dataclasses.dataclass(frozen=True)
class _InverseRotate(T.RandRotate):
  def apply(self, image, labels, params):
    h, w = labels[0].shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), params["angle"], 1)
    f = cv2.WARP_INVERSE_MAP
    return (
      cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR | f, borderValue=self.border),
      [cv2.warpAffine(l, m, (w, h), flags=cv2.INTER_NEAREST | f, borderValue=255) for l in labels],
    )


@dataclasses.dataclass(frozen=True)
class _VerticalFlip(T.RandomHorizontalFlip):
  def apply(self, image, labels, params):
    if params["flip"]:
      return cv2.flip(image, 0), [cv2.flip(l, 0) for l in labels]
    return image, labels


@dataclasses.dataclass(frozen=True)
class _FlipAtHalf(T.RandomHorizontalFlip):
  def draw(self, rng, labels):
    return {"flip": bool(rng.random() <= self.p)}


@dataclasses.dataclass(frozen=True)
class _ExclusiveCrop(T.RandomCrop):
  def offsets(self, labels0, rng):
    (ch, cw), (h, w) = T._size_hw(self.size), labels0.shape
    return int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))


_MUTANTS = [
  ("label nearest rounding", "scale_up", _NearestExactScale(scale=(0.9, 1.1))),
  ("rotation centre (w-1)/2", "rotate_pos", _CornerCentreRotate()),
  ("rotation direction", "rotate_neg", _InverseRotate()),
  ("rotation image border 0", "rotate_pos", T.RandRotate(border=(0.0, 0.0, 0.0))),
  ("rotation label border 0", "rotate_neg", T.RandRotate(ignore_label=0)),
  ("blur kernel 3", "blur_on", T.RandomGaussianBlur(ksize=3)),
  ("blur kernel 7", "blur_on", T.RandomGaussianBlur(ksize=7)),
  ("flip axis", "flip_on", _VerticalFlip()),
  ("flip when u = p", "flip_off", _FlipAtHalf()),
  ("crop pad value 0", "crop_pad_rows", T.RandomCrop(size=(41, 41), pad_value=(0.0, 0.0, 0.0))),
  ("crop pad bottom/right", "crop_pad_odd", T.RandomCrop(size=(46, 46), pad="end")),
  ("crop label pad 0", "crop_pad_both", T.RandomCrop(size=(39, 39), ignore_label=0)),
  ("crop offsets exclusive", "crop_no_object", _ExclusiveCrop(size=(33, 33))),
  ("crop without the 85 % rule", "crop_retry", T.RandomCrop(size=(33, 33), retries=0)),
  ("crop keep rule 50 %", "crop_retry", T.RandomCrop(size=(33, 33), min_keep=0.5)),
  ("crop 30 retries", "crop_exhaust", T.RandomCrop(size=(33, 33), retries=30)),
]


@pytest.mark.parametrize("what,case,op", _MUTANTS, ids=[m[0] for m in _MUTANTS])
def test_fixtures_catch_a_wrong_op(what, case, op):
  with pytest.raises(AssertionError):
    _run_sccan_case(case, op)


def test_fixtures_catch_wrong_recipes():
  with pytest.raises(AssertionError):  # OpenCV instead of PIL resampling
    _check_recipe(
      "panet",
      "down_both_flip",
      [T.SquashResize((41, 41)), T.RandomHorizontalFlip(), T.Normalize(), T.ToArrays()],
    )
  with pytest.raises(AssertionError):  # PFENet's symmetric mean padding
    _check_recipe(
      "ssp",
      "pad_both",
      [T.RandomCrop((41, 41), retries=0), T.RandomHorizontalFlip(), T.Normalize(), T.ToArrays()],
    )
  with pytest.raises(AssertionError):  # flip before the crop (the padding side changes)
    _check_recipe(
      "ssp",
      "pad_rows",
      [
        T.RandomHorizontalFlip(),
        T.RandomCrop((41, 41), pad_value=(0, 0, 0), retries=0, pad="end"),
        T.Normalize(),
        T.ToArrays(),
      ],
    )
  with pytest.raises(AssertionError):  # test resize onto a mean canvas
    a = _fixture("sccan_test_resize")[0]["wide"]
    out = T.AspectResizePad(41).map(_query(a))
    out["query_image"][out["query_mask"] == 255] = np.float32(T.MEAN)
    _check_query(out, a)


# -- distributions of the draws ---------------------------------------------------------------------------

N = 4000


def _draws(op, labels=(np.zeros((8, 8), np.uint8),), seed=0, n=N):
  rng = np.random.default_rng(seed)
  return [op.draw(rng, list(labels)) for _ in range(n)]


def _ks_uniform(x, lo, hi):
  """Kolmogorov-Smirnov distance of samples ``x`` to U[lo, hi)."""
  x = np.sort((np.asarray(x) - lo) / (hi - lo))
  n = len(x)
  return max(np.max(np.arange(1, n + 1) / n - x), np.max(x - np.arange(n) / n))


def _binomial_ok(k, n, p, z=4.0):
  return abs(k - n * p) <= z * np.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("scale", [(0.9, 1.1), (0.8, 1.25), (0.5, 2.0)])
def test_scale_is_uniform(scale):
  """Official RandScale: s = lo + (hi - lo) * random.random(), s ~ U[lo, hi), both axes."""
  s = np.array([d["scale"] for d in _draws(T.RandScale(scale=scale))])
  lo, hi = scale
  assert s.min() >= lo and s.max() < hi
  assert _ks_uniform(s, lo, hi) < 1.95 / np.sqrt(N)  # KS at alpha = 0.001


def test_rotate_probability_and_angle():
  """Official RandRotate: ``random.random() < p`` (p = 0.5), then angle = lo + (hi - lo) *
  random.random() ~ U[-10, 10)."""
  op = [o for o in T.train_ops(41) if isinstance(o, T.RandRotate)][0]
  assert (op.angle, op.p, op.ignore_label) == ((-10.0, 10.0), 0.5, 255)
  assert np.allclose(op.border, [0.485 * 255, 0.456 * 255, 0.406 * 255])
  a = [d["angle"] for d in _draws(op)]
  on = np.array([x for x in a if x is not None])
  assert _binomial_ok(len(on), N, 0.5)
  assert on.min() >= -10 and on.max() < 10 and _ks_uniform(on, -10, 10) < 1.95 / np.sqrt(len(on))


def test_blur_probability_and_kernel():
  """Official RandomGaussianBlur(radius=5): ``random.random() < 0.5`` then
  ``cv2.GaussianBlur(image, (5, 5), 0)``: a 5x5 kernel, sigma from OpenCV's rule (its
  fixed [1, 4, 6, 4, 1] / 16 table for k = 5)."""
  op = [o for o in T.train_ops(41) if isinstance(o, T.RandomGaussianBlur)][0]
  assert (op.ksize, op.p) == (5, 0.5)
  assert _binomial_ok(sum(d["blur"] for d in _draws(op)), N, 0.5)
  x = np.zeros((9, 9, 3), np.float32)
  x[4, 4] = 256
  y = op.apply(x, [], {"blur": True})[0][..., 0]
  k = np.array([1, 4, 6, 4, 1]) / 16
  assert np.allclose(y[2:7, 2:7], 256 * np.outer(k, k)) and (y[:2] == 0).all()


@pytest.mark.parametrize("recipe", ["crop", "squash", "panet", "ssp"])
def test_flip_probability(recipe):
  """Official RandomHorizontalFlip / PANet RandomMirror / SSP hflip: ``random.random() < 0.5``."""
  op = [o for o in T.train_ops(41, resize=recipe) if isinstance(o, T.RandomHorizontalFlip)][0]
  assert op.p == 0.5
  assert _binomial_ok(sum(d["flip"] for d in _draws(op)), N, 0.5)


def _offset_counts(op, label, seed=0, n=N):
  c = {}
  for d in _draws(op, [label], seed, n):
    c[(d["top"], d["left"])] = c.get((d["top"], d["left"]), 0) + 1
  return c


@pytest.mark.parametrize("recipe", ["crop", "ssp"])
def test_crop_offsets_are_uniform(recipe):
  """Official Crop (rand) / SSP crop: h_off = randint(0, H - ch), w_off = randint(0, W - cw),
  both inclusive, after padding; with no label-1 pixel (or for SSP, always) the first draw
  is kept, so every offset pair has probability 1 / ((H - ch + 1)(W - cw + 1))."""
  op = [o for o in T.train_ops(6, resize=recipe) if isinstance(o, T.RandomCrop)][0]
  label = np.zeros((10, 12), np.uint8)
  label[:2] = 255
  c = _offset_counts(op, label)
  cells = [(t, l) for t in range(5) for l in range(7)]
  assert sorted(c) == cells, "offsets cover exactly the inclusive ranges"
  f = np.array([c[k] for k in cells])
  chi2 = ((f - N / len(cells)) ** 2 / (N / len(cells))).sum()
  assert chi2 < 65.0  # chi-square, 34 dof, alpha = 0.001
  # a label smaller than the crop: padded first, so the only offset is (0, 0)
  assert _offset_counts(op, np.zeros((4, 5), np.uint8), n=50) == {(0, 0): 50}


def test_crop_retry_rule_distribution():
  """Official Crop: redraw while the crop keeps < 85 % of the label-1 pixels, at most 31
  redraws, the last kept: offsets are uniform over the crops that keep >= 85 % (here the
  object fits in every crop whose top <= 2 and left <= 3)."""
  op = T.train_ops(6)[-3]
  assert isinstance(op, T.RandomCrop) and (op.min_keep, op.retries, op.pad) == (0.85, 31, "center")
  label = np.zeros((10, 12), np.uint8)
  label[3:6, 4:8] = 1
  c = _offset_counts(op, label)
  keep = [
    (t, l)
    for t in range(5)
    for l in range(7)
    if (label[t : t + 6, l : l + 6] == 1).sum() >= 0.85 * 12
  ]
  # P(all 32 draws miss) = (1 - 12 / 35) ** 32 ~ 1.5e-6: every episode lands in `keep`
  assert sorted(c) == sorted(keep) and len(keep) == 12
  f = np.array([c[k] for k in keep])
  assert ((f - N / 12) ** 2 / (N / 12)).sum() < 31.3  # chi-square, 11 dof, alpha = 0.001


def test_recipe_chains_and_defaults():
  """The four §8 size normalisations, in the official order of flip and resize."""
  kinds = lambda ops: [type(o).__name__ for o in ops]
  bare = dict(scale=(1, 1), rotate=(0, 0), blur=0.0)
  assert kinds(T.train_ops(41, **bare, resize="panet"))[:2] == [
    "SquashResize",
    "RandomHorizontalFlip",
  ]
  assert kinds(T.train_ops(41, **bare, resize="ssp"))[:2] == ["RandomCrop", "RandomHorizontalFlip"]
  assert kinds(T.train_ops(41, **bare, resize="crop"))[:2] == ["RandomHorizontalFlip", "RandomCrop"]
  assert T.train_ops(41, **bare, resize="panet")[0].backend == "pil"
  ssp = T.train_ops(41, **bare, resize="ssp")[0]
  assert (ssp.pad, ssp.pad_value, ssp.ignore_label, ssp.retries) == ("end", (0.0, 0.0, 0.0), 255, 0)
  assert set(T.TRAIN_RESIZES) == {"crop", "squash", "panet", "ssp"}
  with pytest.raises(ValueError, match="train resize"):
    T.train_ops(41, resize="pil")
  with pytest.raises(ValueError, match="backend"):
    T.SquashResize(backend="torch")
