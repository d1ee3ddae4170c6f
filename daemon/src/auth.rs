//! How a process proves who it is to NATS: the login flags, credentials in URLs, and what of
//! a URL may be printed.

use std::path::PathBuf;

use crate::DaemonError;

/// How a process proves who it is to NATS, and how it trusts the server. At most one of
/// creds, nkey, user/password and token.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Auth {
    /// NATS credentials file (a user JWT and its nkey seed, as `nsc` writes them).
    #[arg(long, env = "NATS_CREDS", global = true, value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// File holding an nkey seed (`SU...`), as `policyctl auth init` writes one per role.
    #[arg(long, env = "NATS_NKEY_FILE", global = true, value_name = "FILE")]
    pub nkey_file: Option<PathBuf>,
    /// User name (the password comes from NATS_PASSWORD, or from the URL).
    #[arg(long, env = "NATS_USER", global = true)]
    pub user: Option<String>,
    /// Password for --user. Prefer the NATS_PASSWORD variable: arguments show in `ps`.
    #[arg(long, env = "NATS_PASSWORD", global = true, hide_env_values = true)]
    pub password: Option<String>,
    /// Authentication token. Prefer the NATS_TOKEN variable: arguments show in `ps`.
    #[arg(long, env = "NATS_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to verify the server with; implies TLS.
    #[arg(long, env = "NATS_TLS_CA_FILE", global = true, value_name = "FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for servers that verify clients; needs --tls-key-file.
    #[arg(long, env = "NATS_TLS_CERT_FILE", global = true, value_name = "FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "NATS_TLS_KEY_FILE", global = true, value_name = "FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// Where this process's replies arrive. Default `_INBOX.<prefix>.<role>`, the inbox the
    /// role's permissions allow (see `policyctl auth`).
    #[arg(long, env = "NATS_INBOX_PREFIX", global = true)]
    pub inbox_prefix: Option<String>,
    /// The nkey seed of the role's store identity, through which the process reaches
    /// JetStream on a secured bus. Default: `<name>.store.nk` beside --nkey-file, if there.
    #[arg(long, env = "NATS_STORE_NKEY_FILE", global = true, value_name = "FILE")]
    pub store_nkey_file: Option<PathBuf>,
    /// Credentials file of the role's store identity. Default: `<name>.store.creds` beside
    /// --creds, if there.
    #[arg(long, env = "NATS_STORE_CREDS", global = true, value_name = "FILE")]
    pub store_creds: Option<PathBuf>,
}

/// A URL list with every user name, password and token replaced by `***`: what may be
/// printed or logged.
pub fn redact(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let (scheme, rest) = match url.split_once("://") {
                Some((scheme, rest)) => (format!("{scheme}://"), rest),
                None => (String::new(), url),
            };
            let host_end = rest.find('/').unwrap_or(rest.len());
            match rest[..host_end].rfind('@') {
                Some(at) => format!("{scheme}***{}", &rest[at..]),
                None => url.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses a comma-separated URL list; an error names the URL, redacted.
pub fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>, DaemonError> {
    let list: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if list.is_empty() {
        return Err(DaemonError::Url {
            url: String::new(),
            reason: "no URL given".into(),
        });
    }
    list.into_iter()
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| DaemonError::Url {
                    url: redact(u),
                    // The parser may quote the URL back: keep only what it says is wrong.
                    reason: redact_message(&e.to_string(), u),
                })
        })
        .collect()
}

/// Removes a secret-bearing URL (and its user information) from a message.
fn redact_message(message: &str, url: &str) -> String {
    let mut out = message.replace(url, &redact(url));
    if let Some(userinfo) = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split_once('@')
        .map(|(u, _)| u)
    {
        if !userinfo.is_empty() {
            out = out.replace(userinfo, "***");
        }
    }
    out
}

impl Auth {
    /// The login of the role's store identity, if it has one: the given store seed or
    /// credentials, or those beside the role's own (`x.nk` → `x.store.nk`, `x.creds` →
    /// `x.store.creds`), with the same TLS settings.
    pub fn store_identity(&self) -> Option<Auth> {
        let beside = |path: &Option<PathBuf>, ext: &str| {
            let path = path.as_ref()?;
            let stem = path.file_stem()?.to_str()?;
            let store = path.with_file_name(format!("{stem}.store.{ext}"));
            store.exists().then_some(store)
        };
        let nkey_file = self
            .store_nkey_file
            .clone()
            .or_else(|| beside(&self.nkey_file, "nk"));
        let creds = self
            .store_creds
            .clone()
            .or_else(|| beside(&self.creds, "creds"));
        if nkey_file.is_none() && creds.is_none() {
            return None;
        }
        Some(Auth {
            creds,
            nkey_file,
            user: None,
            password: None,
            token: None,
            store_nkey_file: None,
            store_creds: None,
            ..self.clone()
        })
    }

    fn has_login(&self) -> bool {
        self.creds.is_some()
            || self.nkey_file.is_some()
            || self.user.is_some()
            || self.token.is_some()
    }

