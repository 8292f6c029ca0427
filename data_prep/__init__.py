"""Raw data -> TFDS datasets for few-shot segmentation (PASCAL-5i, COCO-20i).

* `data_prep.raw`: raw layout discovery, list parsing, checks, record generation.
* `data_prep.pascal5i`, `data_prep.coco20i`: the TFDS builders (array_record).
* `data_prep.build`: ``python -m data_prep.build --dataset {pascal5i,coco20i} --manual_dir M --data_dir D``.
* `data_prep.synthetic`: a tiny raw VOC / COCO twin (``python -m data_prep.synthetic``) and
  `data_prep.synthetic.make_built_dataset` (raw data + build in one call, for tests and the demo).

Submodules are imported on demand (importing this package imports neither TFDS nor OpenCV).
"""
