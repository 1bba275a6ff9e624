//! HaloPSA's request models, as its OpenAPI document names and types them
//! (`shared/openapi/halopsa-openapi.json`): one struct per model
//! halosync writes (or reads a field of), holding only the properties
//! halosync uses. Every request body is built from these, never from a
//! JSON map, and the conformance test below checks every field of every
//! model against the document: the name exists on that schema and the
//! JSON type matches (`int32` range included). A field the document lacks
//! fails that test, not a customer's billing (HaloPSA's Newtonsoft binder
//! would silently drop it, or refuse the whole array for a wrong type).
//!
//! * `Option` fields are skipped when `None`: an update leaves what it does
//!   not send alone. `Option<Option<T>>` sends `null` for `Some(None)` (a
//!   date cleared on purpose).
//! * [`Int32`]: the document's `integer`/`int32`. Halosync keeps ids as
//!   `i64`; a value outside int32 fails serialisation ([`body`]) with a
//!   `rejected` failure instead of reaching HaloPSA, which would refuse it.
//! * [`DateTime`]: the document's `string`/`date-time`
//!   (`2026-11-01T00:00:00`, or a plain date, which .NET parses too).

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::error::Failure;

/// An `int32` of the document, kept as `i64`; serialising a value outside
/// int32 is an error (see [`body`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(transparent)]
pub struct Int32(pub i64);

impl From<i64> for Int32 {
    fn from(v: i64) -> Int32 {
        Int32(v)
    }
}

impl From<u32> for Int32 {
    fn from(v: u32) -> Int32 {
        Int32(i64::from(v))
    }
}

impl Serialize for Int32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match i32::try_from(self.0) {
            Ok(v) => s.serialize_i32(v),
            Err(_) => Err(serde::ser::Error::custom(format!(
                "{} is outside HaloPSA's int32 range",
                self.0
            ))),
        }
    }
}

/// A `date-time` of the document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DateTime(pub String);

impl DateTime {
    /// A billing date (`YYYY-MM-DD`) as HaloPSA's midnight date-time,
    /// the one spelling of a contract date on a licence or a recurring
    /// line. Sent without a zone, like the dates HaloPSA itself returns, so
    /// that a calendar day is not shifted by the tenant's time zone (how
    /// HaloPSA reads zoned input dates is UNCONFIRMED, reference §2).
    pub fn midnight(date: &str) -> DateTime {
        DateTime(format!("{date}T00:00:00"))
    }
}

/// The JSON body of a model; a value the document's type cannot hold
/// (an int32 out of range) is a `rejected` failure naming it.
pub fn body<T: Serialize>(model: &T) -> Result<Value, Failure> {
    serde_json::to_value(model).map_err(|e| {
        Failure::rejected(format!("a value does not fit HaloPSA's request model: {e}"))
    })
}

/// `POST /Client`: a customer (`Area`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Area {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Int32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inactive: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub website: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tax_number: Option<String>,
    /// The id of a `/Currency` row (not an ISO code).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_currency_code: Option<Int32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_external_link: Option<ExternalLinkList>,
}

/// `POST /SoftwareLicence`: a licence (`Licence_List`). It has no
/// `new_external_link`: licences carry their marker in
/// `thirdparty_client_id`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LicenceList {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Int32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<Int32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<Int32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_date: Option<DateTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_date: Option<Option<DateTime>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub billing_cycle: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_active: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_sku: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purchase_price: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thirdparty_client_id: Option<String>,
}

impl LicenceList {
    /// The product a licence read from HaloPSA stands for: its
    /// `product_sku` (trimmed; none when empty), named by its `name`, else
    /// by the sku. The one reading of it, for every family that needs a
    /// subscription's product from its licence.
    pub fn product_of(row: &Value) -> Option<crate::contract::Product> {
        let sku = row.get("product_sku")?.as_str()?.trim().to_string();
        let name = row
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(&sku)
            .to_string();
        (!sku.is_empty()).then_some(crate::contract::Product { sku, name })
    }
}

/// `POST /RecurringInvoice` and `POST /Invoice`: an invoice header
/// (`InvoiceHeader`), with its first lines inline (`lines`) on create, or
/// lines added to an existing one (`add_lines`, `/Invoice` only).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct InvoiceHeader {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Int32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<Int32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invoice_date: Option<DateTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notes_1: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lines: Option<Vec<InvoiceDetail>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub add_lines: Option<Vec<InvoiceDetail>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_external_link: Option<ExternalLinkList>,
}

/// An invoice line (`InvoiceDetail`): `POST /RecurringInvoice/Lines`,
/// `/RecurringInvoice/updatelines`, `/Invoice/updatelines`, and inside
/// [`InvoiceHeader`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct InvoiceDetail {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Int32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ihid: Option<Int32>,
    #[serde(rename = "_itemid", skip_serializing_if = "Option::is_none")]
    pub itemid: Option<Int32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_shortdescription: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qty_order: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit_price: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit_cost: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startdate: Option<DateTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enddate: Option<Option<DateTime>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isinactive: Option<bool>,
    /// halosync's marker of the line's aggregate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_internal_reference: Option<String>,
    /// The applied version of the line's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_external_reference: Option<String>,
}

