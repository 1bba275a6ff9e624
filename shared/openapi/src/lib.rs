//! HaloPSA's OpenAPI document (vendored beside this crate's `Cargo.toml`, see its `SOURCE.md`)
//! and request binding the way HaloPSA's Newtonsoft model binder does it.
//!
//! The document is the one source of which paths and methods exist and of
//! every request property's name and type: nothing here copies a field list.
//!
//! * [`Spec::route`]: a path the document lacks is unknown (404), a known
//!   path with a method it lacks is 405.
//! * [`Spec::bind`]: a request body against its model. A property the model
//!   lacks is dropped and reported (Newtonsoft ignores it silently); a value
//!   of the wrong JSON type fails the whole request with a Newtonsoft-style
//!   message naming the JSON path (`[0].default_currency_code`). Numbers
//!   written as text that parse are accepted and stored as numbers, as
//!   Newtonsoft accepts them. [`Mode::Strict`] refuses those too: it is what
//!   the conformance test of halosync's request models uses.
//!
//! The document marks nothing required and documents no response bodies;
//! what the simulator does beyond binding stays in `store.rs`.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use serde_json::{Map, Number, Value};

/// The vendored document, embedded at build time (3.6 MB of JSON; parsed
/// once, on first use).
pub const DOCUMENT: &str = include_str!("../halopsa-openapi.json");

static SPEC: LazyLock<Result<Spec, String>> = LazyLock::new(|| Spec::parse(DOCUMENT));

/// One path of the document: its segments and its methods.
#[derive(Debug)]
struct PathSpec {
    /// The document's spelling, e.g. `/RecurringInvoice/{id}`.
    template: String,
    segs: Vec<Seg>,
    /// (upper-case method, item schema of the array body if any).
    methods: Vec<(String, Option<String>)>,
}

/// One segment of a path template.
#[derive(Debug)]
enum Seg {
    /// Lower-cased literal.
    Lit(String),
    /// `{parameter}`; `true` when the document types it integer (then
    /// only an integer segment matches it, as ASP.NET's route constraint
    /// does: `POST /Invoice/Lines` is not `/Invoice/{id}`).
    Param(bool),
}

/// A matched path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// The path and method exist: the document's path template and the
    /// schema of the body's elements (`None`: no JSON-array body).
    Known {
        template: String,
        body: Option<String>,
    },
    /// The path exists, not with this method.
    MethodNotAllowed { template: String },
    /// No such path.
    Unknown,
}

/// How lenient binding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// As Newtonsoft binds: numbers as text, `0`/`1` and `"true"` for
    /// booleans, numbers into strings are accepted and converted.
    Newtonsoft,
    /// Only the JSON type the document gives (what halosync must send).
    Strict,
}

/// The result of binding a body: the value as the model holds it, and the
/// properties the model lacks (JSON paths without indices, e.g.
/// `notes`, `lines.note`), which were dropped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bound {
    pub value: Value,
    pub ignored: BTreeSet<String>,
}

/// HaloPSA's OpenAPI document, parsed.
#[derive(Debug)]
pub struct Spec {
    paths: Vec<PathSpec>,
    schemas: Map<String, Value>,
}

