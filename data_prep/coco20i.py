"""TFDS builder for COCO-20i: COCO 2014 JPEGs + 80-class index labels (PNG archive or rendered json).

One record per image, in list order (the optional ``train.txt`` / ``val.txt``,
else sorted file names); shuffling disabled. Label value k is the k-th COCO
category by ascending id (data_protocol.md §3.3). When rendering
``instances_*2014.json`` the choices of §3.2 are `raw.COCO_DRAW_CROWD` and
`raw.COCO_PAINT_ORDER`. Build with
``python -m data_prep.build --dataset coco20i --manual_dir M --data_dir D``.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from data_prep import raw

_DESCRIPTION = """\
COCO 2014 instance segmentation turned into 80-class semantic labels for the
few-shot protocol (COCO-20i). Each record holds the original JPEG, an 8-bit index
PNG label (0 background, 1..80 by ascending COCO category id, 255 ignore) and
per-class pixel counts at the original resolution.
"""

_CITATION = """\
@inproceedings{lin2014coco, title={Microsoft COCO: Common Objects in Context},
  author={Lin, Tsung-Yi and others}, booktitle={ECCV}, year={2014}}
@inproceedings{nguyen2019fwb, title={Feature Weighting and Boosting for Few-Shot Segmentation},
  author={Nguyen, Khoi and Todorovic, Sinisa}, booktitle={ICCV}, year={2019}}
"""


class Coco20i(raw.FssBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """COCO-20i (records in list order; 80 classes)."""

  FSS_DATASET = "coco20i"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put the raw data in manual_dir as follows:
{raw.COCO_LAYOUT}
Sources: train2014.zip, val2014.zip and annotations_trainval2014.zip from
https://cocodataset.org/#download; or the pre-rendered label PNG archives linked
from the PFENet / HSNet READMEs (github.com/dvlab-research/PFENet,
github.com/juhongm999/hsnet) together with PFENet's lists/coco/{{train,val}}.txt.
When rendering the json: crowd annotations drawn = {raw.COCO_DRAW_CROWD}, painting
order = {raw.COCO_PAINT_ORDER} (later instances overwrite earlier ones).
"""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=_DESCRIPTION,
      features=self._fss_features(),
      homepage="https://cocodataset.org",
      citation=_CITATION,
      disable_shuffling=True,
    )
