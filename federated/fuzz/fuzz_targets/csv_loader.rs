//! Arbitrary bytes into the CSV loader: it must never panic, and anything it
//! accepts must write back out and load again to the same dataset.
#![no_main]

use agentmesh_federated::Dataset;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ds) = Dataset::from_csv_reader(data, None) {
        let mut out = Vec::new();
        ds.write_csv(&mut out).expect("a loaded dataset writes");
        let back = Dataset::from_csv_reader(&out[..], Some(ds.classes())).expect("and loads again");
        assert_eq!(back, ds);
    }
});
