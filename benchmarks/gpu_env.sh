# Source on an offline GPU host (../shared/gpu/README.md) from the repository root, once the
# vLLM 0.26.0 bundle's parts are in /tmp/parts:   . benchmarks/gpu_env.sh [WHEEL_DIR]
#
# Unpacks vLLM into /tmp/site, installs from WHEEL_DIR (py3.12 wheels, no network) whichever of
# the server's own dependencies the host lacks (and Ray's, if its wheel is there), and registers
# this project (its backend entry point) without touching its dependencies.
set -e
wheels=${1:-gpu_parts/wheels}
if [ ! -d /tmp/site/vllm ]; then
    mkdir -p /tmp/site
    cat /tmp/parts/vllm-bundle.tar.xz.part-* | tar -xJ -C /tmp/site
fi
export PYTHONPATH=/tmp/site:/tmp/pydeps${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
needed="prometheus_client:prometheus_client httpx:httpx httpcore:httpcore h11:h11 anyio:anyio
        sniffio:sniffio certifi:certifi idna:idna yaml:pyyaml psutil:psutil watchdog:watchdog"
# Ray (for --ray-address and migration_downtime.py --network) when its wheels were carried.
if ls "$wheels"/ray-*.whl >/dev/null 2>&1; then
    needed="$needed click:click msgpack:msgpack filelock:filelock attrs:attrs rpds:rpds_py
            referencing:referencing jsonschema_specifications:jsonschema_specifications
            jsonschema:jsonschema google.protobuf:protobuf packaging:packaging urllib3:urllib3
            charset_normalizer:charset_normalizer requests:requests ray:ray"
fi
for pair in $needed; do
    module=${pair%%:*} wheel=${pair##*:}
    python -c "import $module" 2>/dev/null || {
        echo "gpu_env: installing $wheel"
        python -m pip install -q --no-index --no-deps --target /tmp/pydeps "$wheels"/"$wheel"-*.whl
    }
done
python -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --target /tmp/pydeps . \
    || { echo "gpu_env: could not install the project"; return 1; }
set +e
