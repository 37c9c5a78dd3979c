"""One folder per paper; :mod:`tag2mask.methods.registry` lists every method the CLI offers.

A method folder holds the paper's math, presets, data, training task, predictor, segmenter recipe
and CLI module, composed from the shared layers (``clip``, ``localization``, ``refinement``,
``engine``, ``segmenter``, ...); the shared layers never import a method. See docs/architecture.md.
"""
