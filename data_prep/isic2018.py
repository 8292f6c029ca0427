"""TFDS builder for ISIC 2018 task 1 as PATNet's cross-domain test set (3 classes, "test" only).

One record per training image, classes 1..3 in order, images sorted by name;
shuffling disabled. Layout and checks: `data_prep.cross_domain.plan_isic2018`. Build with
``python -m data_prep.build --dataset isic2018 --manual_dir M --data_dir D``.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from data_prep import cross_domain, raw

_DESCRIPTION = """\
ISIC 2018 task 1 (lesion boundary segmentation) training images, each classed as
1 nevus, 2 melanoma or 3 seborrheic_keratosis (PATNet's data/isic/class_id.csv). Each
record holds the original JPEG, the lesion mask binarised as PATNet reads it
(grey >= 128 -> 1) as an 8-bit PNG (0 skin, 1 lesion), and pixel counts [4] with the
background in column 0 and the lesion in its class column.
"""

_CITATION = """\
@article{codella2019isic, title={Skin Lesion Analysis Toward Melanoma Detection 2018: A Challenge Hosted by the
  International Skin Imaging Collaboration (ISIC)}, author={Codella, Noel and others},
  journal={arXiv:1902.03368}, year={2019}}
@article{tschandl2018ham10000, title={The HAM10000 dataset, a large collection of multi-source dermatoscopic images
  of common pigmented skin lesions}, author={Tschandl, Philipp and Rosendahl, Cliff and Kittler, Harald},
  journal={Scientific Data}, year={2018}}
"""


class Isic2018(raw.FssBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """ISIC 2018 task 1 (3 classes, binary lesion masks)."""

  FSS_DATASET = "isic2018"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put the raw data in manual_dir as follows:
{cross_domain.ISIC2018_LAYOUT}
Source: ISIC2018_Task1-2_Training_Input.zip and ISIC2018_Task1_Training_GroundTruth.zip from
https://challenge.isic-archive.com/data/#2018.
"""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=_DESCRIPTION,
      features=self._fss_features(),
      homepage="https://challenge.isic-archive.com/landing/2018/",
      citation=_CITATION,
      disable_shuffling=True,
    )
