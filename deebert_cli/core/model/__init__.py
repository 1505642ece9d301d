"""The model and its files: ``policies`` (RampConfig, entropy and the exit policies, written against the
array API: no torch, the ONNX runtime uses them), ``ramps`` (the off-ramp module), ``families`` (one
adapter per transformers family), ``highway`` (HighwayModel: a classifier with an off-ramp after every
layer) and ``checkpoint`` (the checkpoint folder, read and written atomically). Imports only the leaves
(errors, config, data, device, files, metrics, launch); torch only in ramps, families and highway, so
``policies`` and ``checkpoint`` import without it."""
