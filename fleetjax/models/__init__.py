"""Models built on the op, and what trains them: the application layer of fleetjax.

    data        the Python standard library's source as byte-level training text (offline)
    lm          a byte-level language model of fleetjax.nn.FleetAttention blocks (or a softmax baseline),
                its optimizer, a jit-compiled Trainer, and generation from the decoding cache
    checkpoint  the model and optimizer state on disk (orbax-checkpoint)
    options     one training run's settings and size presets, plain data without JAX
    train       a whole run: data, training, evaluation, log, loss plot, checkpoint, sample

The layers below never import this package: the op (fleetjax.api and what it imports) and fleetjax.nn stand
without it, and fleetjax.cli sits above it.
"""
