"""TFDS builder for PASCAL-5i: VOC2012 JPEGs + SegmentationClassAug index labels, PFENet lists.

One record per listed image, in list order (shuffling disabled); see
`data_prep.raw` for the record fields and checks. Build with
``python -m data_prep.build --dataset pascal5i --manual_dir M --data_dir D``.
Folds (PASCAL-5i) are applied when sampling episodes, so one build serves all.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from data_prep import raw
from fss_jax.data import splits

_DESCRIPTION = """\
PASCAL VOC 2012 + SBD augmented segmentation labels, in the PFENet/BAM few-shot
protocol (PASCAL-5i): train = voc_sbd_merge_noduplicate (5953 images), val =
VOC2012 segmentation val (1449 images). Each record holds the original JPEG, an
8-bit index PNG label (0 background, 1..20, 255 ignore) and per-class pixel
counts at the original resolution.
"""

_CITATION = """\
@article{shaban2017oneshot, title={One-Shot Learning for Semantic Segmentation},
  author={Shaban, Amirreza and Bansal, Shray and Liu, Zhen and Essa, Irfan and Boots, Byron},
  journal={BMVC}, year={2017}}
@inproceedings{hariharan2011sbd, title={Semantic contours from inverse detectors},
  author={Hariharan, Bharath and Arbel{\\'a}ez, Pablo and Bourdev, Lubomir and Maji, Subhransu and Malik, Jitendra},
  booktitle={ICCV}, year={2011}}
"""

CLASS_NAMES = splits.PASCAL_CLASS_NAMES


class Pascal5i(raw.FssBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """PASCAL-5i (records in list order; 20 classes)."""

  FSS_DATASET = "pascal5i"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put the raw data in manual_dir as follows (or under manual_dir/VOC2012/):
{raw.VOC_LAYOUT}
Sources: JPEGImages/ from VOCtrainval_11-May-2012.tar
(http://host.robots.ox.ac.uk/pascal/VOC/voc2012/); SegmentationClassAug/ and the two
lists from the PFENet repository (github.com/dvlab-research/PFENet: README link and
lists/pascal/voc_sbd_merge_noduplicate.txt -> train.txt, lists/pascal/val.txt -> val.txt).
"""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=_DESCRIPTION,
      features=self._fss_features(),
      homepage="https://github.com/dvlab-research/PFENet",
      citation=_CITATION,
      disable_shuffling=True,
    )
