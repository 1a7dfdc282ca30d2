# Fleet worker on a GPU (`--device cuda:N`). NOT built by ops/images.sh nor in CI: there is no
# CUDA base image reachable here and no GPU. Build it where both exist:
#
#   ops/build-cuda.sh --release            # target/cuda/release/worker, with Fleet's kernels
#   mkdir -p target/images/worker-cuda && cp target/cuda/release/worker target/images/worker-cuda/
#   docker build -f ops/docker/worker-cuda.Dockerfile -t fleet-worker-cuda target/images/worker-cuda
#
# The runtime image brings libcudart/libcublas (candle's CUDA backend links them); the driver
# (libcuda.so) comes from the host through the NVIDIA container toolkit
# (`docker run --gpus device=0`, or the GPU resource on Kubernetes: ops/k8s/overlays/gpu).
# Match the CUDA major version to ops/install-cuda-toolchain.sh's.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
COPY worker /usr/local/bin/worker
USER 10001:10001
ENV FLEET_MODEL_DIR=/models/all-MiniLM-L6-v2 \
    FLEET_DEVICE=cuda:0 \
    FLEET_METRICS_ADDR=127.0.0.1:9184 \
    FLEET_LOG_FORMAT=json \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# The runtime image has no curl or wget either; bash's /dev/tcp does the probe.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["/bin/bash", "-c", "a=${FLEET_METRICS_ADDR/0.0.0.0/127.0.0.1}; exec 3<>/dev/tcp/${a%:*}/${a##*:} && printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/worker"]
