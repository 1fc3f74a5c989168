//! What the leader takes from a member that forwards a write.
//!
//! A member forwards two kinds of writes: changes to its own record (its addresses, name,
//! sealing key, trainer registration, leaving), and changes a caller of its API asked for
//! (kv, jobs, API keys, removals, join tokens), which that member checked against the caller's
//! key and role.
//!
//! [`check`] refuses what no member may ask for: a change to another member's own record, the
//! steps only the leader takes (founding, admitting a node, running rounds), and audit records
//! in another node's name. So a compromised member cannot, for example, commit a round result,
//! register another node as a trainer, make another member leave or publish a key for it, or
//! write audit entries that blame another node.
//!
//! [`authorize`] decides admin changes (`Command::is_admin_change`). By default the leader
//! takes a member's word that its caller was an admin (keyless loopback callers carry no key).
//! With [`ADMIN_REQUIRES_KEY`] on, and to turn it on, it takes none: an admin change must
//! come with an unrevoked admin API key, which the leader checks itself against the
//! replicated records, and its audit record must name that key. The state machine checks
//! again that the named key is an unrevoked admin key when the change applies, and keeps the
//! last admin key (`state.rs`, `admin_rule`), so nothing committed in between slips through.
//! Join tokens then admit only if such a change registered them (`Command::IssueToken`) with
//! the same issuer, so a compromised member can neither mint keys, remove members nor let
//! others in on a token.

use crate::access::{
    api_key_id, key_matches, ApiKeyCommand, AuditEntry, Credential, Role, ADMIN_REQUIRES_KEY,
};
use crate::jobs::JobCommand;
use crate::state::ClusterState;
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
        Command::Remove { .. } | Command::ApiKey(_) | Command::IssueToken { .. } if !audited => {
            Err("removals, API key changes and join tokens must carry their audit record".into())
        }
        Command::Remove { .. }
        | Command::KvPut { .. }
        | Command::KvDelete { .. }
        | Command::ApiKey(_)
        | Command::IssueToken { .. } => Ok(()),
    }
}

/// On the leader, for every write wherever it entered: whether `credential` allows `cmd` in
/// `state` (see the module doc); the reason if not.
pub(crate) fn authorize(
    state: &ClusterState,
    cmd: &Command,
    credential: Option<&Credential>,
) -> Result<(), String> {
    if !cmd.is_admin_change() || !(state.admin_requires_key() || cmd.turns_on_admin_keys()) {
        return Ok(());
    }
    let Some(credential) = credential else {
        return Err(format!(
            "an admin change needs an admin API key here ({ADMIN_REQUIRES_KEY} is on, or being \
             turned on); no key came with it"
        ));
    };
    let key = credential.expose();
    let record = api_key_id(key)
        .and_then(|id| state.api_keys.get(id))
        .filter(|r| key_matches(r, key))
        .ok_or("an admin change came with an unknown, revoked or malformed API key")?;
    if record.role < Role::Admin {
        return Err(format!(
            "an admin change needs an admin API key; key {} is {}",
            record.id, record.role
        ));
    }
    let actor = format!("apikey:{}", record.id);
    names_actor(cmd, &actor, false)
}

