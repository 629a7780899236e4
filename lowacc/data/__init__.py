"""Input pipelines of the experiments: random-access sources (`images`, `text`) and one grain
loader (`pipeline.make_loader`) that shuffles, shards per JAX process, batches and resumes."""

from lowacc._extras import require

require('lowacc.data', 'data', ('absl', 'etils', 'grain', 'PIL', 'tensorflow_datasets', 'tokenizers'))
