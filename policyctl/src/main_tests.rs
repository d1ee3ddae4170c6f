use super::*;
use clap::CommandFactory;

/// Every option and argument of every command says what it is for.
#[test]
fn every_argument_has_help_text() {
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" || arg.is_hide_set() {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() {
                missing.push(format!("{path} {} (the command)", sub.get_name()));
            }
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut missing = Vec::new();
    walk(&Cli::command(), "policyctl", &mut missing);
    assert!(missing.is_empty(), "no help text: {missing:#?}");
}

#[test]
fn completions_cover_every_command() {
    let mut script = Vec::new();
    completions(clap_complete::Shell::Bash, &mut script);
    let script = String::from_utf8(script).unwrap();
    for word in ["apply", "subscriptions", "agent", "deploy", "--output"] {
        assert!(script.contains(word), "bash completion lacks {word}");
    }
}
