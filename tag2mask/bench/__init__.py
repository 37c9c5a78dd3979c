"""``tag2mask bench``: every open-vocabulary method on the 8 standard benchmarks, scored as the papers do.

:mod:`.datasets` reads mmseg's prepared layouts (VOC21/20, PC60/59, COCO-Object, COCO-Stuff,
Cityscapes, ADE20K) with the papers' class counts, ignore index and background handling, and ships the
official name sets; it imports nothing from ``tag2mask.methods`` or ``tag2mask.cli``. :mod:`.harness`
runs each (dataset, method) cell on the batch-job runner and scores it; :mod:`.report` writes the
tables and the HTML page. See ``docs/bench.md``.
"""
