//! The seed corpus and the mutations shared by the fuzz targets.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use serde_json::Value;

/// `PROPTEST_CASES` (read by `Config::default()`) sets the case count;
/// failures are kept beside the test sources.
pub fn config() -> Config {
    Config {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..Config::default()
    }
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every file of `schemas/examples/{valid,invalid}`, as bytes.
pub fn envelope_examples() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for dir in ["valid", "invalid"] {
        let dir = repo().join("schemas/examples").join(dir);
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for p in paths {
            out.push(std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())));
        }
    }
    assert!(out.len() >= 10, "the envelope corpus is schemas/examples/");
    out
}

/// The valid examples, parsed.
pub fn valid_envelopes() -> Vec<Value> {
    let dir = repo().join("schemas/examples/valid");
    let mut out: Vec<Value> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{e}"));
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        })
        .collect();
    out.sort_by_key(|v| v.to_string());
    out
}

/// Tokens that tend to break parsers, spliced in by [`Mutation::Splice`].
const INTERESTING: &[&str] = &[
    "\"",
    "\\",
    "\\u0000",
    "\\ud800",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "true",
    "-0",
    "1e999",
    "-1",
    "18446744073709551616",
    "9223372036854775807",
    "0.0000001",
    "é",
    "\u{10FFFF}",
    "💥",
    "\u{0}",
    "\n",
    "=",
    "[[",
    "]]",
    "'''",
    "\"\"\"",
    "#",
    "<",
    "</title>",
    "<title>",
    "2026-13-45T25:61:61Z",
    "0000-01-01T00:00:00+23:59",
    "9999-12-31T23:59:60Z",
];

/// One edit of a byte string.
#[derive(Clone, Debug)]
pub enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    Splice(usize, usize),
    Duplicate(usize, usize),
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Flip(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Insert(p, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 0..INTERESTING.len()).prop_map(|(p, t)| Mutation::Splice(p, t)),
        (any::<usize>(), any::<usize>()).prop_map(|(p, n)| Mutation::Duplicate(p, n)),
    ]
}

pub fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        let at = |p: usize| if len == 0 { 0 } else { p % (len + 1) };
        match *m {
            Mutation::Flip(p, b) if len > 0 => bytes[p % len] ^= b.max(1),
            Mutation::Insert(p, b) => bytes.insert(at(p), b),
            Mutation::Delete(p) if len > 0 => {
                bytes.remove(p % len);
            }
            Mutation::Truncate(p) => bytes.truncate(at(p)),
            Mutation::Splice(p, t) => {
                let at = at(p);
                bytes.splice(at..at, INTERESTING[t].bytes());
            }
            Mutation::Duplicate(p, n) if len > 0 => {
                let start = p % len;
                let end = (start + 1 + n % 64).min(len);
                let chunk = bytes[start..end].to_vec();
                bytes.splice(end..end, chunk);
            }
            _ => {}
        }
    }
    bytes
}

/// One corpus entry (by index) with up to `max` mutations.
pub fn mutated(corpus: Vec<Vec<u8>>, max: usize) -> impl Strategy<Value = Vec<u8>> {
    let n = corpus.len();
    (0..n, prop::collection::vec(mutation(), 0..=max))
        .prop_map(move |(i, ms)| mutate(corpus[i].clone(), &ms))
}

/// Arbitrary JSON, shaped like the payloads: nested objects and arrays of
/// every scalar, including numbers past u64 and odd strings.
pub fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "\\PC{0,24}".prop_map(Value::String),
        (0..INTERESTING.len()).prop_map(|i| Value::String(INTERESTING[i].to_string())),
        prop::sample::select(vec![
            "acc_1",
            "2026-11-22",
            "2026-11-22T10:15:00Z",
            "22.00",
            "monthly",
            "active",
            "acme",
            "account.created",
            "usage.reported",
            "MS-365-BP",
            "id",
            "record_count",
            "clients",
        ])
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    "[a-z_]{1,12}",
                    prop::sample::select(vec![
                        "id",
                        "type",
                        "data",
                        "connection",
                        "sequence",
                        "occurred_at",
                        "schema_version",
                        "record_count",
                        "clients",
                        "error",
                        "Message",
                        "errorMessage",
                        "error_description",
                        "ClassName",
                        "[0].name",
                    ])
                    .prop_map(str::to_string),
                ],
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every JSON pointer of a value (the root included).
pub fn pointers(v: &Value) -> Vec<String> {
    fn walk(v: &Value, at: String, out: &mut Vec<String>) {
        out.push(at.clone());
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    walk(
                        x,
                        format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                        out,
                    )
                }
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    walk(x, format!("{at}/{i}"), out)
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, String::new(), &mut out);
    out
}

/// One edit of a JSON value.
#[derive(Clone, Debug)]
pub enum Edit {
    Replace(usize, Value),
    Remove(usize),
    Add(usize, String, Value),
}

pub fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), json()).prop_map(|(p, v)| Edit::Replace(p, v)),
        any::<usize>().prop_map(Edit::Remove),
        (any::<usize>(), "[a-z_]{1,10}", json()).prop_map(|(p, k, v)| Edit::Add(p, k, v)),
    ]
}

pub fn apply(mut v: Value, edits: &[Edit]) -> Value {
    for e in edits {
        let ptrs = pointers(&v);
        let pick = |i: usize| ptrs[i % ptrs.len()].clone();
        match e {
            Edit::Replace(i, x) => {
                if let Some(slot) = v.pointer_mut(&pick(*i)) {
                    *slot = x.clone();
                }
            }
            Edit::Remove(i) => {
                let p = pick(*i);
                if let Some((parent, key)) = p.rsplit_once('/') {
                    let key = key.replace("~1", "/").replace("~0", "~");
                    match v.pointer_mut(parent) {
                        Some(Value::Object(m)) => {
                            m.remove(&key);
                        }
                        Some(Value::Array(a)) => {
                            if let Ok(n) = key.parse::<usize>() {
                                if n < a.len() {
                                    a.remove(n);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            Edit::Add(i, k, x) => {
                if let Some(Value::Object(m)) = v.pointer_mut(&pick(*i)) {
                    m.insert(k.clone(), x.clone());
                }
            }
        }
    }
    v
}
