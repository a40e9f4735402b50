//! `dap watch`: the command line of [`crate::watch`], and `--print-unit`, which prints a ready
//! service definition (systemd, launchd, Windows Task Scheduler) for this installation.

use std::time::Duration;

use clap::{Args, ValueEnum};

use super::Context;
use super::db::{FanOutArgs, HistoryArgs, MonitorArgs, RunArgs};
use crate::api::Client;
use crate::progress::Progress;
use crate::run::{Missing, Mode};
use crate::sync::Reinit;

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    db: RunArgs,
    #[command(flatten)]
    monitor: MonitorArgs,
    #[command(flatten)]
    fan_out: FanOutArgs,
    #[command(flatten)]
    history: HistoryArgs,
    /// Time from the start of one run to the start of the next (DAP refreshes about every 4h).
    #[arg(long, value_name = "DURATION", default_value = "4h", value_parser = super::parse_duration)]
    every: Duration,
    /// Run at the minutes a cron schedule names instead (local time), e.g. "0 */4 * * *".
    #[arg(long, value_name = "SCHEDULE", conflicts_with = "every", value_parser = crate::cron::Cron::parse)]
    cron: Option<crate::cron::Cron>,
    /// Each wait is longer by a random part of this (a tenth of --every, at most 5 minutes, or a
    /// minute with --cron, when not given; 0 for none).
    #[arg(long, value_name = "DURATION", value_parser = super::parse_duration)]
    jitter: Option<Duration>,
    /// Stop after this many runs.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_runs: Option<u32>,
    /// Run once and exit with its result (for cron and Task Scheduler).
    #[arg(long, conflicts_with = "max_runs")]
    once: bool,
    /// Post a JSON message here on a failed run and on the first good run after failures
    /// (repeatable; Slack and Teams incoming webhooks take it as it is).
    #[arg(long, value_name = "URL", env = "DAP_NOTIFY", value_delimiter = ',', hide_env_values = true)]
    notify: Vec<String>,
    /// When DAP needs a new snapshot of a table, take it (atomically) instead of failing the run.
    #[arg(long)]
    auto_reinit: bool,
    /// Keep N days of each log table in the mirror (see `syncdb --keep-days`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    keep_days: Option<u32>,
    /// Print a service definition that runs this watch (with these options) and exit.
    #[arg(long, value_name = "KIND")]
    print_unit: Option<UnitKind>,
}

/// The service managers `--print-unit` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UnitKind {
    Systemd,
    Launchd,
    Windows,
}

impl WatchArgs {
    pub fn prints_unit(&self) -> bool {
        self.print_unit.is_some()
    }

    /// The option that would give several profiles one mirror, if any: each profile keeps its
    /// own folder, so that two Canvas instances' rows (whose ids collide) never meet in a table.
    pub fn one_location(&self) -> Option<&'static str> {
        if self.db.target.dir.is_some() {
            Some("--dir")
        } else if self.db.target.connection_string.is_some() {
            Some("--connection-string (or DAP_CONNECTION_STRING)")
        } else {
            None
        }
    }
}

pub async fn run(ctx: &Context, args: WatchArgs) -> anyhow::Result<()> {
    if let Some(kind) = args.print_unit {
        print!("{}", unit(kind, &args.db.target.namespace)?);
        return Ok(());
    }
    let reinit = if args.auto_reinit { Reinit::Automatically } else { Reinit::Stop };
    let mode = Mode::Sync { reinit, missing: Missing::Initialise };
    let plan = super::db::plan(ctx, &args.db, &args.fan_out, &args.history, mode, args.keep_days, &args.monitor)?;
    // Given ones replace the saved ones (`dap configure --notify`).
    let urls = notify_urls(if args.notify.is_empty() { &ctx.default_notify } else { &args.notify })?;
    if let Some(cron) = &args.cron
        && cron.next_after(chrono::Local::now()).is_none()
    {
        return Err(super::UsageError("--cron: the schedule names no time in the next four years".into()).into());
    }
    let default_jitter = match &args.cron {
        Some(_) => Duration::from_secs(60),
        None => (args.every / 10).min(Duration::from_secs(300)),
    };
    let schedule = crate::watch::Schedule {
        cadence: match args.cron.clone() {
            Some(cron) => crate::watch::Cadence::Cron(cron),
            None => crate::watch::Cadence::Every(args.every),
        },
        jitter: args.jitter.unwrap_or(default_jitter),
        max_runs: if args.once { Some(1) } else { args.max_runs },
    };
    let client = Client::new(ctx.client.clone())?;
    let progress = Progress::new(false);
    let end = crate::watch::watch(client, &plan, &schedule, &crate::watch::Notify { urls }, &progress).await;
    if end.failed() {
        anyhow::bail!("watch: the last run ({}) failed on {} tables", end.number, end.failures.len());
    }
    Ok(())
}

