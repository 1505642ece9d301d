"""The data a run reads, before any model: ``readers`` (data files, folders, ``save_to_disk`` folders, hub
datasets and the built-in default, as ``{column: list}`` tables), ``examples`` (which columns hold texts
and labels, label names, the evaluation split) and ``encoding`` (token ids, padded batches, length-sorted
order). A leaf package: it imports nothing of deebert but :mod:`..errors` (torch and datasets only inside
functions)."""
