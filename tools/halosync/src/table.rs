//! Plain-text tables and the small text helpers the commands share.

use chrono::{DateTime, Utc};

/// Renders rows under a header, columns padded to their widest cell.
/// Columns listed in `right` are right-aligned (numbers). The last column
/// is never padded, so long messages do not leave trailing blanks.
pub fn render(header: &[&str], rows: &[Vec<String>], right: &[usize]) -> String {
    let cols = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate().take(cols) {
            if i > 0 {
                text.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            if right.contains(&i) {
                text.push_str(&" ".repeat(pad));
                text.push_str(cell);
            } else if i + 1 == cols {
                text.push_str(cell);
            } else {
                text.push_str(cell);
                text.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// One line, at most `max` characters, ending in `…` when cut.
pub fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `2026-11-22 10:15:00Z`
pub fn time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

/// `45s ago`, `12m ago`, `3h ago`, `2d ago`.
pub fn age(t: &DateTime<Utc>, now: &DateTime<Utc>) -> String {
    let secs = (*now - *t).num_seconds();
    if secs < 0 {
        return "in the future".to_string();
    }
    let (n, unit) = match secs {
        s if s < 120 => (s, "s"),
        s if s < 2 * 3600 => (s / 60, "m"),
        s if s < 2 * 86_400 => (s / 3600, "h"),
        s => (s / 86_400, "d"),
    };
    format!("{n}{unit} ago")
}

/// `time (age)` or `-`.
pub fn when(t: Option<&DateTime<Utc>>, now: &DateTime<Utc>) -> String {
    match t {
        Some(t) => format!("{} ({})", time(t), age(t, now)),
        None => "-".to_string(),
    }
}

/// `1 message`, `2 messages`.
pub fn plural(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Shell-quotes a value for a command line we print as advice.
pub fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/,=@%+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_aligned_columns() {
        let t = render(
            &["A", "COUNT", "MESSAGE"],
            &[
                vec!["x".into(), "1".into(), "short".into()],
                vec!["longer".into(), "120".into(), "m".into()],
            ],
            &[1],
        );
        assert_eq!(
            t,
            "A       COUNT  MESSAGE\nx           1  short\nlonger    120  m\n"
        );
    }

    #[test]
    fn cuts_and_flattens() {
        assert_eq!(one_line("a\n  b", 10), "a b");
        assert_eq!(one_line("abcdefghijkl", 5), "abcd…");
    }

    #[test]
    fn ages_read_naturally() {
        let now = Utc::now();
        assert_eq!(age(&(now - chrono::Duration::seconds(30)), &now), "30s ago");
        assert_eq!(age(&(now - chrono::Duration::minutes(30)), &now), "30m ago");
        assert_eq!(age(&(now - chrono::Duration::hours(5)), &now), "5h ago");
        assert_eq!(age(&(now - chrono::Duration::days(3)), &now), "3d ago");
    }

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(shell_word("evt_1"), "evt_1");
        assert_eq!(shell_word("a b"), "'a b'");
    }
}
