"""PASCAL-5i / COCO-20i data: built splits, folds and lists, episodes, transforms, loaders.

Modules (imported on demand; nothing here is model-specific):

* `source`     random access to a split built by ``python -m data_prep.build``;
* `splits`     fold class lists (§4) and the per-fold query/support lists (§5.1);
* `episodes`   deterministic episode sampling (§7) and stored JSON-lines test episodes
               (``python -m fss_jax.data.episodes``);
* `transforms` grain ops: §8 training augmentation, §9 test resize, normalisation;
* `pipeline`   `EpisodeConfig` and the grain loaders (`make_train_loader`,
               `make_eval_loader`, `make_base_train_loader`).
"""
