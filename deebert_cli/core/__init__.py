"""Library layer of deebert: no typer/rich here; functions return data, the CLI renders it.

The packages follow the data path, and each imports only its own package or the layers below it
(tests/test_layering.py checks this, with no import circles, modules of at most 500 lines and functions
of at most 80 unless their docstring says why)::

    cli (deebert_cli/cli: one module per command)              may import anything
      train      finetune, train_exits, recipes, state        analysis (sweep, risk), runtime, model, leaves
      analysis   sweeps, risk control (the guarantee),        runtime, model, leaves
                 calibrate, analyze, plots
      serve      config, batching server, HTTP app, page      runtime, model, leaves
      ray_data   predictor, readers, pipeline                 runtime, model, leaves
      runtime    rules, engine, stream, backends, export,     model, leaves
                 tokenizer, the all-exits pass
      model      policies, ramps, families, highway,          leaves
                 checkpoint, the stored guarantee
      leaves     config (over data), launch (over device),    errors only, but for the two noted
                 data, files, device, metrics, errors

* ``errors``, ``files``, ``device``, ``metrics``: leaves; they import nothing of deebert but ``errors``.
* ``data``: reading data files, folders and hub datasets; examples, labels, splits; tokenising and padding.
* ``config``: the run configurations (dataclasses), over ``data`` and ``errors``.
* ``launch``: running under ``accelerate launch`` (processes, sharding, gathering), over ``device``.
* ``model``: the exit policies (no torch), the off-ramps, the family adapters, the highway model and its
  checkpoint folder.
* ``runtime``: inference: exit rules, the early-exit engines, predicting a stream of lines, the torch and
  ONNX backends (the ONNX path imports no torch), export, and the all-exits pass.
* ``analysis``: pure sweeps and risk control (Learn then Test) over an all-exits logits cache, and
  ``deebert analyze`` and ``deebert calibrate`` on top of them.
* ``train``: stage 1 and stage 2; it uses ``analysis.sweep`` and ``analysis.risk`` to choose an off-ramp
  recipe and certify its threshold.
* ``serve`` and ``ray_data``: serving and batch prediction over ``runtime``; they never import
  ``analysis`` or ``train``.

Package ``__init__`` modules hold a docstring only (no imports), so importing a module loads only what it
needs: torch stays out of the ONNX runtime's imports and of ``deebert --help``.
"""
