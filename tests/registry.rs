//! A real registry for tests.
