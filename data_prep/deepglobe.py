"""TFDS builder for DeepGlobe land cover as PATNet's cross-domain test set (6 classes, "test" only).

One record per (class folder, tile) of PATNet's preprocessed tiles, classes 1..6 in
order, tiles sorted by name; shuffling disabled. Layout and checks:
`data_prep.cross_domain.plan_deepglobe`. Build with
``python -m data_prep.build --dataset deepglobe --manual_dir M --data_dir D``.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from data_prep import cross_domain, raw

_DESCRIPTION = """\
DeepGlobe 2018 land-cover satellite images, cut by PATNet into 408x408 tiles and sorted
into one folder per class (1 agriculture, 2 urban, 3 rangeland, 4 forest, 5 water,
6 barren). A tile showing several classes gives one record per class. Each record holds
the original JPEG, the class's mask binarised as PATNet reads it (grey >= 128 -> 1) as
an 8-bit PNG (0 background, 1 class), and pixel counts [7] with the background in
column 0 and the class in its column.
"""

_CITATION = """\
@inproceedings{demir2018deepglobe, title={DeepGlobe 2018: A Challenge to Parse the Earth Through Satellite Images},
  author={Demir, Ilke and others}, booktitle={CVPR Workshops}, year={2018}}
@inproceedings{lei2022cdfss, title={Cross-Domain Few-Shot Semantic Segmentation},
  author={Lei, Shuo and Zhang, Xuchao and He, Jianfeng and Chen, Fanglan and Du, Bowen and Lu, Chang-Tien},
  booktitle={ECCV}, year={2022}}
"""


class Deepglobe(raw.FssBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """DeepGlobe (PATNet's tiles; 6 classes, binary masks)."""

  FSS_DATASET = "deepglobe"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put the raw data in manual_dir as follows:
{cross_domain.DEEPGLOBE_LAYOUT}
Source: the "Preprocessed Data" link of https://github.com/slei109/PATNet (README, Deepglobe).
"""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=_DESCRIPTION,
      features=self._fss_features(),
      homepage="http://deepglobe.org/",
      citation=_CITATION,
      disable_shuffling=True,
    )
