//! Arbitrary bytes into the `.npy` reader: it must never panic, and what it
//! accepts must round-trip through the writer.
#![no_main]

use agentmesh_federated::{read_npy, write_npy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((shape, values)) = read_npy(data) {
        let back = read_npy(&write_npy(&shape, &values)).expect("what we write reads back");
        assert_eq!(back.1, values);
    }
});
