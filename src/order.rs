//! The message contract between `warren-producer` and the bridge: a JSON `CreateOrder`, routed
//! to the entity named by its `product_id`. Unknown fields are ignored and the .NET sample's
//! PascalCase names are accepted, so messages from the original Akka.NET producer decode too.
//! An order id is any short text ([`OrderId`]): most producers' ids are not UUIDs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::entity::{EntityId, EntityMessage, InvalidMessage};

/// Longest order id, in bytes: ample for any id scheme, and short enough to be a store key.
pub const MAX_ORDER_ID_BYTES: usize = 255;

/// Unique per order; entities deduplicate redeliveries on it. Any text of 1 to
/// [`MAX_ORDER_ID_BYTES`] bytes without control characters, taken as it is (spaces count). A
/// UUID, in whatever form `uuid` parses (capitals, no hyphens, braces, URN), is one id in its
/// lowercase hyphenated form, the form every earlier version stored, and takes no allocation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OrderId(Id);

/// Private, so every id is built through the checks.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Id {
    Uuid(Uuid),
    Text(Box<str>),
}

/// Room for a UUID's text, for [`OrderId::as_text`] ([`OrderId::text_buffer`] makes one).
pub type OrderIdBuffer = [u8; uuid::fmt::Hyphenated::LENGTH];

impl OrderId {
    /// An empty buffer for [`Self::as_text`].
    pub fn text_buffer() -> OrderIdBuffer {
        [0; uuid::fmt::Hyphenated::LENGTH]
    }

    /// The id as text (a store key, say), written into `buffer` if it is a UUID.
    pub fn as_text<'a>(&'a self, buffer: &'a mut OrderIdBuffer) -> &'a str {
        match &self.0 {
            Id::Uuid(uuid) => uuid.hyphenated().encode_lower(buffer),
            Id::Text(text) => text,
        }
    }
}

/// Why a text is not an order id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadOrderId {
    /// Nothing but whitespace.
    #[error("order_id is empty")]
    Empty,
    /// Longer than [`MAX_ORDER_ID_BYTES`].
    #[error("order_id is {0} bytes, more than {MAX_ORDER_ID_BYTES}")]
    TooLong(usize),
    /// Holds a control character (a NUL cannot even be stored).
    #[error("order_id contains a control character")]
    ControlCharacter,
}

impl FromStr for OrderId {
    type Err = BadOrderId;

    fn from_str(text: &str) -> Result<Self, BadOrderId> {
        if let Ok(uuid) = Uuid::parse_str(text) {
            return Ok(uuid.into());
        }
        if text.trim().is_empty() {
            return Err(BadOrderId::Empty);
        }
        if text.len() > MAX_ORDER_ID_BYTES {
            return Err(BadOrderId::TooLong(text.len()));
        }
        if text.chars().any(char::is_control) {
            return Err(BadOrderId::ControlCharacter);
        }
        Ok(OrderId(Id::Text(text.into())))
    }
}

impl TryFrom<String> for OrderId {
    type Error = BadOrderId;

    fn try_from(text: String) -> Result<Self, BadOrderId> {
        text.parse()
    }
}

impl From<OrderId> for String {
    fn from(id: OrderId) -> String {
        id.to_string()
    }
}

impl From<Uuid> for OrderId {
    fn from(uuid: Uuid) -> Self {
        OrderId(Id::Uuid(uuid))
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Id::Uuid(uuid) => write!(f, "{}", uuid.hyphenated()),
            Id::Text(text) => f.write_str(text),
        }
    }
}

/// An order for some quantity of one product.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateOrder {
    /// Unique per order; entities deduplicate redeliveries on it.
    #[serde(alias = "OrderId")]
    pub order_id: OrderId,
    /// Who ordered.
    #[serde(alias = "CustomerId")]
    pub customer_id: String,
    /// The product, and so the entity that owns the order.
    #[serde(alias = "ProductId")]
    pub product_id: String,
    /// How many, at least 1.
    #[serde(alias = "Quantity")]
    pub quantity: u32,
    /// The trace this order is part of (a W3C `traceparent`), carried across the cluster while
    /// traces are exported; never in the JSON a producer publishes (it goes in a header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<String>,
}

