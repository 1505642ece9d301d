"""What a model's layers do, measured: ``sweep`` (the pure sweeps and recommendations over an all-exits
logits cache: no model, data or device), ``report`` (``deebert analyze``: one all-exits pass, the sweeps,
timed runs, stored thresholds) and ``plots`` (its figure). Imports runtime, model and the leaves; never
train, serve or ray_data (train imports ``sweep`` to choose its recipe)."""