/// Whether every admin change in `cmd` is audited (`audited`: `cmd` is inside an audit
/// record) in `actor`'s name. (That the key is still an admin's when the change applies, and
/// that the last admin key stays, the state machine decides: `state.rs`, `admin_rule`.)
fn names_actor(cmd: &Command, actor: &str, audited: bool) -> Result<(), String> {
    match cmd {
        Command::Batch(cmds) => cmds.iter().try_for_each(|c| names_actor(c, actor, audited)),
        Command::Audited { entry, cmd } if cmd.is_admin_change() => {
            if entry.actor != actor {
                return Err(format!(
                    "the audit record names {:?}, not {actor}, the key that came with it",
                    entry.actor
                ));
            }
            names_actor(cmd, actor, true)
        }
        c if c.is_admin_change() && !audited => {
            Err("an admin change must carry its audit record".into())
        }
        Command::ApiKey(ApiKeyCommand::Create(r)) if r.created_by != actor => Err(format!(
            "the new key names {:?} as its creator, not {actor}",
            r.created_by
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{generate_api_key, AuditEntry};

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

    #[test]
    fn with_admin_keys_required_only_an_admin_key_makes_admin_changes() {
        let mut state = ClusterState::default();
        let admin = generate_api_key("a", Role::Admin, "local", 1);
        let operator = generate_api_key("o", Role::Operator, "local", 1);
        for k in [&admin, &operator] {
            state.api_keys.insert(k.record.id.clone(), k.record.clone());
        }
        let admin_actor = format!("apikey:{}", admin.record.id);
        let admin_cred = Credential::new(admin.key.clone());
        let operator_cred = Credential::new(operator.key.clone());
        let create = |actor: &str| Command::Audited {
            entry: AuditEntry::new(1, actor, "m", "apikey.create", "x", "admin"),
            cmd: Box::new(Command::ApiKey(ApiKeyCommand::Create(
                generate_api_key("new", Role::Admin, actor, 1).record,
            ))),
        };
        let kv = |key: &str| Command::KvPut {
            key: key.into(),
            value: "1".into(),
            if_version: None,
        };
        // Off: a member's word is enough, except to turn it on.
        assert!(authorize(&state, &create("local"), None).is_ok());
        let turn_on = Command::Audited {
            entry: AuditEntry::new(1, "local", "m", "setting.put", ADMIN_REQUIRES_KEY, "true"),
            cmd: Box::new(Command::KvPut {
                key: ADMIN_REQUIRES_KEY.into(),
                value: "true".into(),
                if_version: None,
            }),
        };
        assert!(authorize(&state, &turn_on, None).is_err());
        state.kv.insert(
            ADMIN_REQUIRES_KEY.into(),
            crate::state::KvEntry {
                value: "true".into(),
                version: 1,
            },
        );
        // On: no key, a lesser key, a wrong or revoked key, or a record in another name.
        assert!(authorize(&state, &create("local"), None).is_err());
        let as_operator = format!("apikey:{}", operator.record.id);
        assert!(authorize(&state, &create(&as_operator), Some(&operator_cred)).is_err());
        let forged = Credential::new(format!("amk_{}.wrong", admin.record.id));
        assert!(authorize(&state, &create(&admin_actor), Some(&forged)).is_err());
        assert!(authorize(&state, &create("local"), Some(&admin_cred)).is_err());
        assert!(authorize(&state, &create(&admin_actor), Some(&admin_cred)).is_ok());
        // Settings under security. are admin changes, audited; other keys are not.
        assert!(authorize(&state, &kv("security.x"), None).is_err());
        assert!(authorize(&state, &kv("security.x"), Some(&admin_cred)).is_err());
        let setting = Command::Audited {
            entry: AuditEntry::new(1, &admin_actor, "m", "setting.put", "security.x", ""),
            cmd: Box::new(kv("security.x")),
        };
        assert!(authorize(&state, &setting, Some(&admin_cred)).is_ok());
        assert!(authorize(&state, &kv("app.x"), None).is_ok());
        // Tokens and removals too, inside a batch as well.
        let token = Command::Audited {
            entry: AuditEntry::new(1, &admin_actor, "m", "token.issue", "t", ""),
            cmd: Box::new(Command::IssueToken {
                nonce: vec![1; 16],
                issuer: 1,
                expires_at: 10,
                issued_at: 1,
            }),
        };
        assert!(authorize(&state, &token, Some(&admin_cred)).is_ok());
        assert!(authorize(&state, &Command::Batch(vec![kv("app.x"), token]), None).is_err());
        // A revoked key no longer counts.
        if let Some(k) = state.api_keys.get_mut(&admin.record.id) {
            k.revoked_at_ms = Some(3);
        }
        assert!(authorize(&state, &create(&admin_actor), Some(&admin_cred)).is_err());
    }
}
