//! Fuzz target: see `tessera_proto::fuzzing::text`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_proto::fuzzing::text(data));
