//! The integration tests of `dingo` are in `tests/` here (`cargo test -p dingo-integration
//! --all-features --test NAME` runs one file); this library is empty. They live apart from
//! the facade so that its features stay its own (none switches on a feature of the
//! unpublished test support) and its examples build without the test support.
