"""Batch prediction over many files on Ray Data (optional extra: ``pip install 'deebert-cli[ray]'``):
``predictor`` (DeeBertPredictor, the ``map_batches`` callable, and require_ray), ``readers`` (the input
files: expansion, column checks, chunked readers) and ``pipeline`` (predict_dataset and
PredictDatasetConfig, behind ``deebert predict-dataset``). Imports runtime, model, config and the leaves;
never analysis or train. Nothing else in deebert imports it, and it imports ray only inside functions, so
the rest of the package works without the extra."""
