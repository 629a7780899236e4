"""Models built from stock Flax NNX layers, with importers for published checkpoints."""

from lowacc._extras import require

require('lowacc.models', 'models', ('flax', 'safetensors', 'tokenizers'))
