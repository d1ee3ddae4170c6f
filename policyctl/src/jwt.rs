//! `policyctl auth init --jwt`: the secured bus in NATS's operator mode. The same accounts,
//! users and permissions as `accounts.conf` (`bus::accounts`, `bus::roles`), as JWTs: an
//! operator, a system account, one account JWT per account (exports, imports, JetStream
//! limits), one user JWT per identity, signed by its account; a `.creds` file per identity
//! beside its `.nk` (the user JWT and the same seed, as `nsc` writes them), and `nats-jwt.conf`,
//! a server configuration that trusts the operator and preloads every account (a memory
//! resolver). Processes log in with `--creds DIR/<role>.creds`, and find their store identity's
//! `<role>.store.creds` beside it.
//!
//! An export that only some accounts may import (every one here) requires an activation token,
//! which the exporting account signs for each importer and the importer carries in its import.
//!
//! Written with serde and nkeys rather than a JWT crate: the Rust ones either sign only account
//! and user claims (`nats-jwt`), or generate their types at build time with typify and syn
//! (`nats-io-jwt`), a large build for the dozen fields used here. nats-server itself checks
//! every token in the end-to-end test.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use base64::Engine as _;
use bus::accounts::{self, Account};
use bus::roles::Role;
use bus::Subjects;
use serde_json::{json, Value};

/// Where the operator's and the accounts' seeds are kept, under the auth directory.
const KEYS: &str = "jwt";

pub fn conf_file(dir: &Path) -> PathBuf {
    dir.join("nats-jwt.conf")
}

pub fn creds_file(dir: &Path, role: &Role, store: bool) -> PathBuf {
    let stem = if store {
        format!("{}.store", role.name())
    } else {
        role.name()
    };
    dir.join(format!("{stem}.creds"))
}

/// A key pair kept in `dir/jwt/<name>.nk`, made on first use.
fn key(dir: &Path, name: &str, make: fn() -> nkeys::KeyPair) -> anyhow::Result<nkeys::KeyPair> {
    let keys = dir.join(KEYS);
    std::fs::create_dir_all(&keys).with_context(|| format!("cannot create {}", keys.display()))?;
    let path = keys.join(format!("{name}.nk"));
    if let Ok(text) = std::fs::read_to_string(&path) {
        return nkeys::KeyPair::from_seed(text.trim())
            .map_err(|e| anyhow!("{}: not a valid nkey seed: {e}", path.display()));
    }
    let pair = make();
    let seed = pair
        .seed()
        .map_err(|e| anyhow!("cannot make an nkey: {e}"))?;
    std::fs::write(&path, format!("{seed}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    crate::auth::restrict(&path, 0o600)?;
    Ok(pair)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signed JWT: `sub` is whom it is about, `nats` the type's claims, signed by `issuer`.
fn sign(issuer: &nkeys::KeyPair, sub: &str, name: &str, nats: Value) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut claims = json!({
        "jti": "",
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": sub,
        "nats": nats,
    });
    // The id is the hash of the claims without it, as nats-io/jwt computes it.
    let digest = ring::digest::digest(&ring::digest::SHA512_256, claims.to_string().as_bytes());
    claims["jti"] = Value::from(data_encoding::BASE32_NOPAD.encode(digest.as_ref()));
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = b64(claims.to_string().as_bytes());
    let signing_input = format!("{header}.{body}");
    let signature = issuer
        .sign(signing_input.as_bytes())
        .map_err(|e| anyhow!("cannot sign: {e}"))?;
    Ok(format!("{signing_input}.{}", b64(&signature)))
}

fn limits(jetstream: Option<bus::store::Limits>) -> Value {
    let (mem, disk, streams, consumers) = match jetstream {
        Some(l) => (l.max_mem, l.max_file, l.max_streams, l.max_consumers),
        // No JetStream in this account.
        None => (0, 0, 0, 0),
    };
    json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": mem, "disk_storage": disk, "streams": streams, "consumer": consumers,
    })
}

