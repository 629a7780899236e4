"""Input pipelines of the experiments: random-access sources (`images`, `text`) and one grain
loader (`pipeline.make_loader`) that shuffles, shards per JAX process, batches and resumes."""
