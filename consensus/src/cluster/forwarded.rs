//! What the leader takes from a member that forwards a write.
//!
//! A member forwards two kinds of writes: changes to its own record (its addresses, name,
//! sealing key, trainer registration, leaving), and changes a caller of its API asked for
//! (kv, jobs, API keys, removals), which that member checked against the caller's key and
//! role. The leader cannot re-check the second kind (keyless loopback callers carry no key),
//! but it can refuse what no member may ask for: a change to another member's own record,
//! the steps only the leader takes (founding, admitting a node, running rounds), and audit
//! records in another node's name. So a compromised member cannot, for example, commit a
//! round result, register another node as a trainer, make another member leave or publish a
//! key for it, or write audit entries that blame another node.

use crate::access::AuditEntry;
use crate::jobs::JobCommand;
use crate::types::{Command, NodeId};

/// Whether the member `caller` (node id and peer id) may forward `cmd`; the reason if not.
pub(crate) fn check(caller: NodeId, caller_peer: &str, cmd: &Command) -> Result<(), String> {
    check_in(caller, caller_peer, cmd, false)
}

/// [`check`], for a command that is (`audited`) or is not inside an audit record.
fn check_in(caller: NodeId, caller_peer: &str, cmd: &Command, audited: bool) -> Result<(), String> {
    let own = |node_id: &NodeId, what: &str| {
        if *node_id == caller {
            Ok(())
        } else {
            Err(format!("a member may {what} only for itself"))
        }
    };
    let via = |e: &AuditEntry| {
        if e.via == caller_peer {
            Ok(())
        } else {
            Err("an audit entry must name the member that writes it".to_string())
        }
    };
    match cmd {
        Command::Found { .. } | Command::Join { .. } => {
            Err("founding and admitting go through the join handshake".into())
        }
        Command::Leave { node_id } => own(node_id, "leave"),
        Command::Rename { node_id, .. } => own(node_id, "rename"),
        Command::SetAddrs { node_id, .. } => own(node_id, "set addresses"),
        Command::SetSealKey { node_id, .. } => own(node_id, "publish a sealing key"),
        Command::Remove { node_id } if *node_id == caller => {
            Err("a member cannot remove itself (it leaves)".into())
        }
        Command::Job(job) => match job {
            JobCommand::SetTrainer { node_id, .. } => own(node_id, "register as a trainer"),
            JobCommand::StartRound { .. }
            | JobCommand::EndRound { .. }
            | JobCommand::Finish { .. } => Err("only the leader runs a job's rounds".into()),
            JobCommand::Submit(_) | JobCommand::Cancel { .. } => Ok(()),
        },
        Command::Batch(cmds) => cmds
            .iter()
            .try_for_each(|c| check_in(caller, caller_peer, c, audited)),
        Command::Audited { entry, cmd } => {
            via(entry)?;
            check_in(caller, caller_peer, cmd, true)
        }
        Command::Audit(entries) => entries.iter().try_for_each(via),
        // Admins' changes travel with their audit record, never without.
        Command::Remove { .. } | Command::ApiKey(_) if !audited => {
            Err("removals and API key changes must carry their audit record".into())
        }
        Command::Remove { .. }
        | Command::KvPut { .. }
        | Command::KvDelete { .. }
        | Command::ApiKey(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::AuditEntry;

    fn audited(via: &str, cmd: Command) -> Command {
        Command::Audited {
            entry: AuditEntry::new(1, "apikey:x", via, "a", "t", ""),
            cmd: Box::new(cmd),
        }
    }

    #[test]
    fn a_member_changes_only_its_own_record_and_never_runs_rounds() {
        let me = 7;
        let ok = |c: &Command| check(me, "me", c);
        assert!(ok(&Command::Leave { node_id: me }).is_ok());
        assert!(ok(&Command::Leave { node_id: 8 }).is_err());
        assert!(ok(&Command::SetAddrs {
            node_id: 8,
            addrs: vec![]
        })
        .is_err());
        assert!(ok(&audited(
            "me",
            Command::Rename {
                node_id: me,
                name: "n".into()
            }
        ))
        .is_ok());
        assert!(ok(&audited(
            "me",
            Command::Rename {
                node_id: 8,
                name: "n".into()
            }
        ))
        .is_err());
        // Audit records in another node's name.
        assert!(ok(&audited("other", Command::Remove { node_id: 8 })).is_err());
        assert!(ok(&Command::Audit(vec![AuditEntry::new(
            1, "a", "other", "x", "", ""
        )]))
        .is_err());
        assert!(ok(&Command::Audit(vec![AuditEntry::new(
            1, "a", "me", "x", "", ""
        )]))
        .is_ok());
        // Users' changes, checked by the member's API; an admin's only with its record.
        assert!(ok(&audited("me", Command::Remove { node_id: 8 })).is_ok());
        assert!(ok(&Command::Remove { node_id: 8 }).is_err());
        assert!(ok(&audited("me", Command::Remove { node_id: me })).is_err());
        assert!(ok(&Command::KvPut {
            key: "k".into(),
            value: "1".into(),
            if_version: None
        })
        .is_ok());
        // The leader's steps.
        assert!(ok(&Command::Job(JobCommand::Finish {
            job_id: "j".into(),
            state: crate::jobs::JobState::Done,
            message: String::new(),
        }))
        .is_err());
        assert!(ok(&Command::Job(JobCommand::SetTrainer {
            node_id: 8,
            info: None
        }))
        .is_err());
        assert!(ok(&Command::Job(JobCommand::SetTrainer {
            node_id: me,
            info: None
        }))
        .is_ok());
        // A batch is as good as its worst command.
        assert!(ok(&Command::Batch(vec![
            Command::Leave { node_id: me },
            Command::Leave { node_id: 8 }
        ]))
        .is_err());
    }
}