/// `POST /ExternalLink`, and `new_external_link` of a record
/// (`ExternalLink_List`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ExternalLinkList {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Int32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub halo_id: Option<Int32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_id: Option<Int32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub third_party_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub third_party_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub third_party_secondary_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub third_party_desc: Option<String>,
}

/// The `/Item` fields halosync reads (`Item`). The model has no active
/// flag: the list's `includeinactive`/`includeactive` select by it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: Int32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseprice: Option<f64>,
}

/// A `/Currency` row (`Currency`): customers refer to one by `id`;
/// halosync finds it by its ISO `code`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Currency {
    pub id: Int32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[cfg(test)]
mod conformance {
    //! Every field of every model against HaloPSA's OpenAPI document.
    //!
    //! Table-driven: each model's [`Sample`] fills *every* field (the
    //! struct literal makes the compiler demand a new one), with a value at
    //! the edge of its Rust type (`i64::MAX` for an `i64`, `i32::MAX` for
    //! an [`Int32`]); the JSON is then bound to the model's schema in
    //! strict mode: a name the schema lacks, or a JSON type other than the
    //! document's (text for an int32, a fraction or an out-of-range number
    //! for an int32, an object for a scalar, ...), fails with the field's
    //! path.

    use super::*;
    use halopsa_openapi::{Mode, Spec};

    /// A value with every field set, at the edge of its type.
    trait Sample {
        fn sample() -> Self;
    }
    impl Sample for Int32 {
        fn sample() -> Self {
            Int32(i64::from(i32::MAX))
        }
    }
    impl Sample for i64 {
        fn sample() -> Self {
            i64::MAX
        }
    }
    impl Sample for f64 {
        fn sample() -> Self {
            12.5
        }
    }
    impl Sample for bool {
        fn sample() -> Self {
            true
        }
    }
    impl Sample for String {
        fn sample() -> Self {
            "text".into()
        }
    }
    impl Sample for DateTime {
        fn sample() -> Self {
            DateTime::midnight("2026-11-30")
        }
    }
    impl<T: Sample> Sample for Option<T> {
        fn sample() -> Self {
            Some(T::sample())
        }
    }
    impl<T: Sample> Sample for Vec<T> {
        fn sample() -> Self {
            vec![T::sample()]
        }
    }
    impl Sample for Area {
        fn sample() -> Self {
            Area {
                id: Sample::sample(),
                name: Sample::sample(),
                inactive: Sample::sample(),
                website: Sample::sample(),
                tax_number: Sample::sample(),
                default_currency_code: Sample::sample(),
                notes: Sample::sample(),
                new_external_link: Sample::sample(),
            }
        }
    }
    impl Sample for LicenceList {
        fn sample() -> Self {
            LicenceList {
                id: Sample::sample(),
                client_id: Sample::sample(),
                name: Sample::sample(),
                count: Sample::sample(),
                start_date: Sample::sample(),
                end_date: Sample::sample(),
                billing_cycle: Sample::sample(),
                status: Sample::sample(),
                is_active: Sample::sample(),
                product_sku: Sample::sample(),
                price: Sample::sample(),
                purchase_price: Sample::sample(),
                thirdparty_client_id: Sample::sample(),
            }
        }
    }
    impl Sample for InvoiceHeader {
        fn sample() -> Self {
            InvoiceHeader {
                id: Sample::sample(),
                client_id: Sample::sample(),
                invoice_date: Sample::sample(),
                reference: Sample::sample(),
                notes_1: Sample::sample(),
                lines: Sample::sample(),
                add_lines: Sample::sample(),
                new_external_link: Sample::sample(),
            }
        }
    }
    impl Sample for InvoiceDetail {
        fn sample() -> Self {
            InvoiceDetail {
                id: Sample::sample(),
                ihid: Sample::sample(),
                itemid: Sample::sample(),
                item_shortdescription: Sample::sample(),
                qty_order: Sample::sample(),
                unit_price: Sample::sample(),
                unit_cost: Sample::sample(),
                startdate: Sample::sample(),
                enddate: Sample::sample(),
                isinactive: Sample::sample(),
                item_internal_reference: Sample::sample(),
                item_external_reference: Sample::sample(),
            }
        }
    }
    impl Sample for ExternalLinkList {
        fn sample() -> Self {
            ExternalLinkList {
                id: Sample::sample(),
                halo_id: Sample::sample(),
                table_id: Sample::sample(),
                third_party_id: Sample::sample(),
                third_party_type: Sample::sample(),
                third_party_secondary_id: Sample::sample(),
                third_party_desc: Sample::sample(),
            }
        }
    }
    impl Sample for Item {
        fn sample() -> Self {
            Item {
                id: Sample::sample(),
                name: Sample::sample(),
                description: Sample::sample(),
                baseprice: Sample::sample(),
            }
        }
    }
    impl Sample for Currency {
        fn sample() -> Self {
            Currency {
                id: Sample::sample(),
                code: Sample::sample(),
                name: Sample::sample(),
            }
        }
    }

