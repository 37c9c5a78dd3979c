"""The web demo (standard library HTTP server): ``tag2mask serve``."""
