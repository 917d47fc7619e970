#!/usr/bin/env bash
# Fetch CIFAR-10 once into the Keras cache (~/.keras/datasets, or $KERAS_HOME/datasets)
# and verify its SHA-256. Does nothing if a valid copy is already there.
# Without network access the examples still run on the embedded Fashion-MNIST subset.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON="${PYTHON:-python3}"
if "$PYTHON" src/cifar10_data.py --download; then
    exit 0
fi
echo "prepare_data.sh: CIFAR-10 is not available; the examples will fall back to the" \
    "embedded Fashion-MNIST subset (data/fashion_mnist_subset.npz). To use CIFAR-10," \
    "rerun this script with network access, or set FEDLIFT_CIFAR10 to a copy of" \
    "cifar-10-python.tar.gz." >&2
exit 1
