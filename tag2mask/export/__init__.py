"""Trained runs out of tag2mask: ONNX graphs with a JSON sidecar (``tag2mask export --onnx``) and the
onnxruntime predictor of ``tag2mask segment --onnx`` (docs/export.md).

``onnx_graph.py`` (what a method's export hook returns: :class:`ExportSpec`, the test-time-augmentation
wrapper :class:`TtaLogits`, :func:`export_onnx` writing the graph + sidecar), ``onnx_runtime.py``
(:class:`OnnxSegmenter`: NumPy pre/post-processing around an onnxruntime session, no torch model).
Hub-style run folders live with the run folders (:mod:`tag2mask.runs.hub`).
Each run kind's export hook lives with its method (registry ``RUN_EXPORTERS``); nothing here names one.
"""
