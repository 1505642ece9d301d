"""Inference over the model: ``rules`` (which exit rule, from options and the checkpoint), ``engine``
(the early-exit engines over a small Backend protocol), ``stream`` (lines in, predictions out, in input
order; loading a checkpoint for either runtime), ``torch_backend`` and ``onnx_backend`` (the two runtimes;
the onnx one imports no torch), ``tokenizer`` (tokenizer.json without transformers), ``export`` (the ONNX
graphs) and ``passes`` (the all-exits pass that analyze and stage 2 read). Imports model and the leaves;
nothing of analysis, train, serve or ray_data."""