/// An account's JWT: its exports (each for the named accounts only, so each needs an
/// activation), its imports with the activations their exporters signed.
fn account_jwt(
    operator: &nkeys::KeyPair,
    account: &Account,
    pairs: &std::collections::BTreeMap<String, nkeys::KeyPair>,
) -> anyhow::Result<String> {
    let pair = |name: &str| {
        pairs
            .get(name)
            .ok_or_else(|| anyhow!("no key for account {name}"))
    };
    let kind = |service: bool| if service { "service" } else { "stream" };
    let exports: Vec<Value> = account
        .exports
        .iter()
        .map(|e| {
            let mut x = json!({
                "name": e.subject,
                "subject": e.subject,
                "type": kind(e.service),
                "token_req": true,
            });
            if e.streamed {
                x["response_type"] = Value::from("Stream");
            }
            x
        })
        .collect();
    let mut imports = Vec::new();
    for i in &account.imports {
        let exporter = pair(&i.account)?;
        let activation = sign(
            exporter,
            &pair(&account.name)?.public_key(),
            &i.subject,
            json!({"subject": i.subject, "kind": kind(i.service), "type": "activation", "version": 2}),
        )?;
        let mut x = json!({
            "name": i.subject,
            "subject": i.subject,
            "account": exporter.public_key(),
            "token": activation,
            "type": kind(i.service),
        });
        if i.local != i.subject {
            x["local_subject"] = Value::from(i.local.clone());
        }
        imports.push(x);
    }
    sign(
        operator,
        &pair(&account.name)?.public_key(),
        &account.name,
        json!({
            "type": "account", "version": 2,
            "limits": limits(account.jetstream),
            "exports": exports, "imports": imports,
            "default_permissions": {"pub": {}, "sub": {}},
        }),
    )
}

fn user_jwt(
    account: &nkeys::KeyPair,
    user: &str,
    name: &str,
    p: &bus::roles::Permissions,
) -> anyhow::Result<String> {
    let mut sub = json!({"allow": p.subscribe});
    if !p.deny_subscribe.is_empty() {
        sub["deny"] = json!(p.deny_subscribe);
    }
    sign(
        account,
        user,
        name,
        json!({
            "type": "user", "version": 2,
            "pub": {"allow": p.publish}, "sub": sub,
            "subs": -1, "data": -1, "payload": -1,
        }),
    )
}

