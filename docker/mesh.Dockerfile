# meshid's components in one image, for the e2e harness's docker backend
# (`cargo xtask images`, or built on demand by `cargo xtask e2e --backend docker`).
#
# Nothing can be pulled on the machines this project runs on, so the image
# starts from scratch: the harness stages rootfs/ with target/debug's
# meshid-ca, meshid-agent, meshid-envoy-shim, meshid-echo and
# meshid-ztunnel in /usr/local/bin, plus the shared libraries
# `ldd` lists for them at their host paths (libgcc_s, libm, libc, the
# loader), /tmp, and an nsswitch.conf. Each container names its binary as
# its command.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin
WORKDIR /
