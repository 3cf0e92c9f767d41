#!/usr/bin/env bash
# The GPU check: CuPy preprocessing, onnxruntime CUDA encoding, GPU k-means and end-to-end picking per
# 4096^2 micrograph, each beside the CPU of the same machine in the same run; the gpu-marked tests first
# (every GPU result against its CPU reference). About 5 minutes on an H100/H200 class GPU.
#
#   bench/gpu_check.sh            # from the repository root, with CuPy and (for CUDA encoding) onnxruntime-gpu
#
# Results: bench/results/{preprocess,encode,kmeans,pick}-*.json named after the device, and gpu_check.log
# (everything printed). With $OUT set, they are copied there too. Each step runs even when one before failed;
# the exit status is the number of failed steps.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
results=bench/results
log=$results/gpu_check.log
mkdir -p "$results"
: >"$log"
failed=0

step() {  # step NAME COMMAND...: run, log, count a failure
    local name=$1; shift
    echo "== $name: $*" | tee -a "$log"
    local start=$SECONDS
    "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

slug=$($python -c 'import cupy; p = cupy.cuda.runtime.getDeviceProperties(0)["name"]; print((p.decode() if isinstance(p, bytes) else p).lower().replace(" ", "-"))' 2>/dev/null || echo unknown-gpu)

step machine bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; $python -c 'import onnxruntime as o, cupy, numpy; print(\"onnxruntime\", o.__version__, o.get_device(), \"cupy\", cupy.__version__, \"numpy\", numpy.__version__)'"
step tests "$python" -m pytest -q -p no:cacheprovider -m gpu tests
step preprocess "$python" bench/preprocess.py --repeats 5 --sizes 4096x4096 --no-baseline --output "$results/preprocess-$slug.json"
step encode "$python" bench/encode.py --gpu --repeats 10 --output "$results/encode-$slug.json"
step kmeans "$python" bench/kmeans.py --repeats 2
step pick-gpu "$python" bench/pick.py --device gpu --count 4 --sizes 1024 4096 --output "$results/pick-$slug.json"
step pick-cpu "$python" bench/pick.py --device cpu --count 4 --sizes 4096 --output "$results/pick-cpu-on-$slug-host.json"

if [ -n "${OUT:-}" ]; then
    cp "$log" "$results"/*"$slug"*.json "$OUT"/ 2>/dev/null
fi
echo "gpu_check: $failed step(s) failed" | tee -a "$log"
exit "$failed"
