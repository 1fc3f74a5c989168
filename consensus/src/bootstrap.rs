//! Founding a cluster from `--bootstrap-expect N` nodes that share a cluster key, exactly once,
//! whatever order they start in.
//!
//! Each waiting node greets the peers it is connected to ([`Hello`]) and learns which of them
//! hold the same key, which are members of a cluster already, and whom each has promised to
//! found with. Once a node sees N key holders and is the lowest peer id among the N lowest, it
//! proposes that set to the others. A node accepts at most one proposal at a time and keeps it
//! on disk before answering, so two proposers can never both gather a set that shares a node.
//! Only with every member of the set accepting does the proposer initialize Raft with the set as
//! voters; anything less and it releases the ones that did accept and tries again later.
//!
//! Every proposal carries the proposer's round number (persisted, increasing), so a late
//! `Release` or a stale `Propose` of an earlier round cannot undo a later one. An acceptance
//! ends only when its proposer releases that round, or answers a greeting saying it no longer
//! proposes; never on a timer, since a silent proposer may have initialized Raft already. (A
//! proposer that is gone for good leaves its acceptors waiting: restart it, or clear their
//! data dirs.) While a node waits, Raft messages are taken only from the members of the set it
//! promised (`Cluster::handle_rpc`), so no stranger can give it Raft state. Once Raft state
//! exists on a node it is in a cluster and never founds again. Whoever leads the new cluster
//! first names it with the agreed set as its members.
//!
//! [`Hello`]: crate::rpc::RpcRequest::Hello

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::types::{node_id_for, MemberRecord};

/// Largest `--bootstrap-expect`.
pub const MAX_BOOTSTRAP_EXPECT: usize = 9;

/// A proposal to found a cluster with these members as its voters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Proposal {
    /// The proposing node's peer id (the lowest in `members`).
    pub(crate) proposer: String,
    /// The proposer's round: a later round of the same proposer replaces an earlier one.
    pub(crate) round: u64,
    /// The founding members, the proposer included, ordered by peer id.
    pub(crate) members: Vec<MemberRecord>,
}

/// What a node keeps on disk while it waits to found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BootstrapState {
    /// The proposal this node accepted (its own, if it is proposing).
    pub(crate) accepted: Option<Proposal>,
    /// Rounds this node has proposed in, so its next round is new.
    pub(crate) rounds: u64,
}

/// A waiting (or member) node's answer to a greeting.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HelloReply {
    /// Its name.
    pub(crate) name: String,
    /// Its listen addresses.
    pub(crate) addrs: Vec<String>,
    /// Its Ed25519 public key.
    #[serde(with = "serde_bytes")]
    pub(crate) public_key: Vec<u8>,
    /// Its proof of holding the cluster key, if it holds one.
    #[serde(with = "serde_bytes")]
    pub(crate) key_proof: Option<Vec<u8>>,
    /// The cluster it is a member of, if any.
    pub(crate) cluster_id: Option<String>,
    /// Whom it promised to found with.
    pub(crate) accepted: Option<String>,
    /// How many `--bootstrap-expect` it waits for.
    pub(crate) expect: Option<usize>,
}

/// Why a node will not take part in a proposal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Decline {
    /// It is a member of a cluster already.
    #[error("already in a cluster")]
    InCluster,
    /// It promised someone else.
    #[error("accepted a proposal from {0}")]
    Promised(String),
    /// The proposal does not fit this node.
    #[error("{0}")]
    Invalid(String),
}

/// What a waiting node should do next.
#[derive(Debug)]
pub enum BootstrapStep {
    /// This node is in a cluster (founded now or before, or added by a founder).
    Done,
    /// These peers are members of a cluster: join it through them.
    Join(Vec<crate::RaftNode>),
    /// Keep waiting; the reason is for the log.
    Wait(String),
}

/// The acceptor's rule: may `proposer` found with `proposal` as far as this node is concerned?
/// `me` is how this node describes itself; `expect` its own `--bootstrap-expect`.
pub(crate) fn check_proposal(
    state: &BootstrapState,
    me: &MemberRecord,
    expect: Option<usize>,
    proposer: &str,
    round: u64,
    proposal: &[MemberRecord],
) -> Result<(), Decline> {
    let invalid = |s: &str| Err(Decline::Invalid(s.to_string()));
    let Some(expect) = expect else {
        return invalid("this node does not take part in founding (no --bootstrap-expect)");
    };
    if proposal.len() != expect {
        return Err(Decline::Invalid(format!(
            "proposal has {} members, this node expects {expect}",
            proposal.len()
        )));
    }
    if proposal.first().map(|m| m.peer_id.as_str()) != Some(proposer) {
        return invalid("the proposer must be the lowest peer id of the set");
    }
    if !sorted_unique(proposal) {
        return invalid("members must be distinct and ordered by peer id");
    }
    if proposal
        .iter()
        .any(|m| m.node_id != node_id_for(&m.peer_id))
    {
        return invalid("a member's node id does not match its peer id");
    }
    let Some(mine) = proposal.iter().find(|m| m.peer_id == me.peer_id) else {
        return invalid("this node is not in the proposed set");
    };
    if mine.public_key != me.public_key {
        return invalid("the proposal carries a wrong public key for this node");
    }
    match &state.accepted {
        Some(p) if p.proposer != proposer => Err(Decline::Promised(p.proposer.clone())),
        Some(p) if p.round > round => invalid("a later round of this proposer was accepted"),
        _ => Ok(()),
    }
}

