//! The one-shot commands: each prints its result (a table, or JSON with `--json`) or fails
//! with one clear line.

use anyhow::{anyhow, Context};
use bus::admin::{PolicyRef, Subscription};
use bus::fleet::Level;
use bus::roles::Role;
use bus::{AdminClient, Client, EventName};

use crate::print::{out, parse_attributes};
use crate::{auth, files, output, AgentCommand, Cli, Command, PolicyCommand};

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let subjects = cli.common.subjects()?;
    match &cli.command {
        Command::Up {
            examples,
            every,
            metrics_addr,
            secure,
            auth_dir,
            cluster,
            sites,
            site_examples,
        } => {
            if let Some(sites) = sites {
                let demo = crate::fleet_up::Demo {
                    examples,
                    site_examples,
                    every: *every,
                    metrics_addr,
                    sites: usize::from(*sites),
                    auth: secure.then(|| auth_dir.join("fleet")),
                };
                return crate::fleet_up::run(&cli.common, demo).await;
            }
            let auth = secure.then_some(auth_dir.as_path());
            let nodes = usize::from(*cluster);
            return crate::up::run(&cli.common, examples, *every, metrics_addr, auth, nodes).await;
        }
        Command::Auth(cmd) => return auth::command::run(cmd, &subjects),
        Command::Probe { url } => return probe(url),
        Command::Completions { shell } => {
            crate::completions(*shell, &mut std::io::stdout());
            return Ok(());
        }
        _ => {}
    }
    // `emit` and `bench` act as a gateway; everything else is the operator's.
    let role = match cli.command {
        Command::Emit { .. }
        | Command::Bench { .. }
        | Command::Explain { .. }
        | Command::Test { .. } => Role::Gateway,
        _ => Role::Operator,
    };
    let (nats, mut refused) = cli
        .common
        .connect_watched("policyctl", false, &role)
        .await?;
    let login = cli
        .common
        .auth
        .nkey_file
        .as_ref()
        .map_or("this login".to_string(), |f| {
            format!("the login {}", f.display())
        });
    // A command the server does not permit would otherwise wait out its timeout.
    tokio::select! {
        done = command(cli, nats, subjects) => done,
        Some(e) = refused.recv() => Err(anyhow!(
            "the NATS server refused it: {e}. It needs the {role} role, and {login} does not have its permissions"
        )),
    }
}

