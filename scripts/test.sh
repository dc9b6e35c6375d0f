#!/usr/bin/env bash
# Runs every test of jobplane. Sets up what it needs on a fresh machine of this kind: a Python
# virtualenv in .venv with buf (from PyPI's buf-bin), and cargo-nextest if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n== %s\n' "$*"; }

step "tools"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check buf-bin
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
