"""tag2mask: turn a frozen CLIP into a semantic segmenter without pixel labels."""

__version__ = "0.1.0"