/// Alert URLs as given: each an http(s) URL, or a usage error naming it (without its path,
/// which is a webhook's secret).
pub fn notify_urls(given: &[String]) -> Result<Vec<reqwest::Url>, super::UsageError> {
    given
        .iter()
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
        .map(|u| {
            reqwest::Url::parse(u).ok().filter(|p| matches!(p.scheme(), "http" | "https")).ok_or_else(|| {
                let shown = u.split('/').take(3).collect::<Vec<_>>().join("/");
                super::UsageError(format!("--notify: {shown}… is not an http(s) URL"))
            })
        })
        .collect()
}

/// `dap watch --profile A --profile B`: one watch per Canvas instance, each a process of its
/// own (its own credentials, mirror folder, DAP job limit and schedule), started with this
/// command line and one of the profiles. Their log lines are passed on marked with the profile
/// (a `profile` field in JSON lines, `[A] ` before text ones); SIGTERM and Ctrl-C are passed on
/// and waited for. Every profile is checked before any watch starts. Returns the exit code: 0
/// when every watch ended well, else the first failing one's.
pub async fn several_profiles(profiles: &[String], one_location: Option<&str>) -> anyhow::Result<u8> {
    if let Some(option) = one_location {
        return Err(super::UsageError(format!(
            "{option} with several --profile would put several Canvas instances into one mirror; each profile \
             watches its own (`dap configure --profile NAME` saves a target per profile), so run one watch per \
             location instead"
        ))
        .into());
    }
    let path = crate::config::config_path()?;
    let known = crate::config::UserConfig::load(&path)?.unwrap_or_default();
    for name in profiles {
        if !crate::config::valid_profile_name(name) {
            return Err(super::UsageError(format!(
                "--profile {name:?}: a profile name is letters, digits, - and _ (it names a folder)"
            ))
            .into());
        }
        known.clone().profile(Some(name), &path)?;
    }
    let unique: std::collections::BTreeSet<&String> = profiles.iter().collect();
    if unique.len() != profiles.len() {
        return Err(super::UsageError("--profile: each profile once (a mirror has one watch)".into()).into());
    }
    let exe = std::env::current_exe()?;
    let rest = without_profiles(std::env::args_os().skip(1));
    let mut children = Vec::new();
    let mut relays = tokio::task::JoinSet::new();
    for name in profiles {
        let mut child = tokio::process::Command::new(&exe)
            .arg("--profile")
            .arg(name)
            .args(&rest)
            .env_remove("DAP_PROFILE")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting the watch of profile {name}: {e}"))?;
        if let Some(stderr) = child.stderr.take() {
            relays.spawn(relay(name.clone(), stderr));
        }
        children.push(child);
    }
    let pids: Vec<u32> = children.iter().filter_map(|c| c.id()).collect();
    let pass_on = |signal: i32| {
        for pid in &pids {
            // SAFETY: signals a child of ours; it is not reaped before it is waited for below.
            #[cfg(unix)]
            unsafe {
                libc::kill(*pid as libc::pid_t, signal)
            };
        }
    };
    let ended = futures_util::future::join_all(children.iter_mut().map(|c| c.wait()));
    tokio::pin!(ended);
    let codes: Vec<u8> = tokio::select! {
        codes = &mut ended => codes.into_iter().map(|c| exit_code(c.ok())).collect(),
        _ = crate::interrupt::terminated() => {
            pass_on(libc::SIGTERM);
            ended.await;
            vec![143]
        }
        _ = tokio::signal::ctrl_c() => {
            pass_on(libc::SIGINT);
            ended.await;
            vec![130]
        }
    };
    while relays.join_next().await.is_some() {}
    Ok(codes.into_iter().find(|c| *c != 0).unwrap_or(0))
}

/// The arguments without any `--profile NAME` / `--profile=NAME`.
fn without_profiles(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut rest = Vec::new();
    let mut args = args.peekable();
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--profile") => {
                args.next();
            }
            Some(s) if s.starts_with("--profile=") => {}
            _ => rest.push(a),
        }
    }
    rest
}

/// A child's exit status as a shell shows it (128 + the signal that ended it).
fn exit_code(status: Option<std::process::ExitStatus>) -> u8 {
    let Some(status) = status else { return 5 };
    if let Some(code) = status.code() {
        return u8::try_from(code).unwrap_or(5);
    }
    #[cfg(unix)]
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
        return u8::try_from(128 + signal).unwrap_or(5);
    }
    5
}