async fn command(
    cli: Cli,
    nats: async_nats::Client,
    subjects: bus::Subjects,
) -> anyhow::Result<()> {
    let admin = AdminClient::new(nats.clone(), subjects.clone());
    match cli.command {
        Command::Subscribe {
            event,
            agent,
            priority,
            timeout,
            failure,
            observe,
            force,
        } => {
            let sub = Subscription {
                event: EventName::new(&event)?,
                agent,
                priority,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                failure: failure.into(),
                observe,
            };
            sub.validate().map_err(|e| anyhow!(e))?;
            admin
                .subscribe_with(&bus::admin::Subscribe::new(sub.clone(), force))
                .await?;
            out!(
                "subscribed {} to {} at priority {}",
                sub.agent,
                sub.event,
                sub.priority
            );
        }
        Command::Unsubscribe { event, agent } => {
            admin.unsubscribe(&event, &agent).await?;
            out!("unsubscribed {agent} from {event}");
        }
        Command::Subscriptions { event, output } => {
            let all = admin.subscriptions_by_level(event.as_deref()).await?;
            // At a site of a fleet, the fleet's too, each row saying whose.
            let levels = !all.fleet.is_empty();
            let print = |out: &dyn Fn() -> anyhow::Result<()>| match levels {
                true => output::print(output.get(), &all, out),
                false => output::print(output.get(), &all.subscriptions, out),
            };
            print(&|| {
                let rows: Vec<Vec<String>> = [
                    (Level::Site, &all.subscriptions),
                    (Level::Fleet, &all.fleet),
                ]
                .into_iter()
                .flat_map(|(level, subs)| subs.iter().map(move |s| (level, s)))
                .map(|(level, s)| {
                    let mut row = vec![
                        s.event.to_string(),
                        s.agent.clone(),
                        s.priority.to_string(),
                        format!("{}ms", s.timeout_ms),
                        s.failure.as_str().to_string(),
                        if s.observe { "yes" } else { "no" }.to_string(),
                    ];
                    if levels {
                        row.push(level.to_string());
                    }
                    row
                })
                .collect();
                let mut header = vec![
                    "EVENT", "AGENT", "PRIORITY", "TIMEOUT", "FAILURE", "OBSERVE",
                ];
                if levels {
                    header.push("LEVEL");
                }
                for l in output::table(&header, &rows) {
                    out!("{l}");
                }
                Ok(())
            })?;
        }
        Command::Policy(PolicyCommand::Add { files: paths }) => {
            let docs = files::read_policies(&paths)?;
            let added = files::add_policies(&admin, &docs).await?;
            for r in &added.stored {
                out!("stored {}/{}", r.agent, r.id);
            }
            for r in &added.unchanged {
                out!("unchanged {}/{}", r.agent, r.id);
            }
        }
        Command::Agent(cmd) => agent(&admin, cmd).await?,
        Command::Policy(PolicyCommand::Remove { agent, id }) => {
            admin.policy_remove(&agent, &id).await?;
            out!("removed {agent}/{id}");
        }
        Command::Policy(PolicyCommand::List { agent, output }) => {
            let all = admin.policy_list_by_level(agent.as_deref()).await?;
            let policies = &all.policies;
            if let (Some(kind), true) = (&agent, policies.is_empty() && all.fleet.is_empty()) {
                // The kinds that have policies, and the shipped ones: the closest is likely
                // what was meant.
                let mut known: Vec<String> = admin
                    .policy_list(None)
                    .await
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|p| PolicyRef::of(p).ok().map(|r| r.agent))
                    .collect();
                known.extend(bus::subject::SHIPPED_KINDS.iter().map(|k| k.to_string()));
                let hint = bus::subject::did_you_mean(kind, known.iter().map(String::as_str))
                    .filter(|k| k != kind)
                    .map(|k| format!(" (did you mean `{k}`?)"))
                    .unwrap_or_default();
                return Err(crate::explain::Exit(
                    1,
                    format!("no policies of agent kind `{kind}` are stored{hint}"),
                )
                .into());
            }
            let levels = !all.fleet.is_empty();
            let table = || {
                let rows: Vec<Vec<String>> = [(Level::Site, policies), (Level::Fleet, &all.fleet)]
                    .into_iter()
                    .flat_map(|(level, docs)| docs.iter().map(move |p| (level, p)))
                    .map(|(level, p)| {
                        let r = PolicyRef::of(p).unwrap_or(PolicyRef {
                            agent: "?".into(),
                            id: "?".into(),
                        });
                        let doc = serde_json::to_string(p).unwrap_or_default();
                        match levels {
                            true => vec![r.agent, r.id, level.to_string(), doc],
                            false => vec![r.agent, r.id, doc],
                        }
                    })
                    .collect();
                let header: &[&str] = match levels {
                    true => &["AGENT", "ID", "LEVEL", "DOCUMENT"],
                    false => &["AGENT", "ID", "DOCUMENT"],
                };
                for l in output::table(header, &rows) {
                    out!("{l}");
                }
                Ok(())
            };
            match levels {
                true => output::print(output.get(), &all, table)?,
                false => output::print(output.get(), policies, table)?,
            }
        }
        Command::Apply {
            mut paths,
            filename,
            dry_run,
            prune,
            force,
            keep_going,
            prune_source,
        } => {
            paths.extend(filename);
            let options = crate::declarative::ApplyOptions {
                dry_run,
                prune,
                force,
                keep_going,
                prune_source,
            };
            let inputs = crate::declarative::read_inputs(&paths, keep_going)?;
            let (applied, steps) = crate::apply_parts::apply(&admin, &inputs, options).await?;
            for l in crate::declarative::report(&applied, &inputs, steps) {
                out!("{l}");
            }
            let skipped = inputs.refused.len() + applied.skipped.len();
            if skipped > 0 {
                return Err(crate::explain::Exit(
                    1,
                    format!("{skipped} documents skipped (listed above); the rest is stored"),
                )
                .into());
            }
        }
        Command::Load { dir } => {
            let inputs = crate::declarative::read_inputs(&[dir], false)?;
            let (applied, steps) =
                crate::apply_parts::apply(&admin, &inputs, Default::default()).await?;
            for l in crate::declarative::report(&applied, &inputs, steps) {
                out!("{l}");
            }
        }
        Command::Diff {
            mut paths,
            filename,
        } => {
            paths.extend(filename);
            crate::declarative::diff(&admin, &paths).await?
        }
        Command::Status { output } => {
            let status = admin.status().await?;
            output::print(output.get(), &status, || {
                out!(
                    "configuration revision {}: {} subscriptions, {} policies; apply stores {}",
                    status.revision,
                    status.subscriptions,
                    status.policies,
                    match status.atomic_apply {
                        true => "in one atomic batch",
                        false => "key by key, rolling back on a failure (the bucket was not created on nats-server 2.12+)",
                    }
                );
                if let Some(f) = &status.fleet {
                    out!("{}", crate::print::fleet_status(f));
                }
                if !status.sites.is_empty() {
                    let rows: Vec<Vec<String>> =
                        status.sites.iter().map(crate::print::site_row).collect();
                    for l in output::table(&["SITE", "REVISION", "LAG", "LAST HEARD"], &rows) {
                        out!("{l}");
                    }
                }
                Ok(())
            })?;
        }
        Command::Export { dir } => crate::declarative::export(&admin, &dir).await?,
        Command::Emit {
            event,
            attributes,
            dry_run,
        } => {
            let attrs = parse_attributes(&attributes)?;
            let decision = Client::new(nats, subjects)
                .with_dry_run(dry_run)
                .emit(&event, &attrs)
                .await?;
            out!("{}", serde_json::to_string_pretty(&decision)?);
        }
        Command::Explain { event, attributes } => {
            let attrs = parse_attributes(&attributes)?;
            crate::explain::explain(&Client::new(nats, subjects), &event, &attrs).await?
        }
        Command::Test { files } => {
            crate::explain::test(&Client::new(nats, subjects), &files).await?
        }
        Command::Log {
            since,
            event,
            action,
            service,
            agent,
            limit,
            output,
            site,
        } => {
            let filter = crate::log::Filter {
                event,
                action,
                service,
                agent,
                site: site.map(|s| if s == "all" { "*".into() } else { s }),
            };
            // The log is a store: read as the operator's store identity on a secured bus.
            let store = cli
                .common
                .connect_store("policyctl", false, &Role::Operator, &nats)
                .await?;
            crate::log::run(&store, &subjects, since, filter, limit, output).await?
        }
        Command::Tap { event, output } => {
            crate::tap::run(&nats, &subjects, event.as_deref(), output).await?
        }
        Command::Top { interval, count } => {
            crate::top::run(&nats, &subjects, interval, count).await?
        }
        Command::Bench {
            event,
            concurrency,
            duration,
            attributes,
            json,
            chain,
            operator_nkey_file,
            dry_run,
        } => {
            let attributes = crate::bench::sample::attributes(&event, &attributes)?;
            let options = crate::bench::Options {
                event,
                attributes,
                concurrency,
                duration,
                json,
                chain,
                operator_nkey_file,
                dry_run,
            };
            crate::bench::run(&cli.common, &nats, &subjects, options).await?;
        }
        Command::Up { .. }
        | Command::Auth(_)
        | Command::Probe { .. }
        | Command::Completions { .. } => {
            unreachable!("handled above")
        }
    }
    Ok(())
}