    fn sample<T: Sample + Serialize>() -> Value {
        match body(&T::sample()) {
            Ok(v) => v,
            Err(e) => panic!("{}: {e}", std::any::type_name::<T>()),
        }
    }

    /// (the document's schema, a fully populated instance of our model)
    fn models() -> Vec<(&'static str, Value)> {
        vec![
            ("Area", sample::<Area>()),
            ("Licence_List", sample::<LicenceList>()),
            ("InvoiceHeader", sample::<InvoiceHeader>()),
            ("InvoiceDetail", sample::<InvoiceDetail>()),
            ("ExternalLink_List", sample::<ExternalLinkList>()),
            ("Item", sample::<Item>()),
            ("Currency", sample::<Currency>()),
        ]
    }

    /// (model, field path, the document's type) of every leaf, for the
    /// report table (`cargo test -p halosync-shared conformance -- --nocapture`).
    fn leaves(spec: &Spec, schema: &str, v: &Value, prefix: &str, out: &mut Vec<String>) {
        let Some(props) = spec
            .schema(schema)
            .and_then(|s| s.get("properties"))
            .and_then(Value::as_object)
        else {
            return;
        };
        let Value::Object(obj) = v else { return };
        for (k, fv) in obj {
            let Some(p) = props.get(k) else { continue };
            let path = format!("{prefix}{k}");
            let reference = p
                .get("$ref")
                .or_else(|| p.pointer("/items/$ref"))
                .and_then(Value::as_str)
                .map(|r| r.rsplit('/').next().unwrap_or(r).to_string());
            let ty = match (&reference, p.get("type").and_then(Value::as_str)) {
                (Some(r), Some("array")) => format!("array of {r}"),
                (Some(r), _) => r.clone(),
                (None, t) => format!(
                    "{}{}",
                    t.unwrap_or("?"),
                    p.get("format")
                        .and_then(Value::as_str)
                        .map(|f| format!(" ({f})"))
                        .unwrap_or_default()
                ),
            };
            out.push(format!("| {schema} | {path} | {ty} |"));
            if let Some(r) = &reference {
                let inner = match fv {
                    Value::Array(a) => a.first().cloned().unwrap_or(Value::Null),
                    other => other.clone(),
                };
                leaves(spec, r, &inner, &format!("{path}."), out);
            }
        }
    }

    #[test]
    fn every_field_of_every_model_is_in_the_openapi_document_with_its_type() {
        let spec = Spec::embedded().expect("the vendored OpenAPI document parses");
        let mut table = Vec::new();
        for (schema, value) in models() {
            assert!(spec.schema(schema).is_some(), "no schema {schema}");
            let bound = spec
                .bind(schema, value.clone(), Mode::Strict)
                .unwrap_or_else(|e| panic!("{schema}: {e}"));
            assert!(
                bound.ignored.is_empty(),
                "{schema} has no propert(y/ies) {:?}: HaloPSA would drop them",
                bound.ignored
            );
            leaves(spec, schema, &value, "", &mut table);
        }
        println!("| model | field | type in the document |\n|---|---|---|");
        for row in table {
            println!("{row}");
        }
    }

    #[test]
    fn the_check_fails_on_a_field_the_document_lacks_or_types_otherwise() {
        let spec = Spec::embedded().expect("the vendored OpenAPI document parses");
        let mut header = sample::<InvoiceHeader>();
        header["notes"] = Value::from("not a field of InvoiceHeader");
        let bound = spec.bind("InvoiceHeader", header, Mode::Strict).unwrap();
        assert_eq!(bound.ignored.into_iter().collect::<Vec<_>>(), ["notes"]);
        let mut area = sample::<Area>();
        area["default_currency_code"] = Value::from("USD");
        assert!(spec.bind("Area", area, Mode::Strict).is_err());
        let mut line = sample::<InvoiceDetail>();
        line["ihid"] = Value::from(i64::sample());
        assert!(spec.bind("InvoiceDetail", line, Mode::Strict).is_err());
        assert!(body(&Area {
            id: Some(Int32(i64::from(i32::MAX) + 1)),
            ..Area::default()
        })
        .is_err());
    }
}

#[cfg(test)]
mod licence_product {
    use super::LicenceList;
    use crate::contract::Product;
    use serde_json::json;

    #[test]
    fn a_licence_stands_for_its_trimmed_sku_named_by_its_name_or_the_sku() {
        let product = |row| LicenceList::product_of(&row);
        assert_eq!(
            product(json!({"product_sku": " MS-365-BP ", "name": "M365 BP"})),
            Some(Product {
                sku: "MS-365-BP".into(),
                name: "M365 BP".into()
            })
        );
        assert_eq!(
            product(json!({"product_sku": "MS-TEAMS"})),
            Some(Product {
                sku: "MS-TEAMS".into(),
                name: "MS-TEAMS".into()
            })
        );
        assert_eq!(product(json!({"product_sku": "  ", "name": "x"})), None);
        assert_eq!(product(json!({"name": "x"})), None);
        assert_eq!(product(json!({"product_sku": 7})), None);
    }
}