    /// Takes a user and password (`nats://user:password@host`) or a token (`nats://token@host`)
    /// from the URLs, which async-nats would not send by itself. Credentials in both the URL and
    /// a flag are refused: which one wins would be a guess.
    pub fn with_url_credentials(
        &self,
        addrs: &[async_nats::ServerAddr],
    ) -> Result<Auth, DaemonError> {
        let Some(addr) = addrs.iter().find(|a| a.username().is_some()) else {
            return Ok(self.clone());
        };
        if self.has_login() {
            return Err(DaemonError::Auth(
                "credentials are given both in --nats-url and as flags or environment: give them once".into(),
            ));
        }
        let mut auth = self.clone();
        let user = percent_decode(addr.username().unwrap_or_default());
        match addr.password() {
            Some(password) => {
                auth.user = Some(user);
                auth.password = Some(percent_decode(password));
            }
            None => auth.token = Some(user),
        }
        Ok(auth)
    }

    /// The async-nats options for these credentials and TLS settings.
    pub async fn options(&self) -> Result<async_nats::ConnectOptions, DaemonError> {
        let given: Vec<&str> = [
            ("--creds", self.creds.is_some()),
            ("--nkey-file", self.nkey_file.is_some()),
            ("--user", self.user.is_some()),
            ("--token", self.token.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag))
        .collect();
        if given.len() > 1 {
            return Err(DaemonError::Auth(format!(
                "give one way to log in, not {}",
                given.join(" and ")
            )));
        }
        if self.password.is_some() && self.user.is_none() {
            return Err(DaemonError::Auth(
                "a password (NATS_PASSWORD) needs a user (--user or NATS_USER)".into(),
            ));
        }
        let mut opts = async_nats::ConnectOptions::new();
        if let Some(path) = &self.creds {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|source| DaemonError::Read {
                    what: "credentials file",
                    path: path.clone(),
                    source,
                })?;
        }
        if let Some(path) = &self.nkey_file {
            let text = std::fs::read_to_string(path).map_err(|source| DaemonError::Read {
                what: "nkey seed file",
                path: path.clone(),
                source,
            })?;
            let seed = seed_of(&text).ok_or_else(|| {
                DaemonError::Auth(format!(
                    "{} holds no nkey seed (a line starting with SU)",
                    path.display()
                ))
            })?;
            opts = opts.nkey(seed.to_string());
        }
        if let Some(user) = &self.user {
            opts = opts.user_and_password(user.clone(), self.password.clone().unwrap_or_default());
        }
        if let Some(token) = &self.token {
            opts = opts.token(token.clone());
        }
        if let Some(ca) = &self.tls_ca_file {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => {
                opts = opts
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true)
            }
            (None, None) => {}
            _ => {
                return Err(DaemonError::Auth(
                    "--tls-cert-file and --tls-key-file go together".into(),
                ))
            }
        }
        Ok(opts)
    }
}

/// Undoes a URL's percent-encoding (a password may hold `@` or `:` as `%40`, `%3A`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|b| hex(*b)),
            bytes.get(i + 2).and_then(|b| hex(*b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The seed in an nkey file: the first line that looks like a user seed (comments and blank
/// lines allowed around it).
fn seed_of(text: &str) -> Option<&str> {
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("SU") && l.len() > 50)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_survive_redaction() {
        assert_eq!(
            redact("nats://alice:s3cret@h1:4222, tls://tok3n@h2:4443/x,nats://h3"),
            "nats://***@h1:4222,tls://***@h2:4443/x,nats://h3"
        );
        assert_eq!(redact("bob:pw@host:4222"), "***@host:4222");
        let err = server_addrs("nats://alice:s3cret@h1:notaport")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret") && !err.contains("alice"), "{err}");
        assert_eq!(server_addrs("nats://a:1, nats://b:2,").unwrap().len(), 2);
        assert!(server_addrs(" , ").is_err());
    }

    #[test]
    fn url_credentials_become_a_login() {
        let addrs = server_addrs("nats://h1,nats://al%40ice:p%3Aw@h2").unwrap();
        let auth = Auth::default().with_url_credentials(&addrs).unwrap();
        assert_eq!(auth.user.as_deref(), Some("al@ice"));
        assert_eq!(auth.password.as_deref(), Some("p:w"));
        let addrs = server_addrs("tls://t0ken@h1").unwrap();
        let auth = Auth::default().with_url_credentials(&addrs).unwrap();
        assert_eq!(auth.token.as_deref(), Some("t0ken"));
        let twice = Auth {
            token: Some("x".into()),
            ..Default::default()
        };
        assert!(twice.with_url_credentials(&addrs).is_err());
    }

    #[test]
    fn nkey_files_may_carry_comments() {
        let seed = "SUAGMJH5XLGZKQQWAWKRZJIGMOU4HPFUYLXJMXOO5NLFEO2OOQJ5LPRDPM";
        assert_eq!(seed_of(&format!("# role: gateway\n\n{seed}\n")), Some(seed));
        assert_eq!(seed_of("not a seed"), None);
    }
}
