//! A linearizability checker for key-value histories recorded by tests.
//!
//! Each key is a register; a history is linearizable iff each key's history is
//! (linearizability is local). Per key, a Wing–Gong search with memoisation
//! (Lowe, "Testing for linearizability", 2017): repeatedly pick an operation that
//! no pending-and-unlinearized operation must precede, apply it to the register
//! model, and backtrack on contradiction; states already explored (set of
//! linearized operations + register value) are cached.
//!
//! Operations whose outcome is unknown (a timeout, a connection reset) have no
//! return time: they may take effect at any point after their call, or never.

use std::collections::{BTreeMap, HashSet};

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// Wrote this value.
    Write(String),
    /// Read this value (`None`: the key was absent).
    Read(Option<String>),
}

/// One client operation on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// The key.
    pub key: String,
    /// When the client sent it (any monotonic unit).
    pub call: u64,
    /// When the client got the answer; `None` if the outcome is unknown.
    pub ret: Option<u64>,
    /// What it did.
    pub kind: OpKind,
}

/// Checks a whole history; returns the first key whose history is not
/// linearizable.
pub fn check(history: &[Op]) -> Result<(), String> {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    for (key, ops) in by_key {
        // Reads with unknown outcome constrain nothing.
        let ops: Vec<&Op> = ops
            .into_iter()
            .filter(|o| o.ret.is_some() || matches!(o.kind, OpKind::Write(_)))
            .collect();
        if !register_linearizable(&ops) {
            return Err(format!(
                "history of key {key:?} is not linearizable: {ops:#?}"
            ));
        }
    }
    Ok(())
}

fn register_linearizable(ops: &[&Op]) -> bool {
    let n = ops.len();
    let words = n.div_ceil(64).max(1);
    let end = |o: &Op| o.ret.unwrap_or(u64::MAX);
    let complete: Vec<usize> = (0..n).filter(|i| ops[*i].ret.is_some()).collect();
    let mut seen: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    // Depth-first search with an explicit stack of (done set, register value).
    let mut stack: Vec<(Vec<u64>, Option<String>)> = vec![(vec![0; words], None)];
    let is_done = |done: &[u64], i: usize| done[i / 64] & (1 << (i % 64)) != 0;
    while let Some((done, value)) = stack.pop() {
        if complete.iter().all(|i| is_done(&done, *i)) {
            return true;
        }
        // The earliest return among operations not yet linearized: anything called
        // after it cannot go next.
        let horizon = (0..n)
            .filter(|i| !is_done(&done, *i))
            .map(|i| end(ops[i]))
            .min()
            .unwrap_or(u64::MAX);
        for i in 0..n {
            if is_done(&done, i) || ops[i].call > horizon {
                continue;
            }
            let next_value = match &ops[i].kind {
                OpKind::Write(v) => Some(v.clone()),
                OpKind::Read(r) => {
                    if *r != value {
                        continue;
                    }
                    value.clone()
                }
            };
            let mut next = done.clone();
            next[i / 64] |= 1 << (i % 64);
            let state = (next, next_value);
            if seen.insert(state.clone()) {
                stack.push(state);
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(call: u64, ret: Option<u64>, v: &str) -> Op {
        Op {
            key: "k".into(),
            call,
            ret,
            kind: OpKind::Write(v.into()),
        }
    }
    fn r(call: u64, ret: u64, v: Option<&str>) -> Op {
        Op {
            key: "k".into(),
            call,
            ret: Some(ret),
            kind: OpKind::Read(v.map(String::from)),
        }
    }

    #[test]
    fn sequential_histories() {
        assert!(check(&[w(0, Some(1), "a"), r(2, 3, Some("a"))]).is_ok());
        assert!(
            check(&[w(0, Some(1), "a"), r(2, 3, None)]).is_err(),
            "stale read of absent"
        );
        assert!(check(&[r(0, 1, None), w(2, Some(3), "a"), r(4, 5, Some("a"))]).is_ok());
    }

    #[test]
    fn concurrent_operations_may_order_either_way() {
        // Two overlapping writes; later reads must agree on one order.
        let h = [
            w(0, Some(10), "a"),
            w(1, Some(9), "b"),
            r(11, 12, Some("a")),
            r(13, 14, Some("a")),
        ];
        assert!(check(&h).is_ok());
        let h = [
            w(0, Some(10), "a"),
            w(1, Some(9), "b"),
            r(11, 12, Some("a")),
            r(13, 14, Some("b")),
        ];
        assert!(
            check(&h).is_err(),
            "value flipped back after both writes finished"
        );
    }

    #[test]
    fn a_read_cannot_see_a_write_from_the_future() {
        let h = [r(0, 1, Some("a")), w(2, Some(3), "a")];
        assert!(check(&h).is_err());
    }

    #[test]
    fn unknown_outcomes_may_apply_late_or_never() {
        // The write timed out: a later read may see it or not, but once seen, it stays.
        assert!(check(&[w(0, None, "a"), r(5, 6, None)]).is_ok());
        assert!(check(&[w(0, None, "a"), r(5, 6, Some("a"))]).is_ok());
        let h = [
            w(0, Some(1), "x"),
            w(2, None, "a"),
            r(5, 6, Some("a")),
            r(7, 8, Some("x")),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut h = vec![w(0, Some(1), "a"), r(2, 3, Some("a"))];
        h.push(Op {
            key: "other".into(),
            call: 0,
            ret: Some(1),
            kind: OpKind::Read(Some("z".into())),
        });
        assert!(check(&h).is_err());
    }
}