async fn agent(admin: &AdminClient, cmd: AgentCommand) -> anyhow::Result<()> {
    match cmd {
        AgentCommand::Deploy {
            kind,
            file,
            force,
            wait,
        } => {
            let module =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let m = admin.agent_deploy(&kind, module, force).await?;
            out!("deployed {} ({} bytes, {})", m.kind, m.size, m.digest);
            if !wait.is_zero() {
                crate::deploy::served(admin, &m, wait).await?;
            }
        }
        AgentCommand::Remove { kind } => {
            admin.agent_remove(&kind).await?;
            out!("removed {kind}: every wasm host drains and stops it");
        }
        AgentCommand::List { output } => {
            let modules = admin.agent_list().await?;
            output::print(output.get(), &modules, || {
                let rows: Vec<Vec<String>> = modules
                    .iter()
                    .map(|m| {
                        let size = m.size.to_string();
                        vec![m.kind.clone(), size, m.modified.clone(), m.digest.clone()]
                    })
                    .collect();
                for l in output::table(&["KIND", "BYTES", "DEPLOYED", "DIGEST"], &rows) {
                    out!("{l}");
                }
                Ok(())
            })?;
        }
    }
    Ok(())
}

/// One GET of a plain-http URL: `Ok` on a 200, else the status line and body as the error.
fn probe(url: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{url}: only http:// URLs can be probed"))?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let timeout = std::time::Duration::from_secs(3);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .with_context(|| format!("{url}: cannot resolve {host}"))?
        .next()
        .ok_or_else(|| anyhow!("{url}: {host} resolves to no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("{url}: cannot connect"))?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("{url}: no answer"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        return Ok(());
    }
    Err(anyhow!("{url}: {status}: {}", body.trim()))
}