/// Passes a watch's log lines on, each marked with its profile.
async fn relay(profile: String, stderr: tokio::process::ChildStderr) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("{}", mark(&profile, &line));
    }
}

/// One log line marked with its profile: a field of a JSON line, a prefix of a text one.
fn mark(profile: &str, line: &str) -> String {
    if let Ok(serde_json::Value::Object(mut event)) = serde_json::from_str::<serde_json::Value>(line) {
        event.insert("profile".into(), serde_json::Value::String(profile.into()));
        return serde_json::Value::Object(event).to_string();
    }
    format!("[{profile}] {line}")
}

/// This process's command line for a service: the binary's absolute path, `--non-interactive`,
/// and every argument but `--print-unit`.
fn service_command() -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe()?.display().to_string();
    let mut words = vec![exe];
    let mut args = std::env::args().skip(1).peekable();
    let mut non_interactive = false;
    while let Some(a) = args.next() {
        if a == "--print-unit" {
            args.next();
            continue;
        }
        if a.starts_with("--print-unit=") {
            continue;
        }
        non_interactive |= a == "--non-interactive";
        words.push(a);
    }
    if !non_interactive {
        words.insert(1, "--non-interactive".into());
    }
    Ok(words)
}

/// A service definition for `kind` that runs this watch.
fn unit(kind: UnitKind, namespace: &str) -> anyhow::Result<String> {
    let words = service_command()?;
    Ok(match kind {
        UnitKind::Systemd => {
            // systemd's quoting: each word in double quotes, `\` and `"` escaped, `%` doubled.
            let exec: Vec<String> = words
                .iter()
                .map(|w| format!("\"{}\"", w.replace('\\', "\\\\").replace('"', "\\\"").replace('%', "%%")))
                .collect();
            format!(
                "# ~/.config/systemd/user/dap-watch-{namespace}.service, then:\n\
                 #   systemctl --user daemon-reload && systemctl --user enable --now dap-watch-{namespace}\n\
                 # Credentials come from `dap configure` (none here).\n\
                 [Unit]\n\
                 Description=dap watch: keeps the Canvas Data 2 mirror of {namespace} current\n\
                 Wants=network-online.target\n\
                 After=network-online.target\n\n\
                 [Service]\n\
                 Type=simple\n\
                 ExecStart={}\n\
                 Restart=on-failure\n\
                 RestartSec=60\n\
                 KillSignal=SIGTERM\n\
                 TimeoutStopSec=120\n\n\
                 [Install]\n\
                 WantedBy=default.target\n",
                exec.join(" ")
            )
        }
        UnitKind::Launchd => {
            let escape = |w: &str| w.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
            let args: Vec<String> = words.iter().map(|w| format!("    <string>{}</string>", escape(w))).collect();
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
                 <!-- ~/Library/LaunchAgents/edu.dap-replica.watch.{namespace}.plist, then: launchctl load it -->\n\
                 <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
                 <plist version=\"1.0\">\n<dict>\n\
                 \x20 <key>Label</key>\n  <string>edu.dap-replica.watch.{namespace}</string>\n\
                 \x20 <key>ProgramArguments</key>\n  <array>\n{}\n  </array>\n\
                 \x20 <key>RunAtLoad</key>\n  <true/>\n\
                 \x20 <key>KeepAlive</key>\n  <true/>\n\
                 </dict>\n</plist>\n",
                args.join("\n")
            )
        }
        UnitKind::Windows => {
            let quoted: Vec<String> = words
                .iter()
                .map(|w| if w.contains([' ', '"']) { format!("\\\"{}\\\"", w.replace('"', "")) } else { w.clone() })
                .collect();
            format!(
                "rem Run once in an elevated prompt; the task starts with Windows and runs the watch.\r\n\
                 schtasks /Create /SC ONSTART /RL LIMITED /TN \"dap-watch-{namespace}\" /TR \"{}\"\r\n",
                quoted.join(" ")
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_watch_gets_the_command_line_without_the_profiles() {
        let args = ["--profile", "east", "watch", "--profile=west", "--every", "1h", "--table", "profile"];
        let rest = without_profiles(args.iter().map(std::ffi::OsString::from));
        assert_eq!(rest, ["watch", "--every", "1h", "--table", "profile"].map(std::ffi::OsString::from));
    }

    #[test]
    fn log_lines_are_marked_with_their_profile() {
        assert_eq!(mark("east", "watch: run 1 started"), "[east] watch: run 1 started");
        let json: serde_json::Value =
            serde_json::from_str(&mark("east", r#"{"level":"INFO","fields":{"event":"run_started"}}"#)).unwrap();
        assert_eq!((json["profile"].as_str(), json["fields"]["event"].as_str()), (Some("east"), Some("run_started")));
    }
}
