# meshid/envoy-shim: the SDS-fed TLS proxy, one binary FROM scratch
# (`cargo xtask images --release`; nothing can be pulled where it is built).
# The builder stages rootfs/ with the stripped release binary in
# /usr/local/bin, the shared libraries `ldd` lists for it at their host
# paths, /tmp, /etc/nsswitch.conf and /etc/passwd naming uid 1337.
FROM scratch
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="meshid/envoy-shim" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY rootfs/ /
ENV PATH=/usr/local/bin
WORKDIR /
# Istio's proxy uid; numeric, so runAsNonRoot can check it.
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/meshid-envoy-shim"]