impl Spec {
    /// The embedded document (parsed once).
    pub fn embedded() -> Result<&'static Spec, String> {
        SPEC.as_ref().map_err(Clone::clone)
    }

    /// Parses an OpenAPI 3 document.
    pub fn parse(text: &str) -> Result<Spec, String> {
        let doc: Value =
            serde_json::from_str(text).map_err(|e| format!("the OpenAPI document: {e}"))?;
        let schemas = doc
            .pointer("/components/schemas")
            .and_then(Value::as_object)
            .cloned()
            .ok_or("the OpenAPI document has no components.schemas")?;
        let Some(raw) = doc.get("paths").and_then(Value::as_object) else {
            return Err("the OpenAPI document has no paths".into());
        };
        let mut paths = Vec::with_capacity(raw.len());
        for (template, ops) in raw {
            let int_params: Vec<String> = ops
                .as_object()
                .into_iter()
                .flat_map(|ops| ops.values())
                .filter_map(|op| op.get("parameters").and_then(Value::as_array))
                .flatten()
                .filter(|p| p.get("in").and_then(Value::as_str) == Some("path"))
                .filter(|p| p.pointer("/schema/type").and_then(Value::as_str) == Some("integer"))
                .filter_map(|p| p.get("name").and_then(Value::as_str).map(str::to_string))
                .collect();
            let segs = template
                .split('/')
                .filter(|s| !s.is_empty())
                .map(|s| {
                    if s.contains('{') {
                        let name = s.trim_matches(|c| c == '{' || c == '}');
                        Seg::Param(int_params.iter().any(|p| p == name))
                    } else {
                        Seg::Lit(s.to_ascii_lowercase())
                    }
                })
                .collect();
            let methods = ops
                .as_object()
                .map(|ops| {
                    ops.iter()
                        .map(|(m, op)| (m.to_ascii_uppercase(), body_schema(op)))
                        .collect()
                })
                .unwrap_or_default();
            paths.push(PathSpec {
                template: template.clone(),
                segs,
                methods,
            });
        }
        Ok(Spec { paths, schemas })
    }

    /// The document's schema `name` (e.g. `Area`).
    pub fn schema(&self, name: &str) -> Option<&Value> {
        self.schemas.get(name)
    }

    /// Matches `segs` (the path after `/api`) case-insensitively, as
    /// HaloPSA routes: a literal segment beats a `{parameter}` one
    /// (`/Invoice/updatelines` is not `/Invoice/{id}`).
    pub fn route(&self, method: &str, segs: &[&str]) -> Route {
        let best = self
            .paths
            .iter()
            .filter(|p| p.segs.len() == segs.len())
            .filter(|p| {
                p.segs.iter().zip(segs).all(|(want, got)| match want {
                    Seg::Lit(lit) => lit.eq_ignore_ascii_case(got),
                    Seg::Param(int) => !int || got.parse::<i64>().is_ok(),
                })
            })
            .max_by_key(|p| {
                p.segs
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| matches!(s, Seg::Lit(_)))
                    .map(|(i, _)| 1u64 << (16 - i.min(16)))
                    .sum::<u64>()
            });
        let Some(path) = best else {
            return Route::Unknown;
        };
        match path
            .methods
            .iter()
            .find(|(m, _)| m.eq_ignore_ascii_case(method))
        {
            Some((_, body)) => Route::Known {
                template: path.template.clone(),
                body: body.clone(),
            },
            None => Route::MethodNotAllowed {
                template: path.template.clone(),
            },
        }
    }

    /// Binds a request body that the document types as an array of
    /// `schema`. `Err` is the Newtonsoft-style message; nothing of the body
    /// may then be saved.
    pub fn bind_array(&self, schema: &str, body: Value, mode: Mode) -> Result<Bound, String> {
        let mut ignored = BTreeSet::new();
        let Value::Array(elements) = body else {
            return Err(format!(
                "Cannot deserialize the current JSON {} into type 'System.Collections.Generic.List`1[Halo.Models.{schema}]' because the type requires a JSON array (e.g. [1,2,3]) to deserialize correctly. Path '', line 1, position 1.",
                json_kind(&body)
            ));
        };
        let mut out = Vec::with_capacity(elements.len());
        for (i, el) in elements.into_iter().enumerate() {
            let path = format!("[{i}]");
            out.push(self.bind_object(schema, el, &path, "", mode, &mut ignored)?);
        }
        Ok(Bound {
            value: Value::Array(out),
            ignored,
        })
    }

    /// Binds one object of `schema` (see [`Spec::bind_array`]).
    pub fn bind(&self, schema: &str, value: Value, mode: Mode) -> Result<Bound, String> {
        let mut ignored = BTreeSet::new();
        let value = self.bind_object(schema, value, "", "", mode, &mut ignored)?;
        Ok(Bound { value, ignored })
    }

    fn bind_object(
        &self,
        schema: &str,
        value: Value,
        path: &str,
        name_path: &str,
        mode: Mode,
        ignored: &mut BTreeSet<String>,
    ) -> Result<Value, String> {
        let obj = match value {
            Value::Object(obj) => obj,
            Value::Null => return Ok(Value::Null),
            other => {
                return Err(format!(
                    "Error converting value {} to type 'Halo.Models.{schema}'. Path '{path}'.",
                    shown(&other)
                ))
            }
        };
        let props = self
            .schemas
            .get(schema)
            .and_then(|s| s.get("properties"))
            .and_then(Value::as_object);
        let mut out = Map::new();
        for (key, v) in obj {
            let child_path = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            let child_name = if name_path.is_empty() {
                key.clone()
            } else {
                format!("{name_path}.{key}")
            };
            // Newtonsoft matches property names case-insensitively.
            let prop = props.and_then(|p| {
                p.get(&key).map(|s| (key.clone(), s)).or_else(|| {
                    p.iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(&key))
                        .map(|(k, s)| (k.clone(), s))
                })
            });
            let Some((name, prop)) = prop else {
                ignored.insert(child_name);
                continue;
            };
            let bound = self.bind_value(prop, v, &child_path, &child_name, mode, ignored)?;
            out.insert(name, bound);
        }
        Ok(Value::Object(out))
    }

    fn bind_value(
        &self,
        prop: &Value,
        v: Value,
        path: &str,
        name_path: &str,
        mode: Mode,
        ignored: &mut BTreeSet<String>,
    ) -> Result<Value, String> {
        if let Some(target) = prop.get("$ref").and_then(Value::as_str) {
            let schema = target.rsplit('/').next().unwrap_or(target);
            return self.bind_object(schema, v, path, name_path, mode, ignored);
        }
        let nullable = prop
            .get("nullable")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let ty = prop.get("type").and_then(Value::as_str).unwrap_or("object");
        let format = prop.get("format").and_then(Value::as_str).unwrap_or("");
        if v.is_null() {
            // A non-nullable value type (`int id`) refuses null; reference
            // types and `T?` take it.
            return if nullable || matches!(ty, "string" | "array" | "object") {
                Ok(Value::Null)
            } else {
                Err(format!(
                    "Error converting value {{null}} to type '{}'. Path '{path}'.",
                    clr_type(ty, format)
                ))
            };
        }
        match ty {
            "integer" => bind_integer(v, format, path, mode),
            "number" => bind_number(v, path, mode),
            "boolean" => bind_bool(v, path, mode),
            "string" => bind_string(v, format, path, mode),
            "array" => {
                let Value::Array(items) = v else {
                    return Err(format!(
                        "Cannot deserialize the current JSON {} into type 'List`1' because the type requires a JSON array to deserialize correctly. Path '{path}'.",
                        json_kind(&v)
                    ));
                };
                let item = prop.get("items").cloned().unwrap_or(Value::Null);
                let mut out = Vec::with_capacity(items.len());
                for (i, it) in items.into_iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    out.push(self.bind_value(&item, it, &p, name_path, mode, ignored)?);
                }
                Ok(Value::Array(out))
            }
            // `object` (free-form) and anything untyped: taken as sent.
            _ => Ok(v),
        }
    }
}