/// Whether a `Release` of `round` from `proposer` ends this node's promise.
pub(crate) fn releases(state: &BootstrapState, proposer: &str, round: u64) -> bool {
    state
        .accepted
        .as_ref()
        .is_some_and(|p| p.proposer == proposer && p.round == round)
}

fn sorted_unique(members: &[MemberRecord]) -> bool {
    members.windows(2).all(|w| w[0].peer_id < w[1].peer_id)
}

/// Picks the set to propose from the key holders a node sees (itself included): the `expect`
/// lowest peer ids, if there are enough, and only if `me` is the lowest of them.
pub(crate) fn choose_set(
    me: &str,
    holders: &BTreeMap<String, MemberRecord>,
    expect: usize,
) -> Result<Vec<MemberRecord>, String> {
    if holders.len() < expect {
        return Err(format!(
            "{} of {expect} expected key holders seen",
            holders.len()
        ));
    }
    let set: Vec<MemberRecord> = holders.values().take(expect).cloned().collect();
    match set.first() {
        Some(first) if first.peer_id == me => Ok(set),
        Some(first) => Err(format!("{} founds the cluster", first.peer_id)),
        None => Err("no key holders".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::MemberState;

    fn record(peer: &str) -> MemberRecord {
        MemberRecord {
            node_id: node_id_for(peer),
            peer_id: peer.into(),
            public_key: peer.as_bytes().to_vec(),
            name: peer.into(),
            addrs: vec![],
            joined_at: 0,
            state: MemberState::Active,
            seal_keys: Vec::new(),
        }
    }

    fn holders(peers: &[&str]) -> BTreeMap<String, MemberRecord> {
        peers.iter().map(|p| (p.to_string(), record(p))).collect()
    }

    #[test]
    fn only_the_lowest_of_the_lowest_set_proposes() {
        let seen = holders(&["b", "a", "d", "c"]);
        let set = choose_set("a", &seen, 3).unwrap();
        let ids: Vec<&str> = set.iter().map(|m| m.peer_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert!(choose_set("b", &seen, 3).unwrap_err().contains("a founds"));
        assert!(choose_set("a", &seen, 5).unwrap_err().contains("4 of 5"));
    }

    #[test]
    fn a_node_accepts_one_proposer_and_only_a_set_that_fits() {
        let me = record("b");
        let set = vec![record("a"), record("b"), record("c")];
        let empty = BootstrapState::default();
        assert_eq!(check_proposal(&empty, &me, Some(3), "a", 1, &set), Ok(()));
        let promised = BootstrapState {
            accepted: Some(Proposal {
                proposer: "a".into(),
                round: 2,
                members: set.clone(),
            }),
            rounds: 0,
        };
        // The same proposer again (a retry, or a later round) is fine; anyone else is not,
        // and neither is an earlier round arriving late.
        assert_eq!(
            check_proposal(&promised, &me, Some(3), "a", 2, &set),
            Ok(())
        );
        assert_eq!(
            check_proposal(&promised, &me, Some(3), "a", 3, &set),
            Ok(())
        );
        assert!(matches!(
            check_proposal(&promised, &me, Some(3), "a", 1, &set),
            Err(Decline::Invalid(_))
        ));
        let other = vec![record("0"), record("b"), record("c")];
        assert_eq!(
            check_proposal(&promised, &me, Some(3), "0", 1, &other),
            Err(Decline::Promised("a".into()))
        );
        // Only a release of the promised round ends the promise.
        assert!(releases(&promised, "a", 2));
        assert!(
            !releases(&promised, "a", 1),
            "a late release of an earlier round"
        );
        assert!(!releases(&promised, "0", 2));
        let bad = |s: &[MemberRecord], proposer: &str, expect| {
            matches!(
                check_proposal(&empty, &me, expect, proposer, 1, s),
                Err(Decline::Invalid(_))
            )
        };
        assert!(bad(&set, "a", None), "no --bootstrap-expect");
        assert!(bad(&set, "a", Some(5)), "different expect");
        assert!(bad(&set, "b", Some(3)), "proposer not lowest");
        assert!(
            bad(&[record("a"), record("c"), record("d")], "a", Some(3)),
            "not in set"
        );
        assert!(
            bad(&[record("a"), record("a"), record("b")], "a", Some(3)),
            "duplicates"
        );
        let mut forged = set.clone();
        forged[1].public_key = b"forged".to_vec();
        assert!(bad(&forged, "a", Some(3)), "wrong key for me");
        let mut wrong_id = set.clone();
        wrong_id[2].node_id ^= 1;
        assert!(
            bad(&wrong_id, "a", Some(3)),
            "node id not derived from peer id"
        );
    }
}
