# tessera — the one entry point for building, running and testing.
#
#   make run    install what is missing, build, start `tessera demo` (one LUN on 127.0.0.1:3260)
#   make test   everything CI checks
#
# Other targets: deps, build, fmt-check, lint, unit, it, conformance, guest, fuzz-smoke,
# bench (bench-codec, bench-compare, bench-hung), install, clean. Test runners print their own summary lines.

SHELL        := /bin/bash
CARGO        ?= cargo
BUILD_DIR    ?= $(CURDIR)/build
DEMO_DIR     ?= $(BUILD_DIR)/demo
GUEST_DIR    ?= $(CURDIR)/../shared/tools/guest
GUEST_CACHE  ?= $(BUILD_DIR)/guest-cache
RELEASE_BIN  := $(CURDIR)/target/release/tessera
FUZZ_SECONDS ?= 20
PREFIX       ?= /usr/local
DESTDIR      ?=

# Debian packages the build and the tests need (installed only when missing).
DEB_PACKAGES := build-essential pkg-config libiscsi-bin qemu-utils qemu-block-extra tgt istgt \
                socat cpio xz-utils zstd kmod iproute2 procps qemu-system-x86 open-iscsi \
                nvme-cli e2fsprogs fio busybox-static python3 clang etcd-server protobuf-compiler \
                systemd prometheus

export CARGO_TERM_COLOR = never

.PHONY: all deps build run test fmt-check lint unit it conformance guest guest-build \
        fuzz-smoke bench bench-deps bench-codec bench-compare bench-hung install install-check clean

all: build

