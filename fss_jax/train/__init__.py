"""The shared training engine: every method trains through these modules.

* `state`   TrainState (params, batch_stats, opt_state, step, rng), init, strict weight loading;
* `optim`   optax recipes of the references (SGD + coupled L2, AdamW, poly / multistep,
            warm-up, lr multipliers, parameter groups, frozen subtrees) from ``config.optim``;
* `losses`  CE with ignore 255, SCCAN's Dice, weighted sums;
* `step`    the pure train / eval steps and their jit + NamedSharding wrappers;
* `loop`    checkpoints, resume, logging, periodic validation, ``--mode eval``.
"""
