"""The shared training engine: every method trains through these modules.

* `state`       TrainState (params, batch_stats, opt_state, step, rng), init, strict weight
                loading, the converted-checkpoint format;
* `optim`       optax recipes of the references (SGD + coupled L2, AdamW, poly / multistep,
                warm-up, lr multipliers, parameter groups, frozen subtrees) from ``config.optim``;
* `precision`   compute dtypes (float32 / bfloat16) and what stays float32;
* `step`        the pure train / eval / predict steps and their jit + NamedSharding wrappers
                (losses come from the model's spec, built on `fss_jax.ops.losses`);
* `loop`        the training run: resume order, steps, logging, periodic validation, stops
                (NaN/Inf, signals);
* `checkpointing` orbax managers, checkpoint metadata, restore checks, best checkpoint,
                failed saves;
* `data`        `Data` and `make_data`: the loaders and stored test episodes a run reads;
* `workdir`     the workdir lock, run records and clean-up of unfinished saves;
* `jc2a_prior`  JC²A's FP_base prototypes (the prior command and the `derived_params` hook).
"""
