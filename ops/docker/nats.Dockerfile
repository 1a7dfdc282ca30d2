# nats-server (Debian's 2.9.10, the version ops/nats/ is written and tested for), FROM scratch
# with the binary and the shared libraries `ldd` lists, and busybox for the health check on the
# monitoring port. For the compose file; on Kubernetes use the official Helm chart
# (ops/k8s/nats/values.yaml). Build with ops/images.sh.
FROM scratch
COPY rootfs/ /
USER 10001:10001
# The monitoring endpoint's /healthz (JetStream included); set NATS_MONITOR to its address.
ENV NATS_MONITOR=127.0.0.1:8222
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/bin/busybox", "sh", "-c", "exec /bin/busybox wget -q -O /dev/null http://$NATS_MONITOR/healthz"]
# SIGTERM: nats-server shuts down cleanly (SIGUSR2 would be lame-duck mode).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/sbin/nats-server"]
