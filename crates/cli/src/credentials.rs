//! `cairn credential issue | revoke | list`: client credentials, made and revoked by the
//! administrator. A credential is a key made here and a certificate meta signs for it, naming
//! the credential's id; what it allows (its scope) lives in meta's replicated state, so a
//! revocation holds on every meta server at once.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use cairn_proto as pb;
use cairn_trust::TrustFiles;

use crate::cluster::on_leader;

const DEADLINE: Duration = Duration::from_secs(30);
/// The unprivileged identity root (and ids outside a credential's ranges) act as by default.
pub const NOBODY: u32 = 65534;

// The options of `cairn credential issue`: the new credential's scope and where it goes.
#[derive(clap::Args, Debug)]
pub struct IssueOptions {
    /// A name to know it by (revoke takes it too).
    #[arg(long)]
    pub name: String,
    /// Where to write the credential (mode 0600).
    #[arg(long)]
    pub out: PathBuf,
    /// Allow no change at all (the mount is read-only).
    #[arg(long)]
    pub read_only: bool,
    /// Confine the credential to this directory (a path from the file system's root): its
    /// mounts see it as their root.
    #[arg(long)]
    pub subtree: Option<String>,
    /// The user ids the client may act as, e.g. 1000-1999,3000 (default: any but root).
    #[arg(long)]
    pub uids: Option<String>,
    /// The group ids the client may act as (default: any but root's).
    #[arg(long)]
    pub gids: Option<String>,
    /// Let root act as root instead of as the squash identity.
    #[arg(long)]
    pub allow_root: bool,
    /// The identity root and ids outside the ranges act as.
    #[arg(long, default_value = "65534:65534")]
    pub squash: String,
    /// How long the credential is valid: 90s, 30m, 12h, 365d.
    #[arg(long, default_value = "365d")]
    pub expires: String,
}

pub async fn issue(meta: &[String], options: IssueOptions) -> Result<pb::Credential> {
    let (squash_uid, squash_gid) = parse_squash(&options.squash)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let scope = pb::CredentialScope {
        read_only: options.read_only,
        subtree: options.subtree.unwrap_or_default(),
        uids: options.uids.as_deref().map(parse_ranges).transpose()?.unwrap_or_default(),
        gids: options.gids.as_deref().map(parse_ranges).transpose()?.unwrap_or_default(),
        allow_root: options.allow_root,
        squash_uid,
        squash_gid,
        expires_ms: (now + parse_duration(&options.expires)?).as_millis() as u64,
    };
    let (key_pem, request_pem) = cairn_trust::new_key_and_request()?;
    let request = pb::IssueCredentialRequest { name: options.name, scope: Some(scope), request_pem };
    let reply = on_leader(meta, DEADLINE, |mut c| {
        let request = request.clone();
        async move { c.issue_credential(request).await }
    })
    .await?;
    let files = TrustFiles { authority_pem: reply.authority_pem, chain_pem: reply.chain_pem, key_pem };
    files.save_bundle(&options.out).with_context(|| format!("writing {}", options.out.display()))?;
    reply.credential.context("meta's reply named no credential")
}

pub async fn issue_command(meta: Vec<String>, options: IssueOptions) -> Result<()> {
    let out = options.out.clone();
    let credential = issue(&meta, options).await?;
    println!(
        "credential {} ({}) written to {}: mount with --credential {}",
        credential.id,
        credential.name,
        out.display(),
        out.display()
    );
    Ok(())
}

/// Revokes by id (a number) or by name.
pub async fn revoke(meta: &[String], which: &str) -> Result<pb::Credential> {
    let request = match which.parse::<u64>() {
        Ok(id) => pb::RevokeCredentialRequest { id, name: String::new() },
        Err(_) => pb::RevokeCredentialRequest { id: 0, name: which.to_string() },
    };
    let reply = on_leader(meta, DEADLINE, |mut c| {
        let request = request.clone();
        async move { c.revoke_credential(request).await }
    })
    .await?;
    reply.credential.context("meta's reply named no credential")
}

pub async fn revoke_command(meta: Vec<String>, which: String) -> Result<()> {
    let credential = revoke(&meta, &which).await?;
    println!(
        "credential {} ({}) revoked: every request made with it is refused from now on",
        credential.id, credential.name
    );
    Ok(())
}