/// A `.creds` file, as `nsc` writes one.
fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// Writes the operator-mode files for every identity with a seed in `dir` (`auth::ensure`
/// wrote them): the creds files and `nats-jwt.conf`. Keys are kept, tokens signed anew.
pub fn ensure(dir: &Path, subjects: &Subjects) -> anyhow::Result<Vec<PathBuf>> {
    let users = crate::auth::seeds(dir)?;
    let mut roles: Vec<Role> = users
        .iter()
        .filter(|(_, store, _)| !store)
        .map(|(r, _, _)| r.clone())
        .collect();
    roles.dedup();
    let layout = accounts::layout(subjects, &roles);
    let operator = key(dir, "operator", nkeys::KeyPair::new_operator)?;
    let system = key(dir, "SYS", nkeys::KeyPair::new_account)?;
    let mut pairs = std::collections::BTreeMap::new();
    for account in &layout {
        pairs.insert(
            account.name.clone(),
            key(dir, &account.name, nkeys::KeyPair::new_account)?,
        );
    }
    let mut preload = vec![(
        system.public_key(),
        sign(
            &operator,
            &system.public_key(),
            "SYS",
            json!({"type": "account", "version": 2, "limits": limits(None)}),
        )?,
    )];
    for account in &layout {
        preload.push((
            pairs[&account.name].public_key(),
            account_jwt(&operator, account, &pairs)?,
        ));
    }
    let mut written = Vec::new();
    for (role, store, seed) in &users {
        let Some(account) = layout
            .iter()
            .find(|a| a.users.contains(&(role.clone(), *store)))
        else {
            continue;
        };
        let pair = nkeys::KeyPair::from_seed(seed)
            .map_err(|e| anyhow!("{role}: not a valid nkey seed: {e}"))?;
        let permissions = if *store {
            role.store_permissions(subjects)
        } else {
            role.permissions_among(subjects, &roles)
        };
        let name = if *store {
            format!("{role}.store")
        } else {
            role.name()
        };
        let jwt = user_jwt(
            &pairs[&account.name],
            &pair.public_key(),
            &name,
            &permissions,
        )?;
        let path = creds_file(dir, role, *store);
        std::fs::write(&path, creds(&jwt, seed))
            .with_context(|| format!("cannot write {}", path.display()))?;
        crate::auth::restrict(&path, 0o600)?;
        written.push(path);
    }
    let operator_jwt = sign(
        &operator,
        &operator.public_key(),
        "policy-bus",
        json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
    )?;
    let mut conf = String::from(
        "# policy-bus: a nats-server configuration in operator mode, written by `policyctl auth\n\
         # init --jwt`. The operator, the accounts and their limits are JWTs (keys in jwt/);\n\
         # processes log in with <role>.creds. Run it where the JetStream store is to live:\n\
         #   nats-server -c <this file>\n",
    );
    conf.push_str(&format!(
        "operator: \"{operator_jwt}\"\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n",
        system.public_key()
    ));
    for (public, jwt) in &preload {
        conf.push_str(&format!("  {public}: \"{jwt}\"\n"));
    }
    // A process's CONNECT carries its user JWT, which holds its permissions: the dispatcher's
    // store identity's exceed the default 4 KiB control line.
    conf.push_str("}\njetstream { store_dir: \"jetstream\" }\nmax_control_line: 16384\n");
    let path = conf_file(dir);
    std::fs::write(&path, conf).with_context(|| format!("cannot write {}", path.display()))?;
    written.push(path);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(jwt: &str) -> Value {
        let body = jwt.split('.').nth(1).expect("three parts");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .expect("base64url");
        serde_json::from_slice(&bytes).expect("json")
    }

    #[test]
    fn tokens_are_signed_by_their_issuer_and_carry_the_layout() {
        let operator = nkeys::KeyPair::new_operator();
        let account = nkeys::KeyPair::new_account();
        let jwt = sign(
            &operator,
            &account.public_key(),
            "POLICY",
            json!({"type": "account", "version": 2}),
        )
        .expect("sign");
        let (input, signature) = jwt.rsplit_once('.').expect("signed");
        let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(signature)
            .expect("base64url");
        operator
            .verify(input.as_bytes(), &signature)
            .expect("the operator's signature");
        let c = claims(&jwt);
        assert_eq!(c["iss"], Value::from(operator.public_key()));
        assert_eq!(c["sub"], Value::from(account.public_key()));
        assert_eq!(c["jti"].as_str().map(str::len), Some(52));
    }

    #[test]
    fn every_identity_gets_creds_in_its_account_and_the_server_every_account() {
        let dir = tempfile::tempdir().expect("dir");
        let s = Subjects::default();
        crate::auth::ensure(dir.path(), &s, &Role::shipped()).expect("seeds");
        ensure(dir.path(), &s).expect("jwt");
        let text = std::fs::read_to_string(creds_file(dir.path(), &Role::Dispatcher, true))
            .expect("creds");
        let jwt = text.lines().nth(1).expect("jwt line");
        let c = claims(jwt);
        assert_eq!(c["nats"]["type"], "user");
        let allow = c["nats"]["pub"]["allow"].as_array().expect("allow");
        assert!(allow.contains(&Value::from("policy._js.API.$KV.policy_config.pol.>")));
        // A site's fleet documents come from the hub's source alone (`bus::fleet`).
        assert!(!allow.contains(&Value::from("policy._js.API.$KV.policy_config.>")));
        let conf = std::fs::read_to_string(conf_file(dir.path())).expect("conf");
        assert_eq!(
            conf.lines()
                .filter(|l| l.starts_with("  A") && l.contains(": \"ey"))
                .count(),
            accounts::layout(&s, &Role::shipped()).len() + 1,
            "every account and the system account preloaded"
        );
        assert!(!creds_file(dir.path(), &Role::Gateway, true).exists());
    }
}
