//! The message contract between `warren-producer` and the bridge: a JSON `CreateOrder`, routed
//! to the entity named by its `product_id`. Unknown fields are ignored and the .NET sample's
//! PascalCase names are accepted, so messages from the original Akka.NET producer decode too.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::entity::{EntityId, EntityMessage, InvalidMessage};

/// An order for some quantity of one product.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateOrder {
    /// Unique per order; entities deduplicate redeliveries on it.
    #[serde(alias = "OrderId")]
    pub order_id: Uuid,
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
    order_id: Uuid,
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
            order_id: wire.order_id,
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
    fn round_trips_our_own_format() {
        let order = CreateOrder {
            order_id: Uuid::new_v4(),
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
        ];
        for (body, expected) in cases {
            let err = CreateOrder::decode(body.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }
}