/// The item schema of an operation's JSON array body.
fn body_schema(op: &Value) -> Option<String> {
    let content = op.pointer("/requestBody/content")?.as_object()?;
    let schema = content
        .get("application/json")
        .or_else(|| content.values().next())?
        .get("schema")?;
    let item = if schema.get("type").and_then(Value::as_str) == Some("array") {
        schema.pointer("/items/$ref")?
    } else {
        schema.get("$ref")?
    };
    item.as_str()
        .map(|r| r.rsplit('/').next().unwrap_or(r).to_string())
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Object(_) => "object (e.g. {\"name\":\"value\"})",
        Value::Array(_) => "array",
        Value::String(_) => "string",
        Value::Number(_) => "number",
        Value::Bool(_) => "boolean",
        Value::Null => "null",
    }
}

/// A value as Newtonsoft quotes it in a message.
fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => format!("\"{s}\""),
        Value::Object(_) => "StartObject".into(),
        Value::Array(_) => "StartArray".into(),
        other => other.to_string(),
    }
}

fn token(v: &Value) -> &'static str {
    match v {
        Value::Object(_) => "StartObject",
        Value::Array(_) => "StartArray",
        Value::String(_) => "String",
        Value::Number(n) if n.is_f64() => "Float",
        Value::Number(_) => "Integer",
        Value::Bool(_) => "Boolean",
        Value::Null => "Null",
    }
}

