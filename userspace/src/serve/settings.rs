//! Where `serve`'s settings come from, before anything is resolved: every flag also reads
//! `RICOCHET_<NAME>` and a key of `--config FILE.toml` named like the flag's long name. Precedence:
//! flag, environment, file, default. The layers are merged by clap itself: the file's values become
//! arguments of a second parse, each checked first by its flag's own value parser so that a bad
//! value is reported with its key and line.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use clap::builder::Resettable;
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command, FromArgMatches};

use super::args::ServeArgs;

/// Flags that are not settings: they cannot appear in the file.
const NOT_IN_FILE: [&str; 2] = ["config", "print_config"];

/// A flag that is a setting: it has a long name and is not `--config`, `--print-config` or `--help`.
fn is_setting(arg: &clap::Arg) -> bool {
    let action = arg.get_action();
    arg.get_long().is_some()
        && !NOT_IN_FILE.contains(&arg.get_id().as_str())
        && !matches!(
            action,
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        )
}

/// The environment variable a flag reads: `--max-datagram` reads `RICOCHET_MAX_DATAGRAM`.
pub fn env_name(long: &str) -> String {
    format!("RICOCHET_{}", long.replace('-', "_").to_ascii_uppercase())
}

/// Gives every long flag of `serve` its environment variable.
pub fn with_environment(serve: Command) -> Command {
    serve.mut_args(|arg| match (arg.get_long(), arg.get_env()) {
        (Some(long), None) => {
            let name = env_name(long);
            arg.env(name)
        }
        _ => arg,
    })
}

/// The environment variable behind a bad value clap refused, when the value came from one and not
/// from the command line (clap's message names only the flag).
pub fn blame_environment(serve: &Command, error: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(flag)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = flag.strip_prefix("--")?.split([' ', '=']).next()?;
    let arg = serve.get_arguments().find(|a| a.get_long() == Some(long))?;
    let on_command_line = std::env::args_os().any(|a| {
        let a = a.to_string_lossy();
        a == format!("--{long}") || a.starts_with(&format!("--{long}="))
    });
    let name = arg.get_env()?.to_string_lossy().into_owned();
    (std::env::var_os(&name).is_some() && !on_command_line).then_some(name)
}

/// The command for the first parse (flags and environment, before the file is read): no flag may
/// require another yet, as the file may supply it. The merged parse checks those rules.
pub fn relaxed(serve: Command) -> Command {
    serve.mut_args(|arg| arg.requires(Resettable::<clap::Id>::Reset))
}

/// `serve`'s full command with its environment variables: the one the merged parse uses.
pub fn strict() -> Command {
    use clap::Args;
    with_environment(ServeArgs::augment_args(Command::new("serve")))
}

/// Where one setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Flag,
    Environment,
    File,
    Default,
    Unset,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::Environment => "environment",
            Source::File => "file",
            Source::Default => "default",
            Source::Unset => "unset",
        }
    }
}

/// One effective setting: its key (the flag's long name), value and origin.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Setting {
    pub key: String,
    /// `None` when unset or secret.
    pub value: Option<toml::Value>,
    pub source: Source,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub secret: bool,
}

/// `serve`'s arguments after all layers, with the table of where each came from.
#[derive(Debug, Clone)]
pub struct Settings {
    pub args: ServeArgs,
    pub table: Vec<Setting>,
}

impl Settings {
    /// Merges the file named by `--config` (or `RICOCHET_CONFIG`) under the flags and environment
    /// already in `matches` (from a command built with [`with_environment`]).
    pub fn load(matches: &ArgMatches) -> Result<Settings> {
        let serve = &strict();
        let from_file = match matches.get_one::<std::path::PathBuf>("config") {
            Some(path) => file_arguments(serve, matches, path)?,
            None => Vec::new(),
        };
        let mut argv: Vec<OsString> = vec!["serve".into()];
        argv.extend(given_arguments(serve, matches));
        argv.extend(from_file.iter().flat_map(|(_, args)| args.iter().cloned()));
        let merged = serve
            .clone()
            .try_get_matches_from(argv)
            .context("the merged configuration is inconsistent")?;
        let args = ServeArgs::from_arg_matches(&merged)?;
        let table = effective(serve, matches, &merged, &from_file);
        Ok(Settings { args, table })
    }

