//! Text from files and servers on its way to a terminal: a table name, a state file's last error
//! or a file name may hold control characters, and a terminal obeys them (move the cursor, set
//! the title, hide text). [`safe`] shows them as escapes instead, so what is printed is what is
//! there.

use std::borrow::Cow;

/// Whether `c` changes what a terminal shows rather than being shown: C0 and C1 controls, DEL,
/// and the bidirectional overrides that reorder what follows them.
fn is_control(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every control character written as an escape (`\n`, `\t`, `\x1b`, `\u{202e}`).
pub fn safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 && is_control(c) => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if is_control(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Like [`safe`], but keeps line breaks (for messages of several lines, such as log records).
pub fn safe_lines(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c != '\n' && is_control(c)) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(text.split('\n').map(safe).collect::<Vec<_>>().join("\n"))
}

/// `word` as one word of a shell command in a hint: as it is when it is plain, else in single
/// quotes (with its control characters shown as escapes, so the hint stays one line).
pub fn shell_word(word: &str) -> Cow<'_, str> {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/' | b':' | b',' | b'='));
    if plain {
        return Cow::Borrowed(word);
    }
    Cow::Owned(format!("'{}'", safe(word).replace('\'', "'\\''")))
}

/// The `dap` command line of a hint, each argument quoted for a shell where it needs it.
pub fn command(args: &[&str]) -> String {
    let words: Vec<Cow<'_, str>> = args.iter().map(|a| shell_word(a)).collect();
    format!("dap {}", words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert!(matches!(safe("users"), Cow::Borrowed("users")));
        assert_eq!(safe("a\u{1b}]0;pwned\u{7}b"), "a\\x1b]0;pwned\\x07b");
        assert_eq!(safe("x\ny\tz\r"), "x\\ny\\tz\\r");
        assert_eq!(safe("\u{9b}31m \u{202e}txt"), "\\u{9b}31m \\u{202e}txt");
        assert_eq!(safe("ünï 日本"), "ünï 日本");
        assert_eq!(safe_lines("one\n\u{1b}[2Jtwo"), "one\n\\x1b[2Jtwo");
    }

    #[test]
    fn hints_quote_what_a_shell_would_split() {
        assert_eq!(command(&["initdb", "--table", "users"]), "dap initdb --table users");
        assert_eq!(command(&["--table", "it's; rm -rf"]), "dap --table 'it'\\''s; rm -rf'");
        assert_eq!(shell_word("a\nb"), "'a\\nb'");
    }
}

/// `message` after `context` (a table, a target, or both), without the leading `X: ` parts of the
/// message that `context` already names: an error that carries its target is logged under a line
/// that names it too, and a line names its target once.
pub fn in_context(context: &str, message: &str) -> String {
    let mut rest = message;
    while let Some((head, tail)) = rest.split_once(": ") {
        if head.is_empty() || !context.contains(head) {
            break;
        }
        rest = tail;
    }
    format!("{context}: {rest}")
}

#[cfg(test)]
mod context_tests {
    use super::in_context;

    #[test]
    fn a_line_names_its_target_once() {
        let target = "postgresql://u:***@db:5432/dap";
        assert_eq!(
            in_context(&format!("canvas.courses → {target}"), &format!("{target}: connecting: refused")),
            format!("canvas.courses → {target}: connecting: refused")
        );
        assert_eq!(in_context(target, &format!("{target}: {target}: x")), format!("{target}: x"));
        // A message that merely starts with other words keeps them.
        assert_eq!(in_context("accounts", "canvas.users exists: drop it"), "accounts: canvas.users exists: drop it");
    }
}
