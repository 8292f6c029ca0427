"""Raw data -> TFDS datasets for few-shot segmentation (PASCAL-5i, COCO-20i, cross-domain test sets).

* `data_prep.raw`: raw layout discovery, list parsing, checks, record generation.
* `data_prep.pascal5i`, `data_prep.coco20i`: the TFDS builders (array_record).
* `data_prep.cross_domain`: the layouts of FSS-1000, DeepGlobe, ISIC-2018 and Chest X-ray as PATNet
  reads them; their builders `data_prep.fss1000`, `deepglobe`, `isic2018`, `chest_xray`.
* `data_prep.build`: ``python -m data_prep.build --dataset <name> --manual_dir M --data_dir D``.
* `data_prep.synthetic`: tiny raw twins of every layout (``python -m data_prep.synthetic`` for VOC /
  COCO, `write_fss1000` & co. for the cross-domain sets), and `make_built_dataset` /
  `make_built_cross_domain` (raw data + build in one call, for tests and the demo).

Submodules are imported on demand (importing this package imports neither TFDS nor OpenCV).
"""
