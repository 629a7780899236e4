"""Entry point: python -m experiments.main --config=configs/demo.py --workdir=runs/demo

Overrides: --config.stage1.epochs=2; a tiny smoke run of any config: --config=configs/X.py:runlocal.
A mistake in the config or the workdir prints one line and exits with status 2 (experiments.cli).
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli, train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results; a run '
                    'resumes from what it finds there.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() first (several hosts).')
config_flags.DEFINE_config_file('config', None, 'An experiment config file (configs/*.py).',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if FLAGS.distributed:
    jax.distributed.initialize()
  train.run(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  cli.run(main)
