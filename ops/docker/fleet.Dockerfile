# The `fleet` command-line client (infer, submit, tenant, nats-user, dlq, ...): FROM scratch
# with the release binary, the shared libraries `ldd` lists and CA certificates. No health
# check: it is a command, not a service. Build with ops/images.sh.
FROM scratch
COPY rootfs/ /
USER 10001:10001
WORKDIR /work
ENTRYPOINT ["/usr/local/bin/fleet"]
