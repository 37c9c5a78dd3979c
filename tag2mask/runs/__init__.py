"""The run folder shared by training and inference: its layout, checkpoint reading, RNG state, old formats."""
