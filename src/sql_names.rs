//! Which tables of the mirror a statement names: `namespace.table` (where it is written, so it can
//! be pointed elsewhere) and plain names (which SQLite looks up in `temp`, then in each attached
//! file in turn: a plain name two namespaces have is ambiguous). Names inside string literals and
//! comments are not names.

use std::collections::BTreeMap;
use std::ops::Range;

use rusqlite::Connection;

use crate::mirror::format::quote;

/// One token of a statement: a name (unquoted), a dot, or anything else.
#[derive(Debug, PartialEq)]
enum Token {
    Name(String),
    Dot,
    Other,
}

/// The tokens of `sql` with their byte ranges; string literals and comments are single
/// `Other` tokens, so that nothing inside them is taken for a name.
fn tokens(sql: &str) -> Vec<(Token, Range<usize>)> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let closing = |c: u8| match c {
        b'"' => Some(b'"'),
        b'`' => Some(b'`'),
        b'[' => Some(b']'),
        _ => None,
    };
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'-' && bytes.get(i + 1) == Some(&b'-') {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && bytes.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            i = (i + 2).min(bytes.len());
            continue;
        }
        if c == b'\'' {
            i += 1;
            while i < bytes.len() {
                if bytes[i] == b'\'' {
                    if bytes.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    break;
                }
                i += 1;
            }
            i = (i + 1).min(bytes.len());
            out.push((Token::Other, start..i));
            continue;
        }
        if let Some(end) = closing(c) {
            let mut name = Vec::new();
            i += 1;
            while i < bytes.len() {
                if bytes[i] == end {
                    if end != b']' && bytes.get(i + 1) == Some(&end) {
                        name.push(end);
                        i += 2;
                        continue;
                    }
                    break;
                }
                name.push(bytes[i]);
                i += 1;
            }
            i = (i + 1).min(bytes.len());
            out.push((Token::Name(String::from_utf8_lossy(&name).into_owned()), start..i));
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'$' || bytes[i] >= 0x80)
            {
                i += 1;
            }
            out.push((Token::Name(sql[start..i].to_string()), start..i));
            continue;
        }
        if c.is_ascii_digit() {
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'.') {
                i += 1;
            }
            out.push((Token::Other, start..i));
            continue;
        }
        i += 1;
        while i < bytes.len() && !sql.is_char_boundary(i) {
            i += 1;
        }
        out.push((if c == b'.' { Token::Dot } else { Token::Other }, start..i));
    }
    out
}

/// The tables of the attached namespaces, by namespace and lower-cased name (their own
/// spelling kept).
fn mirror_tables(conn: &Connection) -> rusqlite::Result<BTreeMap<(String, String), String>> {
    let namespaces: Vec<String> = {
        let mut stmt = conn.prepare("SELECT name FROM pragma_database_list WHERE name NOT IN ('main', 'temp')")?;
        stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
    };
    let mut tables = BTreeMap::new();
    for ns in namespaces {
        let mut stmt =
            conn.prepare(&format!("SELECT name FROM {}.sqlite_master WHERE type IN ('table', 'view')", quote(&ns)))?;
        for name in stmt.query_map([], |r| r.get::<_, String>(0))? {
            let name = name?;
            tables.insert((ns.to_lowercase(), name.to_lowercase()), name);
        }
        tables.insert((ns.to_lowercase(), String::new()), ns.clone());
    }
    Ok(tables)
}

/// The mirror tables a statement names.
#[derive(Debug, Default)]
pub struct Names {
    /// `namespace.table` references (namespace and table as the files spell them), with where
    /// each is written.
    pub qualified: BTreeMap<(String, String), Vec<Range<usize>>>,
    /// Plain names that are tables of an attached namespace, with every (namespace, table) they
    /// could mean; names the connection's `temp` schema has are left out (they mean that).
    pub plain: BTreeMap<String, Vec<(String, String)>>,
}

impl Names {
    /// Every (namespace, table) the statement may read.
    pub fn tables(&self) -> impl Iterator<Item = &(String, String)> {
        self.qualified.keys().chain(self.plain.values().flatten())
    }
}

/// The mirror tables `sql` names, on a connection with the mirror's namespaces attached.
pub fn names(conn: &Connection, sql: &str) -> rusqlite::Result<Names> {
    let tables = mirror_tables(conn)?;
    let temp: Vec<String> = {
        let mut stmt = conn.prepare("SELECT lower(name) FROM temp.sqlite_master WHERE type IN ('table', 'view')")?;
        stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
    };
    let toks = tokens(sql);
    let namespace = |name: &str| tables.get(&(name.to_lowercase(), String::new())).cloned();
    let mut names = Names::default();
    let mut i = 0;
    while i < toks.len() {
        let after_dot = i > 0 && toks[i - 1].0 == Token::Dot;
        if let Token::Name(first) = &toks[i].0
            && !after_dot
        {
            if let (Some((Token::Dot, _)), Some((Token::Name(second), end))) = (toks.get(i + 1), toks.get(i + 2))
                && let Some(ns) = namespace(first)
                && let Some(table) = tables.get(&(first.to_lowercase(), second.to_lowercase()))
            {
                names.qualified.entry((ns, table.clone())).or_default().push(toks[i].1.start..end.end);
                i += 3;
                continue;
            }
            let lower = first.to_lowercase();
            if toks.get(i + 1).map(|t| &t.0) != Some(&Token::Dot) && !temp.contains(&lower) {
                let meanings: Vec<(String, String)> = tables
                    .iter()
                    .filter(|((_, t), _)| *t == lower)
                    .map(|((ns, _), table)| (tables[&(ns.clone(), String::new())].clone(), table.clone()))
                    .collect();
                if !meanings.is_empty() {
                    names.plain.insert(lower, meanings);
                }
            }
        }
        i += 1;
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_strings_and_comments_are_not_names() {
        let names: Vec<String> =
            tokens("SELECT 'canvas.users' -- canvas.users\n, \"a\"\"b\" FROM /* x */ canvas . [users]")
                .into_iter()
                .filter_map(|(t, _)| match t {
                    Token::Name(n) => Some(n),
                    _ => None,
                })
                .collect();
        assert_eq!(names, ["SELECT", "a\"b", "FROM", "canvas", "users"]);
    }
}
