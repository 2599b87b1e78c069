//! The storage node's fragment store ([`fragment::FragmentStore`], on-disk format in
//! `FORMAT.md`), on the io_uring engine (`tessera-uring`).
//!
//! No `unsafe` code here: it all lives in `tessera-uring`.

#![forbid(unsafe_code)]

pub mod fragment;