pub async fn list_command(meta: Vec<String>, json: bool) -> Result<()> {
    let reply =
        on_leader(&meta, DEADLINE, |mut c| async move { c.list_credentials(pb::ListCredentialsRequest {}).await })
            .await?;
    if json {
        let all: Vec<serde_json::Value> = reply.credentials.iter().map(credential_json).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    for credential in &reply.credentials {
        let scope = credential.scope.clone().unwrap_or_default();
        let state = if credential.revoked { "revoked" } else { "active" };
        println!(
            "{:>4}  {:<20} {:<8} {} subtree={} uids={} gids={} root={} expires={}",
            credential.id,
            credential.name,
            state,
            if scope.read_only { "read-only " } else { "read-write" },
            if scope.subtree.is_empty() { "/" } else { &scope.subtree },
            ranges_text(&scope.uids),
            ranges_text(&scope.gids),
            if scope.allow_root {
                "allowed".to_string()
            } else {
                format!("squashed to {}:{}", scope.squash_uid, scope.squash_gid)
            },
            humantime_ms(scope.expires_ms),
        );
    }
    Ok(())
}

fn credential_json(credential: &pb::Credential) -> serde_json::Value {
    let scope = credential.scope.clone().unwrap_or_default();
    let ranges = |r: &[pb::IdRange]| r.iter().map(|r| [r.first, r.last]).collect::<Vec<_>>();
    serde_json::json!({
        "id": credential.id,
        "name": credential.name,
        "revoked": credential.revoked,
        "issued_ms": credential.issued_ms,
        "read_only": scope.read_only,
        "subtree": scope.subtree,
        "uids": ranges(&scope.uids),
        "gids": ranges(&scope.gids),
        "allow_root": scope.allow_root,
        "squash_uid": scope.squash_uid,
        "squash_gid": scope.squash_gid,
        "expires_ms": scope.expires_ms,
    })
}

fn ranges_text(ranges: &[pb::IdRange]) -> String {
    if ranges.is_empty() {
        return "any".into();
    }
    ranges
        .iter()
        .map(|r| if r.first == r.last { r.first.to_string() } else { format!("{}-{}", r.first, r.last) })
        .collect::<Vec<_>>()
        .join(",")
}

fn humantime_ms(ms: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    if ms <= now { "expired".into() } else { format!("in {}h", (ms - now) / 3_600_000) }
}

/// "1000-1999,3000" → ranges.
pub fn parse_ranges(text: &str) -> Result<Vec<pb::IdRange>> {
    let mut ranges = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        let first: u32 = first.trim().parse().with_context(|| format!("id range {part:?}"))?;
        let last: u32 = last.trim().parse().with_context(|| format!("id range {part:?}"))?;
        if first > last {
            bail!("id range {part:?} ends before it starts");
        }
        ranges.push(pb::IdRange { first, last });
    }
    if ranges.is_empty() {
        bail!("no id range in {text:?}");
    }
    Ok(ranges)
}

/// "UID:GID".
fn parse_squash(text: &str) -> Result<(u32, u32)> {
    let (uid, gid) = text.split_once(':').with_context(|| format!("--squash {text:?}: UID:GID expected"))?;
    Ok((uid.parse().context("--squash uid")?, gid.parse().context("--squash gid")?))
}

/// "90s", "30m", "12h", "365d".
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().with_context(|| format!("duration {text:?}: a number and s, m, h or d"))?;
    let seconds = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("duration {text:?}: the unit is s, m, h or d"),
    };
    if number == 0 {
        bail!("duration {text:?} is zero");
    }
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_durations_parse() {
        let ranges = parse_ranges("1000-1999, 3000").unwrap();
        assert_eq!(ranges, vec![pb::IdRange { first: 1000, last: 1999 }, pb::IdRange { first: 3000, last: 3000 }]);
        assert!(parse_ranges("5-1").is_err());
        assert!(parse_ranges("").is_err());
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("0h").is_err());
        assert_eq!(parse_squash("65534:100").unwrap(), (65534, 100));
    }
}