fn clr_type(ty: &str, format: &str) -> &'static str {
    match (ty, format) {
        ("integer", "int64") => "System.Int64",
        ("integer", _) => "System.Int32",
        ("number", _) => "System.Double",
        ("boolean", _) => "System.Boolean",
        _ => "System.Object",
    }
}

fn bind_integer(v: Value, format: &str, path: &str, mode: Mode) -> Result<Value, String> {
    let (min, max, what) = if format == "int64" {
        (i64::MIN as f64, i64::MAX as f64, "Int64")
    } else {
        (f64::from(i32::MIN), f64::from(i32::MAX), "Int32")
    };
    let range_err =
        |n: &str| format!("JSON integer {n} is too large or small for an {what}. Path '{path}'.");
    match &v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                if (i as f64) < min || (i as f64) > max {
                    return Err(range_err(&n.to_string()));
                }
                return Ok(v);
            }
            if n.as_u64().is_some() {
                return Err(range_err(&n.to_string()));
            }
            // A fraction (or 1.0: Newtonsoft reads any float token into an
            // integer only through a string conversion, which refuses it).
            Err(format!(
                "Input string '{n}' is not a valid integer. Path '{path}'."
            ))
        }
        Value::String(s) if mode == Mode::Newtonsoft => {
            let t = s.trim();
            if t.is_empty() {
                return Ok(Value::Null);
            }
            match t.parse::<i64>() {
                Ok(i) if (i as f64) >= min && (i as f64) <= max => Ok(Value::from(i)),
                Ok(_) => Err(range_err(t)),
                Err(_) => Err(format!(
                    "Could not convert string to integer: {s}. Path '{path}'."
                )),
            }
        }
        Value::String(s) => Err(format!(
            "Could not convert string to integer: {s}. Path '{path}'. (strict: the document types it {})",
            if format == "int64" { "int64" } else { "int32" }
        )),
        other => Err(format!(
            "Error reading integer. Unexpected token: {}. Path '{path}'.",
            token(other)
        )),
    }
}

fn bind_number(v: Value, path: &str, mode: Mode) -> Result<Value, String> {
    match &v {
        Value::Number(_) => Ok(v),
        Value::String(s) if mode == Mode::Newtonsoft => {
            let t = s.trim();
            if t.is_empty() {
                return Ok(Value::Null);
            }
            t.parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .and_then(Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| format!("Could not convert string to double: {s}. Path '{path}'."))
        }
        Value::String(s) => Err(format!(
            "Could not convert string to double: {s}. Path '{path}'. (strict: the document types it double)"
        )),
        other => Err(format!(
            "Error reading double. Unexpected token: {}. Path '{path}'.",
            token(other)
        )),
    }
}

fn bind_bool(v: Value, path: &str, mode: Mode) -> Result<Value, String> {
    match (&v, mode) {
        (Value::Bool(_), _) => Ok(v),
        (Value::Number(n), Mode::Newtonsoft) if n.as_i64().is_some() => {
            Ok(Value::Bool(n.as_i64() != Some(0)))
        }
        (Value::String(s), Mode::Newtonsoft) => match s.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            "" => Ok(Value::Null),
            _ => Err(format!(
                "Could not convert string to boolean: {s}. Path '{path}'."
            )),
        },
        (other, _) => Err(format!(
            "Error reading boolean. Unexpected token: {}. Path '{path}'.",
            token(other)
        )),
    }
}

