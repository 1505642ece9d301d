"""Training the model: ``stage1`` (finetune: backbone + final classifier), ``stage2`` (train_exits: the
off-ramps on one cached frozen pass, choosing among ``recipes``), ``ramps_fit`` (the off-ramp loop and loss,
calibration, learned-exit heads), ``state`` (resumable stage-1 state), ``tracking`` (TensorBoard / W&B) and
``common`` (Progress, TrainResult, EvalReport, seeding). The top layer of core: imports analysis (its pure
``sweep`` only, to score recipes), runtime, model and the leaves; nothing imports train but the CLI."""
