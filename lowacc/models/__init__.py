"""Models built from stock Flax NNX layers, with importers for published checkpoints."""
