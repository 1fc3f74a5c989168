#![no_main]
//! Sealed messages (model updates) from arbitrary bytes, and valid ones with bytes altered:
//! errors, never panics, and an altered one never opens.

use agentmesh_protocols::seal::{inspect, open, seal, Recipient, SealSecret};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const A: &str = "12D3KooWSender";
const B: &str = "12D3KooWRecipient";

struct Fixture {
    a: SealSecret,
    b: SealSecret,
    sealed: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let a = SealSecret::from_bytes([1; 32]);
        let b = SealSecret::from_bytes([2; 32]);
        let other = Recipient {
            peer: "12D3KooWOther".into(),
            public: SealSecret::from_bytes([3; 32]).public(),
        };
        let to = Recipient {
            peer: B.into(),
            public: b.public(),
        };
        // Two recipients, so altering the other one's entry is tried too.
        let sealed = seal(b"an update", b"ctx", (A, &a), &[other, to]).expect("seal");
        Fixture { a, b, sealed }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let me = (B, std::slice::from_ref(&f.b));
    let sender = [f.a.public()];
    match data.split_first() {
        Some((0, rest)) => {
            // Alter the valid message: XOR `rest` in from an offset it chooses.
            let mut m = f.sealed.clone();
            let Some((&at, xor)) = rest.split_first() else {
                return;
            };
            let start = at as usize * m.len() / 256;
            let mut changed = false;
            for (i, x) in xor.iter().enumerate() {
                if let Some(b) = m.get_mut(start + i) {
                    changed |= *x != 0;
                    *b ^= x;
                }
            }
            let out = open(&m, b"ctx", me, (A, &sender));
            assert!(!changed || out.is_err(), "an altered message opened");
        }
        _ => {
            let _ = inspect(data);
            let _ = open(data, b"ctx", me, (A, &sender));
        }
    }
});
