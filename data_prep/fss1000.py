"""TFDS builder for FSS-1000 (1000 classes; train / val / test = 520 / 240 / 240 classes).

One record per image of a class folder, in PATNet / HSNet order (classes sorted
within each split, files sorted by name); shuffling disabled. Layout and checks:
`data_prep.cross_domain.plan_fss1000`. Build with
``python -m data_prep.build --dataset fss1000 --manual_dir M --data_dir D``.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from data_prep import cross_domain, raw

_DESCRIPTION = """\
FSS-1000 (1000 object classes, 10 images each with a binary mask) in the class splits
of HSNet / PATNet: train 520, val 240, test 240 classes (PATNet's cross-domain test set
is the test split). Each record holds the original JPEG, the mask binarised as PATNet
reads it (grey >= 128 -> 1) as an 8-bit PNG (0 background, 1 object), and pixel counts
[C + 1] with the background in column 0 and the object in its class column
(class id = position in sorted(train) + sorted(val) + sorted(test), + 1).
"""

_CITATION = """\
@inproceedings{li2020fss1000, title={FSS-1000: A 1000-Class Dataset for Few-Shot Segmentation},
  author={Li, Xiang and Wei, Tianhan and Chen, Yau Pun and Tai, Yu-Wing and Tang, Chi-Keung},
  booktitle={CVPR}, year={2020}}
"""


class Fss1000(raw.FssBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """FSS-1000 (records in PATNet's order; 1000 classes, binary masks)."""

  FSS_DATASET = "fss1000"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put the raw data in manual_dir as follows:
{cross_domain.FSS1000_LAYOUT}
Source: fewshot_data.zip from https://github.com/HKUSTCV/FSS-1000 (PATNet's README links it).
"""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=_DESCRIPTION,
      features=self._fss_features(),
      homepage="https://github.com/HKUSTCV/FSS-1000",
      citation=_CITATION,
      disable_shuffling=True,
    )
