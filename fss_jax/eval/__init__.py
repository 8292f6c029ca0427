"""Few-shot segmentation evaluation (data_protocol.md §10).

* `metrics`   per-episode intersection / union at the original label resolution
              (jit-friendly), per-class accumulation, mIoU, FB-IoU, tables;
* `evaluate`  stored test episodes x several seeds -> mean ± std and a results JSON.
"""
