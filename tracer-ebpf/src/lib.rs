//! Empty: the library target exists so that `tracer-agent` can declare a build dependency on
//! this crate (and be rebuilt when it changes); the programs are the `tracer` binary.
#![no_std]