fn bind_string(v: Value, format: &str, path: &str, mode: Mode) -> Result<Value, String> {
    let text = match (&v, mode) {
        (Value::String(s), _) => s.clone(),
        // Newtonsoft reads a primitive into a string property as its text.
        (Value::Number(_) | Value::Bool(_), Mode::Newtonsoft) => v.to_string(),
        (other, _) => {
            return Err(format!(
                "Error reading string. Unexpected token: {}. Path '{path}'.",
                token(other)
            ))
        }
    };
    match format {
        "date-time" if !text.trim().is_empty() && !is_datetime(&text) => Err(format!(
            "Could not convert string to DateTime: {text}. Path '{path}'."
        )),
        "uuid" if !text.trim().is_empty() && uuid::Uuid::parse_str(text.trim()).is_err() => Err(
            format!("Could not convert string to Guid: {text}. Path '{path}'."),
        ),
        _ => Ok(Value::String(text)),
    }
}

/// A date or date-time .NET's `DateTime.Parse` takes in the usual ISO
/// forms (`2026-11-01`, `2026-11-01T00:00:00`, with offset or `Z`).
fn is_datetime(s: &str) -> bool {
    let s = s.trim();
    chrono::DateTime::parse_from_rfc3339(s).is_ok()
        || chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").is_ok()
        || chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").is_ok()
        || chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> &'static Spec {
        Spec::embedded().unwrap()
    }

    #[test]
    fn routes_as_the_document_spells_them() {
        let s = spec();
        assert!(matches!(
            s.route("POST", &["client"]),
            Route::Known { ref body, .. } if body.as_deref() == Some("Area")
        ));
        assert!(matches!(
            s.route("POST", &["Invoice", "UpdateLines"]),
            Route::Known { ref template, ref body } if template == "/Invoice/updatelines" && body.as_deref() == Some("InvoiceDetail")
        ));
        assert_eq!(s.route("POST", &["Invoice", "Lines"]), Route::Unknown);
        assert!(matches!(
            s.route("GET", &["RecurringInvoice", "-3"]),
            Route::Known { ref template, .. } if template == "/RecurringInvoice/{id}"
        ));
        assert!(matches!(
            s.route("PUT", &["Client"]),
            Route::MethodNotAllowed { .. }
        ));
        assert_eq!(s.route("GET", &["NoSuchThing"]), Route::Unknown);
    }

    #[test]
    fn binds_like_newtonsoft() {
        let s = spec();
        let b = s
            .bind_array(
                "Area",
                json!([{"name": "A", "default_currency_code": "2", "colour_of_sky": "blue"}]),
                Mode::Newtonsoft,
            )
            .unwrap();
        assert_eq!(b.value, json!([{"name": "A", "default_currency_code": 2}]));
        assert_eq!(b.ignored.into_iter().collect::<Vec<_>>(), ["colour_of_sky"]);

        let e = s
            .bind_array(
                "Area",
                json!([{"name": "A"}, {"default_currency_code": "USD"}]),
                Mode::Newtonsoft,
            )
            .unwrap_err();
        assert!(e.contains("[1].default_currency_code"), "{e}");
        assert!(
            e.contains("Could not convert string to integer: USD"),
            "{e}"
        );
        for bad in [json!(1.5), json!(3_000_000_000_i64), json!({"a": 1})] {
            let e = s
                .bind_array("Area", json!([{"toplevel_id": bad}]), Mode::Newtonsoft)
                .unwrap_err();
            assert!(e.contains("Path '[0].toplevel_id'"), "{e}");
        }
        let e = s
            .bind_array(
                "InvoiceHeader",
                json!([{"id": 1, "add_lines": [{"qty_order": "x"}]}]),
                Mode::Newtonsoft,
            )
            .unwrap_err();
        assert!(e.contains("[0].add_lines[0].qty_order"), "{e}");
        let b = s
            .bind_array(
                "InvoiceHeader",
                json!([{"notes": "n", "lines": [{"note": 1, "qty_order": "2.5"}]}]),
                Mode::Newtonsoft,
            )
            .unwrap();
        assert_eq!(b.value, json!([{"lines": [{"qty_order": 2.5}]}]));
        assert_eq!(
            b.ignored.into_iter().collect::<Vec<_>>(),
            ["lines.note", "notes"]
        );
        assert!(s
            .bind("Area", json!({"default_currency_code": "2"}), Mode::Strict)
            .is_err());
    }
}
