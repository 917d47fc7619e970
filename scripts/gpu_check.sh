#!/usr/bin/env bash
# Prove the GPU paths on a machine with NVIDIA GPUs (one short run, ~2 minutes):
#   1. -gpu 0,0: two Keras clients share GPU 0 (memory growth on), each sees exactly GPU 0;
#   2. a MirroredStrategy client (--launch_process) on all visible GPUs;
#   3. with a CUDA build of torch: send() of CUDA tensors (one device-to-host copy), and the
#      PyTorch CIFAR-10 job with its clients on GPU 0.
# Usage: bash scripts/gpu_check.sh [PYTHON]   (PYTHON must have fedlift[tf] with CUDA TF)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
WS="$(mktemp -d /tmp/fedlift-gpu-XXXX)"
export FEDLIFT_DATASET=embedded TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi -L
"$PY" -c "import tensorflow as tf; print('TF GPUs:', tf.config.list_physical_devices('GPU'))"
cd examples/cifar10-tf
"$PY" tf_client_api_job.py --export_config --job_root "$WS/jobs" --num_rounds 2 \
    --script_args "--max_train 2000 --max_test 500"
"$PY" -m fedlift simulator -n 2 -gpu 0,0 -w "$WS/ws1" "$WS/jobs/cifar10_tf_fedavg"
grep -h "GPU" "$WS"/ws1/site-*/log.txt | head -5 || true
"$PY" tf_client_api_job.py --script src/cifar10_tf_multi_gpu_fl.py --launch_process \
    --num_rounds 2 --workspace "$WS/ws2" --gpu 0 --script_args "--max_train 2000 --max_test 500"
grep -h "Number of replicas in sync" "$WS"/ws2/site-*/log.txt
cd ../..
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    "$PY" -m pytest -q tests/test_pytorch_params.py -k gpu_tensors
    cd examples/cifar10-pt
    "$PY" pt_client_api_job.py --num_rounds 2 --workspace "$WS/ws3" --gpu 0,0 \
        --script_args "--max_train 2000 --max_test 500"
    cd ../..
else
    echo "gpu_check: torch has no CUDA here; the PyTorch GPU paths were not run"
fi
echo "gpu_check: OK (workspaces in $WS)"