impl fmt::Display for CreateOrder {
    /// The original sample's record notation, so log lines read the same.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CreateOrder {{ OrderId = {}, CustomerId = {}, ProductId = {}, Quantity = {} }}",
            self.order_id, self.customer_id, self.product_id, self.quantity
        )
    }
}

/// What arrives on the wire, before the checks that give a precise rejection reason.
#[derive(Deserialize)]
struct WireOrder {
    #[serde(alias = "OrderId")]
    order_id: WireOrderId,
    #[serde(alias = "CustomerId")]
    customer_id: String,
    #[serde(alias = "ProductId", default)]
    product_id: Option<String>,
    #[serde(alias = "Quantity")]
    quantity: u32,
}

/// Text, or a whole number (many producers number their orders), taken as its decimal text.
#[derive(Deserialize)]
#[serde(untagged)]
enum WireOrderId {
    Text(String),
    Number(serde_json::Number),
}

impl WireOrderId {
    fn parse(self) -> Result<OrderId, InvalidMessage> {
        let text = match self {
            WireOrderId::Text(text) => text,
            WireOrderId::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
            WireOrderId::Number(n) => {
                return Err(InvalidMessage::Invalid(format!(
                    "order_id {n} is not a whole number"
                )));
            }
        };
        text.parse()
            .map_err(|e: BadOrderId| InvalidMessage::Invalid(e.to_string()))
    }
}

impl EntityMessage for CreateOrder {
    fn decode(body: &[u8]) -> Result<Self, InvalidMessage> {
        let wire: WireOrder =
            serde_json::from_slice(body).map_err(|e| InvalidMessage::Malformed(e.to_string()))?;
        let order_id = wire.order_id.parse()?;
        let product_id = match wire.product_id {
            Some(id) if !id.trim().is_empty() => id,
            _ => return Err(InvalidMessage::MissingEntityId("product_id")),
        };
        if wire.quantity == 0 {
            return Err(InvalidMessage::Invalid(
                "quantity must be at least 1".into(),
            ));
        }
        Ok(CreateOrder {
            order_id,
            customer_id: wire.customer_id,
            product_id,
            quantity: wire.quantity,
            trace_context: None,
        })
    }

    fn entity_id(&self) -> EntityId {
        EntityId::new(self.product_id.as_str())
    }

    fn trace_context(&self) -> Option<&str> {
        self.trace_context.as_deref()
    }