    /// The effective configuration as a TOML file `--config` would take.
    pub fn to_toml(&self) -> String {
        let mut out = String::from(
            "# ricochet serve: the effective configuration (flag > environment > file > default)\n",
        );
        for s in &self.table {
            let _ = match (&s.value, s.secret, s.source) {
                (_, true, source) => writeln!(
                    out,
                    "# {} = (secret, not shown)  # {}",
                    s.key,
                    source.as_str()
                ),
                (None, _, _) => writeln!(out, "# {} = (not set)", s.key),
                (Some(v), _, source) => writeln!(out, "{} = {v}  # {}", s.key, source.as_str()),
            };
        }
        out
    }
}

/// The flags and environment variables already given, as arguments for the merged parse.
fn given_arguments(serve: &Command, matches: &ArgMatches) -> Vec<OsString> {
    let mut argv = Vec::new();
    for arg in serve.get_arguments() {
        let id = arg.get_id().as_str();
        let (Some(long), Some(source)) = (arg.get_long(), matches.value_source(id)) else {
            continue;
        };
        if source == ValueSource::DefaultValue {
            continue;
        }
        let raw = matches.get_raw(id).into_iter().flatten();
        argv.extend(as_arguments(
            arg.get_action(),
            long,
            raw.map(OsString::from),
        ));
    }
    argv
}

/// `--long=VALUE` per value (one argument, so a value may start with '-'), or `--long` for a
/// switch without a value that is on.
fn as_arguments(
    action: &ArgAction,
    long: &str,
    values: impl Iterator<Item = OsString>,
) -> Vec<OsString> {
    let mut out = Vec::new();
    for value in values {
        if matches!(action, ArgAction::SetTrue) {
            if value == "true" {
                out.push(OsString::from(format!("--{long}")));
            }
        } else {
            let mut arg = OsString::from(format!("--{long}="));
            arg.push(value);
            out.push(arg);
        }
    }
    out
}

/// The file's settings that no flag or environment variable overrides, as arguments per key.
fn file_arguments(
    serve: &Command,
    matches: &ArgMatches,
    path: &Path,
) -> Result<Vec<(String, Vec<OsString>)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    let table = toml::de::DeTable::parse(&text)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?
        .into_inner();
    let mut out = Vec::new();
    for (key, value) in table.iter() {
        let line = line_of(&text, key.span().start);
        let at = format!("{}:{line}: key '{}'", path.display(), key.get_ref());
        let arg = serve
            .get_arguments()
            .find(|a| a.get_long() == Some(key.get_ref()) && is_setting(a))
            .ok_or_else(|| anyhow!("{at} is not a setting (the keys are the long flags of 'ricochet serve --help', such as max-datagram)"))?;
        let values = file_values(arg, value.get_ref()).map_err(|e| anyhow!("{at}: {e}"))?;
        check_values(arg, &values).map_err(|e| anyhow!("{at}: {e}"))?;
        let overridden = matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if !overridden {
            let long = key.get_ref().to_string();
            let args = as_arguments(arg.get_action(), &long, values.into_iter());
            out.push((long, args));
        }
    }
    Ok(out)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A key's TOML value as the strings its flag would take.
fn file_values(arg: &clap::Arg, value: &toml::de::DeValue<'_>) -> Result<Vec<OsString>> {
    let many = matches!(arg.get_action(), ArgAction::Append);
    let flag = matches!(arg.get_action(), ArgAction::SetTrue);
    match value {
        toml::de::DeValue::Array(items) if many => items
            .iter()
            .map(|item| scalar(item.get_ref(), false))
            .collect(),
        toml::de::DeValue::Array(_) => bail!("takes one value, not an array"),
        other => Ok(vec![scalar(other, flag)?]),
    }
}

