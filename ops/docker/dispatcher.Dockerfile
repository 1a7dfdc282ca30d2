# Fleet dispatcher: FROM scratch with the release binary, exactly the shared libraries `ldd`
# lists, CA certificates and a static busybox for the health check. The build context is the
# folder ops/images.sh stages (rootfs/); build it with that script, not by hand.
FROM scratch
COPY rootfs/ /
# Numeric, so no /etc/passwd is needed and Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# /metrics, /health, /ready, /info. Set the address with the variable (not --metrics-addr)
# so that the HEALTHCHECK below probes the right port; 127.0.0.1 suits host networking, a pod
# wants 0.0.0.0:9464.
ENV FLEET_DISPATCHER_METRICS_ADDR=127.0.0.1:9464 \
    FLEET_LOG_FORMAT=json
# busybox wget (the image has no curl); 0.0.0.0 is probed on loopback. No -T: Debian's static
# busybox 1.35 crashes with it; the HEALTHCHECK's --timeout bounds the probe instead.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/bin/busybox", "sh", "-c", "a=${FLEET_DISPATCHER_METRICS_ADDR/0.0.0.0/127.0.0.1}; exec /bin/busybox wget -q -O /dev/null http://$a/health"]
STOPSIGNAL SIGTERM
# Exec form: the dispatcher is PID 1 and gets SIGTERM itself.
ENTRYPOINT ["/usr/local/bin/dispatcher"]
