//! Benchmark helpers (the side-by-side scripts live beside this crate).

#![forbid(unsafe_code)]