/// A TOML scalar as the string its flag's value parser checks (which rejects `true` for a number).
fn scalar(value: &toml::de::DeValue<'_>, flag: bool) -> Result<OsString> {
    use toml::de::DeValue;
    Ok(match value {
        DeValue::Boolean(b) => b.to_string().into(),
        _ if flag => bail!("is a switch: write true or false"),
        DeValue::String(s) => s.to_string().into(),
        DeValue::Integer(i) if i.radix() == 10 => i.as_str().replace('_', "").into(),
        other => bail!("a {} is not a value it takes", other.type_str()),
    })
}

/// Runs the flag's own value parser on each value, so that a bad one is reported here, with the
/// key and line, rather than by the merged parse.
fn check_values(arg: &clap::Arg, values: &[OsString]) -> Result<()> {
    let alone = arg
        .clone()
        .env(None::<&'static str>)
        .requires(Resettable::<clap::Id>::Reset)
        .required(false);
    let long = arg.get_long().unwrap_or_default();
    let argv = as_arguments(arg.get_action(), long, values.iter().cloned());
    Command::new("serve")
        .no_binary_name(true)
        .arg(alone)
        .try_get_matches_from(argv)
        .map(|_| ())
        .map_err(|e| anyhow!("{}", first_line(&e.to_string())))
}

fn first_line(text: &str) -> &str {
    let line = text.lines().next().unwrap_or(text);
    line.strip_prefix("error: ").unwrap_or(line)
}

/// Every setting with its effective value and source.
fn effective(
    serve: &Command,
    given: &ArgMatches,
    merged: &ArgMatches,
    from_file: &[(String, Vec<OsString>)],
) -> Vec<Setting> {
    let mut table = Vec::new();
    for arg in serve.get_arguments() {
        let (id, Some(long)) = (arg.get_id().as_str(), arg.get_long()) else {
            continue;
        };
        if !is_setting(arg) {
            continue;
        }
        let source = match given.value_source(id) {
            Some(ValueSource::CommandLine) => Source::Flag,
            Some(ValueSource::EnvVariable) => Source::Environment,
            _ if from_file.iter().any(|(key, _)| key == long) => Source::File,
            Some(_) => Source::Default,
            None => Source::Unset,
        };
        let raw: Vec<String> = merged
            .get_raw(id)
            .into_iter()
            .flatten()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let secret = arg.is_hide_env_values_set();
        let source = if raw.is_empty() {
            Source::Unset
        } else {
            source
        };
        let value = (!secret && !raw.is_empty()).then(|| as_toml(arg.get_action(), raw));
        table.push(Setting {
            key: long.to_string(),
            value,
            source,
            secret: secret && !matches!(source, Source::Unset),
        });
    }
    table
}

/// Raw values as TOML: a switch as a boolean, a repeatable flag as an array, decimal numbers as
/// integers and the rest as strings (all of which the file takes back).
fn as_toml(action: &ArgAction, raw: Vec<String>) -> toml::Value {
    let one = |s: String| match (s.parse::<i64>(), s.as_str()) {
        (Ok(n), _) if n.to_string() == s => toml::Value::Integer(n),
        (_, "true" | "false") => toml::Value::Boolean(s == "true"),
        _ => toml::Value::String(s),
    };
    match action {
        ArgAction::SetTrue => toml::Value::Boolean(raw.iter().any(|v| v == "true")),
        ArgAction::Append => toml::Value::Array(raw.into_iter().map(one).collect()),
        _ => raw
            .into_iter()
            .next()
            .map(one)
            .unwrap_or(toml::Value::String(String::new())),
    }
}
