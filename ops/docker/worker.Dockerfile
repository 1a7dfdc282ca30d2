# Fleet worker (CPU): FROM scratch with the release binary, exactly the shared libraries `ldd`
# lists, CA certificates and a static busybox for the health check. The model is not in the
# image: mount it read-only at /models/all-MiniLM-L6-v2 (or set FLEET_MODEL_DIR). Build with
# ops/images.sh, which stages rootfs/.
FROM scratch
COPY rootfs/ /
USER 10001:10001
ENV FLEET_MODEL_DIR=/models/all-MiniLM-L6-v2 \
    FLEET_METRICS_ADDR=127.0.0.1:9184 \
    FLEET_LOG_FORMAT=json
# /health answers once the process serves HTTP; readiness (model loaded, consuming) is /ready,
# for Kubernetes' readinessProbe.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["/bin/busybox", "sh", "-c", "a=${FLEET_METRICS_ADDR/0.0.0.0/127.0.0.1}; exec /bin/busybox wget -q -O /dev/null http://$a/health"]
# SIGTERM starts the drain: stop pulling, finish and ack what is in flight, within
# --shutdown-timeout (FLEET_SHUTDOWN_TIMEOUT, 30s). Give `docker stop -t` / compose's
# stop_grace_period / Kubernetes' terminationGracePeriodSeconds more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/worker"]
