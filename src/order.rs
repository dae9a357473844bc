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

/// Unique per order; entities deduplicate redeliveries on it. Any non-empty text of at most
/// [`MAX_ORDER_ID_BYTES`] bytes without control characters. A UUID, in whatever form serde and
/// `uuid` accept (capitals, no hyphens, braces), is one id in its lowercase hyphenated form, and
/// is kept in 16 bytes: the form and size every earlier version stored.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum OrderId {
    /// A UUID.
    Uuid(Uuid),
    /// Any other id.
    Text(Box<str>),
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
            return Ok(OrderId::Uuid(uuid));
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
        Ok(OrderId::Text(text.into()))
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
        OrderId::Uuid(uuid)
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OrderId::Uuid(uuid) => write!(f, "{}", uuid.hyphenated()),
            OrderId::Text(text) => f.write_str(text),
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
    order_id: String,
    #[serde(alias = "CustomerId")]
    customer_id: String,
    #[serde(alias = "ProductId", default)]
    product_id: Option<String>,
    #[serde(alias = "Quantity")]
    quantity: u32,
}

impl EntityMessage for CreateOrder {
    fn decode(body: &[u8]) -> Result<Self, InvalidMessage> {
        let wire: WireOrder =
            serde_json::from_slice(body).map_err(|e| InvalidMessage::Malformed(e.to_string()))?;
        let order_id = wire
            .order_id
            .parse()
            .map_err(|e: BadOrderId| InvalidMessage::Invalid(e.to_string()))?;
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
        })
    }

    fn entity_id(&self) -> EntityId {
        EntityId::new(self.product_id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        ];
        for form in forms {
            let id: OrderId = form.parse().unwrap();
            assert_eq!(id, OrderId::Uuid(uuid), "{form}");
            assert_eq!(id.to_string(), uuid.hyphenated().to_string());
        }
        let json = serde_json::to_string(&OrderId::Uuid(uuid)).unwrap();
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
        ];
        for (body, expected) in cases {
            let err = CreateOrder::decode(body.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }
}
