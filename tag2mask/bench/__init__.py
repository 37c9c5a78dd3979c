"""``tag2mask bench``'s harness: methods on the 8 standard benchmarks, scored as the papers do.

A shared layer: it imports nothing from ``tag2mask.methods`` or ``tag2mask.cli`` and names no method.
:mod:`.datasets` reads mmseg's prepared layouts (VOC21/20, PC60/59, COCO-Object, COCO-Stuff,
Cityscapes, ADE20K) with the papers' class counts, ignore index and background handling, and ships the
official name sets. :mod:`.harness` runs each (dataset, method) cell on the batch-job runner and scores
it; :mod:`.runner` plans the cells with a caller's :class:`~tag2mask.bench.runner.MethodSource` (the
command builds one from the method registry: :mod:`tag2mask.cli.bench_methods`); :mod:`.report` writes
the tables and the HTML page. See ``docs/bench.md``.
"""
