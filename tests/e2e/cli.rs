//! CLI tests: filled in once the CLI lands.
