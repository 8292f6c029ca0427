"""Few-shot segmentation evaluation (data_protocol.md §10; docs/protocols.md).

* `metrics`   per-episode intersection / union at the original label resolution or the
              input size (jit-friendly), per-class accumulation, mIoU, FB-IoU, tables;
* `evaluate`  stored test episodes x several seeds -> mean ± std and a results JSON;
* `protocol`  test-protocol presets (pfenet_bam, hsnet, patnet_cd) resolved into fields,
              evaluation shot / way / dataset independent of training;
* `run`       ``--mode eval``: a trained or converted model's state -> results JSON +
              TensorBoard (`evaluate`, `load_for_eval`, `results_path`);
* `table`     results JSONs of many runs -> one Markdown / CSV table (mean ± std over seeds).
"""