deps:
	@missing=""; \
	for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "make deps: installing$$missing"; \
	  if [ "$$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	else echo "make deps: all Debian packages present"; fi
	@# qemu-img needs qemu-block-extra of its own version for iscsi:// (a newer qemu-utils
	@# from backports gets removed when the bookworm qemu-block-extra goes in).
	@if ! qemu-img --help 2>/dev/null | grep -qw iscsi; then \
	  v=$$(apt-cache policy qemu-block-extra | awk '/Candidate:/ {print $$2}'); \
	  echo "make deps: installing qemu-utils and qemu-block-extra $$v"; \
	  if [ "$$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --allow-downgrades \
	    qemu-utils=$$v qemu-block-extra=$$v; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "make deps: cargo not found: install Rust (rustup.rs)"; exit 1; }

build:
	$(CARGO) build --release --locked -p tessera

run: deps build
	$(RELEASE_BIN) demo --dir $(DEMO_DIR)

fmt-check:
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path bench/codec/Cargo.toml -- --check

lint:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy -p tessera-uring -p tessera-store -p tessera-volume --features fault-injection \
	  --all-targets --locked -- -D warnings

# Unit and property tests of every crate; the I/O engine, the store and the volume crates with
# their fault hooks (the I/O engine's failing writes and syncs, the crash test's fault points:
# a feature no release build has). io_uring tests fail where io_uring cannot be set up, unless
# TESSERA_ALLOW_NO_URING=1.
unit:
	$(CARGO) test --workspace --locked --exclude tessera-integration-tests --exclude tessera-volume \
	  --exclude tessera-store --exclude tessera-uring
	$(CARGO) test --locked -p tessera-uring -p tessera-store --features fault-injection
	$(CARGO) test --locked -p tessera-volume --features fault-injection

# Cross-process tests against the release binary: conformance (libiscsi), bad input,
# configuration files, and the Linux kernel initiator in the qemu guest.
it: build guest-build
	TESSERA_BIN=$(RELEASE_BIN) GUEST_DIR=$(GUEST_DIR) GUEST_CACHE=$(GUEST_CACHE) \
	  $(CARGO) test --release --locked -p tessera-integration-tests -- --test-threads=1 --nocapture

conformance: build
	TESSERA_BIN=$(RELEASE_BIN) $(CARGO) test --release --locked -p tessera-integration-tests \
	  --test conformance -- --nocapture

guest-build:
	$(GUEST_DIR)/build-guest.sh $(GUEST_CACHE)

guest: build guest-build
	TESSERA_BIN=$(RELEASE_BIN) GUEST_DIR=$(GUEST_DIR) GUEST_CACHE=$(GUEST_CACHE) \
	  $(CARGO) test --release --locked -p tessera-integration-tests --test kernel_initiator \
	  -- --test-threads=1 --nocapture

fuzz-smoke:
	src/proto/fuzz/smoke.sh $(FUZZ_SECONDS)

test: deps fmt-check lint unit it install-check fuzz-smoke
	@echo "make test: all checks passed"

# Packages only the codec benchmark needs (ISA-L and bindgen's libclang).
BENCH_PACKAGES := libisal-dev libclang-dev

bench-deps: deps
	@missing=""; \
	for p in $(BENCH_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "make bench-deps: installing$$missing"; \
	  if [ "$$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# Codec throughput (bench/codec.sh), then tessera beside tgt and istgt (bench/compare.sh:
# file backend on tmpfs and disk, and an ec volume over local node processes).
bench: bench-codec bench-compare bench-hung

bench-codec: bench-deps
	bench/codec.sh

bench-compare: deps build
	bench/compare.sh

# One storage node stopped (SIGSTOP) under 4 KiB random reads and writes at QD32: IOPS from
# that moment against healthy, worst second, slowest command, CPU per I/O.
bench-hung: deps build
	TESSERA_BIN=$(RELEASE_BIN) $(CARGO) run --release --locked -p tessera-bench --bin hung_node

# Installs the binary, the systemd units (ExecStart pointed at $(PREFIX)/bin), the example
# configurations and the README. Respects DESTDIR and PREFIX.
UNIT_DIR ?= $(PREFIX)/lib/systemd/system
install: build
	install -D -m 0755 $(RELEASE_BIN) $(DESTDIR)$(PREFIX)/bin/tessera
	install -d $(DESTDIR)$(UNIT_DIR) $(DESTDIR)/etc/tessera/examples $(DESTDIR)$(PREFIX)/share/doc/tessera
	for u in systemd/*.service; do \
	  sed 's|/usr/local/bin/tessera|$(PREFIX)/bin/tessera|g; s|/usr/local/share/doc|$(PREFIX)/share/doc|g' $$u \
	    > $(DESTDIR)$(UNIT_DIR)/$$(basename $$u) && chmod 0644 $(DESTDIR)$(UNIT_DIR)/$$(basename $$u); \
	done
	install -m 0644 target-config/*.toml target-config/*.yml target-config/*.conf $(DESTDIR)/etc/tessera/examples/
	install -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/tessera/
	install -D -m 0644 grafana/tessera-dashboard.json $(DESTDIR)$(PREFIX)/share/tessera/grafana/tessera-dashboard.json

# `make install` into a scratch root, and `systemd-analyze verify` of every installed unit
# (the template as an instance) against the installed binary.
install-check: build
	rm -rf $(BUILD_DIR)/install-root
	$(MAKE) --no-print-directory install DESTDIR=$(abspath $(BUILD_DIR))/install-root PREFIX=/usr
	@root=$(abspath $(BUILD_DIR))/install-root; \
	for f in usr/bin/tessera usr/lib/systemd/system/tessera-gateway.service \
	    usr/lib/systemd/system/tessera-node@.service usr/lib/systemd/system/tessera-etcd.service \
	    etc/tessera/examples/cluster-gateway.toml etc/tessera/examples/multipath.conf \
	    usr/share/doc/tessera/README.md usr/share/tessera/grafana/tessera-dashboard.json; do \
	  test -e $$root/$$f || { echo "install-check: $$f not installed"; exit 1; }; \
	done; \
	grep -q "^ExecStart=/usr/bin/tessera gateway" $$root/usr/lib/systemd/system/tessera-gateway.service || \
	  { echo "install-check: ExecStart does not follow PREFIX"; exit 1; }; \
	mkdir -p $(BUILD_DIR)/verify && rm -f $(BUILD_DIR)/verify/*; \
	for u in $$root/usr/lib/systemd/system/*.service; do \
	  n=$$(basename $$u | sed 's/@\.service/@verify.service/'); \
	  sed "s|/usr/bin/tessera|$$root/usr/bin/tessera|" $$u > $(BUILD_DIR)/verify/$$n; \
	done; \
	n=0; for u in $(BUILD_DIR)/verify/*.service; do \
	  systemd-analyze verify $$u || { echo "install-check: systemd-analyze verify $$u failed"; exit 1; }; \
	  n=$$((n + 1)); \
	done; \
	echo "install-check: make install (DESTDIR, PREFIX=/usr) complete; systemd-analyze verify: $$n units clean"

clean:
	$(CARGO) clean
	rm -rf $(BUILD_DIR)
