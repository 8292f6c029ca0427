"""TFDS builder for the Chest X-ray lung masks as PATNet's cross-domain test set (1 class, "test" only).

One record per lung mask, sorted by mask name; shuffling disabled. Layout and
checks: `data_prep.cross_domain.plan_chest_xray`. Build with
``python -m data_prep.build --dataset chest_xray --manual_dir M --data_dir D``.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from data_prep import cross_domain, raw

_DESCRIPTION = """\
Chest X-rays of the Shenzhen and Montgomery tuberculosis sets with manual lung masks
(Kaggle "Chest X-ray masks and labels"). Each record holds the original PNG, the lung
mask binarised as PATNet reads it (grey >= 128 -> 1) as an 8-bit PNG (0 background,
1 lung), and pixel counts [2] (background, lung).
"""

_CITATION = """\
@article{candemir2014lung, title={Lung Segmentation in Chest Radiographs Using Anatomical Atlases With Nonrigid
  Registration}, author={Candemir, Sema and others}, journal={IEEE TMI}, year={2014}}
@article{jaeger2014tb, title={Automatic Tuberculosis Screening Using Chest Radiographs},
  author={Jaeger, Stefan and others}, journal={IEEE TMI}, year={2014}}
"""


class ChestXray(raw.FssBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """Chest X-ray lung segmentation (1 class, binary masks)."""

  FSS_DATASET = "chest_xray"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put the raw data in manual_dir as follows:
{cross_domain.CHEST_XRAY_LAYOUT}
Source: https://www.kaggle.com/datasets/nikhilpandey360/chest-xray-masks-and-labels (PATNet's README).
"""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=_DESCRIPTION,
      features=self._fss_features(image_format="png"),
      homepage="https://www.ncbi.nlm.nih.gov/pmc/articles/PMC4256233/",
      citation=_CITATION,
      disable_shuffling=True,
    )
