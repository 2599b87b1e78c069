//! Fuzz target: see `tessera_proto::fuzzing::cdb`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_proto::fuzzing::cdb(data));