    fn set_trace_context(&mut self, traceparent: String) {
        self.trace_context = Some(traceparent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_context_crosses_the_cluster_and_an_untraced_order_encodes_as_before() {
        let mut order = CreateOrder::decode(
            br#"{"order_id":"o-1","customer_id":"c","product_id":"p","quantity":2}"#,
        )
        .unwrap();
        let untraced = rmp_serde::to_vec(&order).unwrap();
        let json = serde_json::to_string(&order).unwrap();
        assert!(!json.contains("trace"), "{json}");
        order.set_trace_context("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let traced: CreateOrder =
            rmp_serde::from_slice(&rmp_serde::to_vec(&order).unwrap()).unwrap();
        assert_eq!(traced, order);
        // A node of the version before traces sends orders without the field.
        let old: CreateOrder = rmp_serde::from_slice(&untraced).unwrap();
        assert_eq!(old.trace_context(), None);
        assert_eq!(old.order_id, order.order_id);
    }

    #[test]
    fn decodes_the_dotnet_sample_format_with_its_metadata_keys() {
        let body = br#"{"$id":"1","$type":"ReliableRabbitMQ.Shared.Messages.CreateOrder, ReliableRabbitMQ.Shared",
            "OrderId":"46a3b798-2bd0-4a2c-9f1b-3c3c1b9d2f10","CustomerId":"4070","ProductId":"88","Quantity":8}"#;
        let order = CreateOrder::decode(body).unwrap();
        assert_eq!(order.product_id, "88");
        assert_eq!(order.quantity, 8);
        assert_eq!(order.entity_id(), EntityId::new("88"));
    }

    #[test]
    fn an_order_id_is_any_short_text_and_a_uuid_in_any_form_is_one_id() {
        let body =
            br#"{"order_id":"ORD-2026/12 #1001","customer_id":"c","product_id":"p","quantity":2}"#;
        let order = CreateOrder::decode(body).unwrap();
        assert_eq!(order.order_id.to_string(), "ORD-2026/12 #1001");
        let uuid = Uuid::new_v4();
        let forms = [
            uuid.hyphenated().to_string(),
            uuid.hyphenated().to_string().to_uppercase(),
            uuid.simple().to_string(),
            uuid.braced().to_string(),
            uuid.urn().to_string(),
        ];
        for form in forms {
            let id: OrderId = form.parse().unwrap();
            assert_eq!(id, OrderId::from(uuid), "{form}");
            assert_eq!(id.to_string(), uuid.hyphenated().to_string());
            let mut buffer = OrderId::text_buffer();
            assert_eq!(id.as_text(&mut buffer), uuid.hyphenated().to_string());
        }
        let numbered = br#"{"OrderId":1001,"CustomerId":"c","ProductId":"p","Quantity":1}"#;
        let order = CreateOrder::decode(numbered).unwrap();
        assert_eq!(order.order_id.to_string(), "1001");
        let json = serde_json::to_string(&OrderId::from(uuid)).unwrap();
        assert_eq!(json, format!("\"{}\"", uuid.hyphenated()));
        assert_eq!(serde_json::from_str::<OrderId>(&json).unwrap(), uuid.into());
        let longest = "x".repeat(MAX_ORDER_ID_BYTES);
        assert!(longest.parse::<OrderId>().is_ok());
    }

    #[test]
    fn round_trips_our_own_format() {
        let order = CreateOrder {
            order_id: Uuid::new_v4().into(),
            customer_id: "c".into(),
            product_id: "p".into(),
            quantity: 3,
            trace_context: None,
        };
        let body = serde_json::to_vec(&order).unwrap();
        assert_eq!(CreateOrder::decode(&body).unwrap(), order);
    }

    #[test]
    fn names_the_reason_for_each_kind_of_bad_input() {
        let id = Uuid::new_v4();
        let cases = [
            ("{not json".to_owned(), "malformed"),
            (
                format!(r#"{{"order_id":"{id}","customer_id":"c","quantity":1}}"#),
                "missing product_id",
            ),
            (
                format!(r#"{{"order_id":"{id}","customer_id":"c","product_id":" ","quantity":1}}"#),
                "missing product_id",
            ),
            (
                format!(r#"{{"order_id":"{id}","customer_id":"c","product_id":"p","quantity":0}}"#),
                "quantity",
            ),
            (
                r#"{"order_id":" ","customer_id":"c","product_id":"p","quantity":1}"#.to_owned(),
                "order_id is empty",
            ),
            (
                format!(
                    r#"{{"order_id":"{}","customer_id":"c","product_id":"p","quantity":1}}"#,
                    "x".repeat(MAX_ORDER_ID_BYTES + 1)
                ),
                "order_id is 256 bytes",
            ),
            (
                r#"{"order_id":"a\u0000b","customer_id":"c","product_id":"p","quantity":1}"#
                    .to_owned(),
                "control character",
            ),
            (
                r#"{"order_id":1.5,"customer_id":"c","product_id":"p","quantity":1}"#.to_owned(),
                "not a whole number",
            ),
        ];
        for (body, expected) in cases {
            let err = CreateOrder::decode(body.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }
}
