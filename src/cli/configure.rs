//! `dap configure`: asks for the DAP API URL, client ID and secret (the secret without echo on a
//! terminal) and the default replication targets, and saves them owner-only in the per-user
//! configuration file, so that later commands need no secret on the command line or in the
//! environment.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context as _, bail};
use clap::Args;

use super::{Context, DEFAULT_BASE_URL};
use crate::config::{UserConfig, config_path};
use crate::target::TargetSpec;

#[derive(Debug, Args)]
pub struct ConfigureArgs {
    /// A default target of `dap replicate` (repeatable); replaces the saved list.
    #[arg(long = "target", value_name = "URL")]
    targets: Vec<String>,
    /// Where `dap watch` posts its alerts when it is given no --notify (repeatable); replaces
    /// the saved list.
    #[arg(long = "notify", value_name = "URL")]
    notify: Vec<String>,
    /// Print where the configuration file is and what it holds (the secret hidden), and change
    /// nothing.
    #[arg(long)]
    show: bool,
}

/// Whether an answer may be shown as it is typed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Echo {
    Visible,
    Hidden,
}

/// Reads one answer from stdin, prompting on stderr; `None` at the end of input.
fn ask(prompt: &str, echo: Echo) -> anyhow::Result<Option<String>> {
    let terminal = std::io::stdin().is_terminal();
    // Off before the prompt shows, so that a secret typed as soon as it appears is never shown.
    let _hidden = (echo == Echo::Hidden && terminal).then(EchoOff::new);
    if terminal {
        eprint!("{prompt}: ");
        std::io::stderr().flush()?;
    }
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line)?;
    Ok((read > 0).then(|| line.trim().to_string()))
}

/// The terminal's echo, off while this lives and restored when it is dropped.
struct EchoOff {
    #[cfg(unix)]
    original: Option<libc::termios>,
}

impl EchoOff {
    #[cfg(unix)]
    fn new() -> EchoOff {
        use std::os::fd::AsRawFd;
        let fd = std::io::stdin().as_raw_fd();
        let mut term = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr fills `term` when it returns 0, and only then is it read.
        if unsafe { libc::tcgetattr(fd, term.as_mut_ptr()) } != 0 {
            return EchoOff { original: None };
        }
        // SAFETY: initialised by the successful tcgetattr above.
        let original = unsafe { term.assume_init() };
        let mut hidden = original;
        hidden.c_lflag &= !libc::ECHO;
        hidden.c_lflag |= libc::ECHONL;
        // SAFETY: `hidden` is a valid termios for this descriptor.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &hidden) };
        EchoOff { original: Some(original) }
    }

    /// Windows consoles: the answer is read as typed (documented in the README).
    #[cfg(not(unix))]
    fn new() -> EchoOff {
        EchoOff {}
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(original) = &self.original {
            use std::os::fd::AsRawFd;
            // SAFETY: restores the settings read in `new` on the same descriptor.
            unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, original) };
        }
    }
}

/// The answer to `prompt`, else what is known already: `given` (flag, variable or secret file),
/// else `saved`. Every question is asked in order, so that piped answers land on their own
/// questions whatever the environment holds: known values are only the defaults.
fn value(given: Option<&str>, prompt: &str, saved: Option<String>, echo: Echo) -> anyhow::Result<Option<String>> {
    let known = given.filter(|v| !v.is_empty()).map(str::to_string).or(saved);
    let shown = match (&known, echo) {
        (Some(_), Echo::Hidden) => format!("{prompt} [Enter keeps the current one]"),
        (Some(c), Echo::Visible) => format!("{prompt} [{c}]"),
        (None, _) => prompt.to_string(),
    };
    Ok(ask(&shown, echo)?.filter(|a| !a.is_empty()).or(known))
}

pub fn run(ctx: &Context, base_url: Option<&str>, profile: Option<&str>, args: ConfigureArgs) -> anyhow::Result<()> {
    let path = config_path()?;
    let file = UserConfig::load(&path)?;
    let profile = profile.map(str::trim).filter(|p| !p.is_empty());
    // The section this run reads and writes: the profile's, or the default one at the top.
    let saved = file.clone().map(|mut f| match profile {
        Some(name) => f.profiles.remove(name).unwrap_or_default(),
        None => {
            f.profiles.clear();
            f
        }
    });
    if args.show {
        let what = profile.map_or(String::new(), |p| format!(" (profile {p})"));
        match &saved {
            Some(c) if c != &UserConfig::default() => {
                println!("{}{what}", path.display());
                println!("  base URL:  {}", c.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL));
                println!("  client ID: {}", c.client_id.as_deref().unwrap_or("(not set)"));
                println!("  secret:    {}", if c.client_secret.is_some() { "(set)" } else { "(not set)" });
                for t in &c.targets {
                    println!("  target:    {}", crate::sink::redact(t));
                }
                // A webhook's path is its secret: the host only.
                for url in c.notify.iter().filter_map(|u| reqwest::Url::parse(u).ok()) {
                    println!("  notify:    {}", crate::watch::redact(&url));
                }
            }
            _ => println!("{}{what}: no configuration yet; run `dap configure`", path.display()),
        }
        if let Some(f) = file.as_ref().filter(|f| profile.is_none() && !f.profiles.is_empty()) {
            println!("  profiles:  {}", f.profiles.keys().cloned().collect::<Vec<_>>().join(", "));
        }
        return Ok(());
    }
    // Targets are checked before anything is asked or written.
    for t in &args.targets {
        TargetSpec::parse(Some(t)).with_context(|| format!("--target {}", crate::sink::redact(t)))?;
    }
    let notify = super::watch::notify_urls(&args.notify)?;
    let saved = saved.unwrap_or_default();
    let base = value(
        base_url,
        "DAP API URL",
        Some(saved.base_url.clone().unwrap_or_else(|| DEFAULT_BASE_URL.into())),
        Echo::Visible,
    )?
    .unwrap_or_else(|| DEFAULT_BASE_URL.into());
    if !(base.starts_with("https://") || base.starts_with("http://")) {
        // Not repeated: a secret piped alone would land here.
        bail!(
            "the first answer, the DAP API URL, is not an http(s) URL; nothing was saved \
             (answers are read in order: URL, client ID, secret; an empty line keeps the value shown)"
        );
    }
    let Some(client_id) = value(ctx.client.client_id.as_deref(), "Client ID", saved.client_id.clone(), Echo::Visible)?
    else {
        bail!("no client ID was given; nothing was saved");
    };
    let Some(secret) =
        value(ctx.client.client_secret.as_deref(), "Client secret", saved.client_secret.clone(), Echo::Hidden)?
    else {
        bail!("no client secret was given; nothing was saved");
    };
    crate::secrets::register(&secret);
    let section = UserConfig {
        base_url: Some(base),
        client_id: Some(client_id),
        client_secret: Some(secret),
        targets: if args.targets.is_empty() { saved.targets } else { args.targets },
        notify: if notify.is_empty() { saved.notify } else { notify.iter().map(|u| u.to_string()).collect() },
        profiles: Default::default(),
    };
    // The other sections of the file stay as they were.
    let mut whole = file.unwrap_or_default();
    match profile {
        Some(name) => {
            whole.profiles.insert(name.to_string(), section);
        }
        None => whole = UserConfig { profiles: whole.profiles, ..section },
    }
    whole.save(&path)?;
    let example = match profile {
        Some(name) => format!("dap --profile {name} list --namespace canvas"),
        None => "dap list --namespace canvas".into(),
    };
    println!("Saved to {} (readable only by you). Commands now need no credentials, e.g. `{example}`.", path.display());
    Ok(())
}
