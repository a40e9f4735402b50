//! Secrets never reach output. Every secret the process learns (the client secret and its Basic
//! header, access tokens, database passwords) is registered here, and every log record, error
//! line, panic message and `--json` document is scrubbed of them, and of anything shaped like a
//! bearer token, a JWT or a pre-signed URL signature, before it is written. Messages are built to
//! leave secrets out in the first place; this is the net under them, for text that comes from
//! outside (an error body that echoes the request, a driver's message).

use std::borrow::Cow;
use std::sync::RwLock;

static KNOWN: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// What replaces a secret.
const HIDDEN: &str = "***";

/// Secrets shorter than this are not scrubbed by value (they would hide ordinary words); the
/// shapes below still catch tokens of any length.
const SHORTEST: usize = 4;

/// Remembers `secret` so that no output shows it from now on.
pub fn register(secret: &str) {
    let secret = secret.trim();
    if secret.len() < SHORTEST {
        return;
    }
    let mut known = KNOWN.write().unwrap_or_else(|e| e.into_inner());
    if !known.iter().any(|k| k == secret) {
        known.push(secret.to_string());
        // Longest first, so a secret containing another is hidden whole.
        known.sort_by_key(|k| std::cmp::Reverse(k.len()));
    }
}

/// Query parameters of pre-signed URLs whose values are credentials.
const SIGNATURE_PARAMS: &[&str] = &[
    "X-Amz-Signature=",
    "X-Amz-Credential=",
    "X-Amz-Security-Token=",
    "Signature=",
    "sig=",
    "Policy=",
    "Key-Pair-Id=",
    "token=",
];

/// Words after which the next token is a credential.
const SCHEMES: &[&str] = &["Bearer ", "bearer ", "Basic ", "basic "];

/// `text` without any registered secret, token, JWT or URL signature.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    {
        let known = KNOWN.read().unwrap_or_else(|e| e.into_inner());
        for secret in known.iter() {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), HIDDEN));
            }
        }
    }
    for marker in SIGNATURE_PARAMS.iter().chain(SCHEMES) {
        if out.contains(marker) {
            out = Cow::Owned(hide_after(&out, marker));
        }
    }
    if out.contains("eyJ") {
        out = Cow::Owned(hide_jwts(&out));
    }
    out
}

/// Characters a token or a query value is made of.
fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.~+/=%".contains(c)
}

/// Copies `text` with the tokens that `next` finds replaced by `***`. Given the rest of the text,
/// `next` returns where the next candidate token starts and ends (past what it has looked at) and
/// whether it is a secret.
fn hide_tokens(text: &str, next: impl Fn(&str) -> Option<(usize, usize, bool)>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some((start, end, secret)) = next(rest) {
        out.push_str(&rest[..start]);
        out.push_str(if secret { HIDDEN } else { &rest[start..end] });
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Replaces the token following each `marker` with `***`.
fn hide_after(text: &str, marker: &str) -> String {
    hide_tokens(text, |rest| {
        let start = rest.find(marker)? + marker.len();
        let len = rest[start..].find(|c: char| !is_token_char(c)).unwrap_or(rest.len() - start);
        Some((start, start + len, len > 0))
    })
}

/// Replaces every `eyJ….….…` (a JSON Web Token: base64url of `{"`) with `***`.
fn hide_jwts(text: &str) -> String {
    let is_jwt_char = |c: char| c.is_ascii_alphanumeric() || "-_.=".contains(c);
    hide_tokens(text, |rest| {
        let start = rest.find("eyJ")?;
        let len = rest[start..].find(|c: char| !is_jwt_char(c)).unwrap_or(rest.len() - start);
        let starts_word = rest[..start].chars().next_back().is_none_or(|c| !c.is_ascii_alphanumeric());
        Some((start, start + len, starts_word && rest[start..start + len].matches('.').count() >= 2))
    })
}

/// A `tracing` writer that scrubs each record before it reaches `W`.
pub struct Scrubbing<W>(pub W);

impl<W: std::io::Write> std::io::Write for Scrubbing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) => self.0.write_all(scrub(text).as_bytes())?,
            Err(_) => self.0.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Makes a scrubbing writer per record from any `MakeWriter`.
pub struct ScrubbingMakeWriter<M>(pub M);

impl<'a, M: tracing_subscriber::fmt::MakeWriter<'a>> tracing_subscriber::fmt::MakeWriter<'a>
    for ScrubbingMakeWriter<M>
{
    type Writer = Scrubbing<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        Scrubbing(self.0.make_writer())
    }
}

/// The text a panic was raised with, when it was raised with text.
pub fn panic_message(info: &std::panic::PanicHookInfo<'_>) -> Option<String> {
    let payload = info.payload();
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned())
}

/// Scrubs panic messages too: a panic prints its payload, which may quote a value it failed on.
pub fn scrub_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| match panic_message(info) {
        Some(message) => {
            let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            eprintln!("dap panicked{at}: {}", scrub(&message));
        }
        None => default(info),
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_secrets_and_token_shapes_are_hidden() {
        register("hunter2-db-password");
        let text = "failed: password hunter2-db-password rejected; Authorization: Bearer abc.def-ghi \
                    url https://s3/x.gz?X-Amz-Signature=0123abcd&X-Amz-Date=20260101 \
                    jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig_part-1 and eyJust-a-word";
        let s = scrub(text);
        for gone in ["hunter2-db-password", "abc.def-ghi", "0123abcd", "eyJhbGciOiJIUzI1NiJ9", "sig_part-1"] {
            assert!(!s.contains(gone), "{gone} survived in {s}");
        }
        for kept in ["X-Amz-Date=20260101", "eyJust-a-word", "failed: password *** rejected", "Bearer ***"] {
            assert!(s.contains(kept), "{kept} lost in {s}");
        }
        assert_eq!(scrub("nothing secret"), "nothing secret");
        assert_eq!(scrub(&s), s, "scrubbing twice changes nothing more");
        let inside_a_word = "keyJa.b.c Bearer";
        assert_eq!(scrub(inside_a_word), inside_a_word, "no JWT inside a word, nothing after a last marker");
    }

    #[test]
    fn short_secrets_are_not_scrubbed_by_value() {
        register("ab");
        assert_eq!(scrub("tables ab and abc"), "tables ab and abc");
    }
}
